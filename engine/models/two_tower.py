"""Two-tower (METER-style) encoder: a text tower and a vision tower, each
projected to the fusion width, joined by a stack of co-attention fusion layers
(self-attention, cross-attention both ways, MLP). Fusion is always trained."""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
from torch import Tensor, nn

from engine import config as C
from engine.models.features import Features
from engine.models.layers import FusionLayer, ModalityTypes, Pooler, additive_mask, init_weights
from engine.models.towers import Groups, TextTower, VisionTower


class TwoTower(nn.Module):
    pooler_lr: ClassVar[str] = "fusion"
    """The poolers learn at the fusion layers' rate, as METER's cross-modal poolers do (meter/modules/
    meter_utils.py ``set_schedule``: every ``cross_modal`` name gets ``lr_mult_cross_modal``)."""

    def __init__(self, cfg: C.TwoTowerModel, vocab_size: int, pair_images: bool = False):
        super().__init__()
        f = cfg.fusion
        self.text = TextTower(cfg.text, vocab_size)
        self.vision = VisionTower(cfg.vision)
        self.vocab_size = self.text.vocab_size
        self.text_proj = nn.Linear(self.text.hidden_size, f.hidden_size)
        self.image_proj = nn.Linear(self.vision.hidden_size, f.hidden_size)
        self.modality_type = ModalityTypes(f.hidden_size, pair_images)
        self.fusion = nn.ModuleList(
            FusionLayer(f.hidden_size, f.heads, f.mlp_ratio, f.dropout, f.attention_p) for _ in range(f.layers)
        )
        self.text_norm = nn.LayerNorm(f.hidden_size)
        self.image_norm = nn.LayerNorm(f.hidden_size)
        self.text_pooler = Pooler(f.hidden_size)
        self.image_pooler = Pooler(f.hidden_size)
        for module in (self.text_proj, self.image_proj, self.fusion, self.text_norm,
                       self.image_norm, self.text_pooler, self.image_pooler):
            init_weights(module)
        self.hidden_size = f.hidden_size
        self.text_dim = f.hidden_size
        self.pooled_dim = 2 * f.hidden_size
        self.unimodal_dims = (self.text.hidden_size, self.vision.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, *,
                tokens: Collection[str] = ("text", "image"), image_types: Tensor | None = None) -> Features:
        return self.fuse(self.text(input_ids, attention_mask), attention_mask, self.vision(pixel_values),
                         tokens=tokens, image_types=image_types)

    def fuse(self, t_uni: Tensor, attention_mask: Tensor, v_uni: Tensor, *,
             tokens: Collection[str] = ("text", "image"), image_types: Tensor | None = None) -> Features:
        """The fusion stack on given unimodal tower outputs (text tokens ``(B, L, D_t)`` with
        their mask, image tokens ``(B, N, D_v)``): lets retrieval encode each text and image
        once and fuse only the pairs it scores. ``tokens``: which fused token sequences the caller
        reads (``"text"``, ``"image"``); a stream not asked for gets only its [CLS] (the pooler's
        input) computed in the last fusion layer, and its ``Features`` field is None. ``image_types``: each
        sample's image type row ``(B,)`` (1, or 2 for NLVR2's second image); unset: 1."""
        t = self.text_proj(t_uni) + self.modality_type.weight[0]
        v = self.image_proj(v_uni) + self.modality_type.image(image_types)
        t_mask = additive_mask(attention_mask, t.dtype)
        *layers, last = self.fusion
        for layer in layers:
            t, v = layer(t, t_mask, v, None)
        cls_only = slice(0, 1)
        t, v = last(t, t_mask, v, None, None if "text" in tokens else cls_only,
                    None if "image" in tokens else cls_only)
        t, v = self.text_norm(t), self.image_norm(v)
        pooled = torch.cat([self.text_pooler(t[:, 0]), self.image_pooler(v[:, 0])], dim=-1)
        return Features(text=t if "text" in tokens else None, image=v if "image" in tokens else None,
                        text_mask=attention_mask, pooled=pooled, text_cls=t_uni[:, 0], image_cls=v_uni[:, 0])

    def groups(self) -> Groups:
        groups = {**self.text.groups("text"), **self.vision.groups("vision")}
        groups["fusion.proj"] = [self.text_proj, self.image_proj, self.modality_type]
        for i, layer in enumerate(self.fusion):
            groups[f"fusion.layers[{i}]"] = [layer]
        groups["fusion.final"] = [self.text_norm, self.image_norm]
        groups["pooler"] = [self.text_pooler, self.image_pooler]
        return groups
