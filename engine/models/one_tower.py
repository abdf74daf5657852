"""One-tower (ViLT-style single-stream) encoder.

One HF transformer encoder, text or vision, processes the concatenation
``[text tokens ; image patches]``. With ``embeddings = "backbone"`` (ViLT) the
backbone keeps its own pretrained embeddings for its native modality (and its
final LayerNorm, if it has one) and the other modality gets a fresh embedding;
with ``"fresh"`` (Renaissance) only the encoder layers are kept and both
modalities get fresh embeddings. A learned modality-type embedding is added to
both. Padding tokens are masked out of every attention.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

import torch
from torch import Tensor, nn

from engine import backbones
from engine import config as C
from engine.errors import ConfigError
from engine.hub import dropouts_in
from engine.models import hf
from engine.models.features import Features
from engine.models.layers import (
    ConvStemEmbeddings,
    ModalityTypes,
    PatchEmbeddings,
    Pooler,
    TextEmbeddings,
    additive_mask,
    init_weights,
)
from engine.models.rows import Rows, layer_rows, run_layer
from engine.models.towers import Groups


class OneTower(nn.Module):
    pooler_lr: ClassVar[str] = "base"
    """The pooler learns at the base rate, as ViLT's does (vilt/modules/vilt_utils.py ``set_schedule``
    gives ``lr_mult`` to the task classifiers only)."""

    def __init__(self, cfg: C.OneTowerModel, vocab_size: int, pair_images: bool = False):
        super().__init__()
        b = cfg.backbone
        key = "model.backbone"
        if b.source == "manual":
            self.modality = b.modality or "text"
            common = dict(hidden_size=b.hidden_size, layers=b.layers, heads=b.heads,
                          mlp_ratio=b.mlp_ratio, dropout=b.dropout, attention_dropout=b.attention_p)
            config = (
                backbones.manual_text_config(vocab_size=vocab_size, max_positions=b.max_text_positions, **common)
                if self.modality == "text"
                else backbones.manual_vision_config(patch_size=b.patch_size, image_size=b.image_size, **common)
            )
        else:
            config = backbones.load_hf_config(b.name, f"{key}.name")
            self.modality = backbones.modality_of(config)
            if b.modality and b.modality != self.modality:
                raise ConfigError(
                    f"model.backbone.modality = {b.modality!r}, but {b.name!r} is a "
                    f"{self.modality} model; remove the key or pick another backbone."
                )
            hf.set_dropout(config, b.dropout, b.attention_p)
        self.backbone = hf.build_hf_model(config, name=b.name, pretrained=b.source == "pretrained", key=f"{key}.name")
        hidden = backbones.hidden_size_of(config)
        self.hidden_size = hidden
        dropout = b.dropout if b.dropout is not None else dropouts_in(config)[0] or 0.0  # fresh embeddings
        hf.encoder_layers(self.backbone, key)  # fail early for unsupported families
        self.fresh = b.embeddings == "fresh"
        self.text_embeddings: TextEmbeddings | None = None
        self.image_embeddings: PatchEmbeddings | None = None
        if self.modality == "text" or self.fresh:
            stem = ConvStemEmbeddings if b.image_embedding == "conv" else PatchEmbeddings
            self.image_embeddings = stem(b.image_size, b.patch_size, hidden, dropout)
            init_weights(self.image_embeddings)
        else:
            self._check_own_patches(b, config)
        self.vocab_size = config.vocab_size if self.modality == "text" and not self.fresh else vocab_size
        if self.modality == "vision" or self.fresh:
            self.text_embeddings = TextEmbeddings(vocab_size, hidden, b.max_text_positions, dropout)
        self._interpolate = self.modality == "vision" and not self.fresh and hf.accepts_kwarg(
            self.backbone.embeddings, "interpolate_pos_encoding"
        )
        self.modality_type = ModalityTypes(hidden, pair_images)
        self.pooler_kind = cfg.pooler
        self.pooler = Pooler(hidden)
        self.image_pooler = Pooler(hidden) if cfg.pooler == "double" else None
        self.pooled_dim = hidden * (2 if cfg.pooler == "double" else 1)
        self.text_dim = hidden
        if b.gradient_checkpointing:
            hf.enable_checkpointing(self.backbone)
        if self.fresh:  # after checkpointing, which looks up the backbone's input embeddings
            hf.keep_encoder_only(self.backbone, key)

    @staticmethod
    def _check_own_patches(b: C.Backbone, config: object) -> None:
        """A vision backbone that keeps its own patch embedding: the preset may not ask for another."""
        if b.image_embedding != "patch":
            raise ConfigError(
                f"model.backbone.image_embedding applies to fresh image embeddings; {b.name!r} is a vision "
                "model and keeps its own patch embedding. Remove the key, or set embeddings = \"fresh\"."
            )
        own_patch = getattr(config, "patch_size", b.patch_size)
        if "patch_size" in b.model_fields_set and own_patch != b.patch_size:
            raise ConfigError(
                f"model.backbone.patch_size = {b.patch_size}, but {b.name!r} uses "
                f"patches of {own_patch}; remove the key."
            )

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's own layer list (looked up, not re-registered, so each
        parameter has exactly one name in the state dict)."""
        return hf.encoder_layers(self.backbone, "model.backbone")

    @property
    def norm(self) -> nn.Module | None:
        return hf.final_norm(self.backbone)

    def embed_text(self, input_ids: Tensor) -> Tensor:
        if self.text_embeddings is not None:
            return self.text_embeddings(input_ids)
        x = self.backbone.embeddings(input_ids=input_ids)
        project = getattr(self.backbone, "embeddings_project", None)
        return project(x) if project is not None else x

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        if self.image_embeddings is not None:
            return self.image_embeddings(pixel_values)
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.backbone.embeddings(pixel_values, **kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, *,
                tokens: Collection[str] = ("text", "image"), image_types: Tensor | None = None) -> Features:
        """``image_types``: each sample's image type row ``(B,)`` (1, or 2 for NLVR2's second image); unset: 1.
        ``tokens``: which fused token sequences the caller reads (``"text"``, ``"image"``); the pooled
        feature is always there. The last layer computes only the rows they and the pooler need
        (:mod:`engine.models.rows`): ``tokens=()`` gives the pooled feature at a fraction of the last
        layer's cost, and the ``Features`` fields not asked for are None."""
        t = self.embed_text(input_ids) + self.modality_type.weight[0]
        v = self.embed_image(pixel_values) + self.modality_type.image(image_types)
        x = torch.cat([t, v], dim=1)
        n_text = t.shape[1]
        mask = torch.cat([attention_mask, attention_mask.new_ones(v.shape[:2])], dim=1)
        attn = additive_mask(mask, x.dtype)
        double = self.image_pooler is not None
        rows: Rows | None = None  # the last layer's rows the caller and the pooler read; None: all
        image_cls = n_text  # where the image [CLS] ends up among them
        if "image" not in tokens:
            if "text" in tokens:  # the text rows, then the image [CLS] for a double pooler
                rows = slice(0, n_text + int(double))
            elif double:
                rows, image_cls = torch.tensor([0, n_text], device=x.device), 1
            else:
                rows = slice(0, 1)
        layers = list(self.layers)
        for layer in layers[:-1]:
            x = run_layer(layer, x, attn)
        if layers:
            x = layer_rows(layers[-1], x, attn, rows)
        elif rows is not None:
            x = x[:, rows]
        if self.norm is not None:
            x = self.norm(x)
        pooled = self.pooler(x[:, 0])
        if self.image_pooler is not None:
            pooled = torch.cat([pooled, self.image_pooler(x[:, image_cls])], dim=-1)
        return Features(text=x[:, :n_text] if "text" in tokens else None,
                        image=x[:, n_text:] if "image" in tokens else None, text_mask=attention_mask, pooled=pooled)

    def groups(self) -> Groups:
        own: list[nn.Module] = []  # the backbone's own embedding, where it is kept
        if not self.fresh:
            own = [self.backbone.embeddings]
            if getattr(self.backbone, "embeddings_project", None) is not None:
                own.append(self.backbone.embeddings_project)
        text_emb = [self.text_embeddings] if self.text_embeddings is not None else own
        image_emb = [self.image_embeddings] if self.image_embeddings is not None else own
        groups: Groups = {
            "backbone.text_embeddings": text_emb,
            "backbone.image_embeddings": image_emb,
            "backbone.modality_type": [self.modality_type],
        }
        for i, layer in enumerate(self.layers):
            groups[f"backbone.layers[{i}]"] = [layer]
        groups["backbone.final"] = [self.norm] if self.norm is not None else []
        groups["pooler"] = [m for m in (self.pooler, self.image_pooler) if m is not None]
        return groups
