"""Architectures, heads and the model builder.

``build_model`` maps the preset's architecture kind to its module (a small
registry, like timm's) and attaches the heads the run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from engine import config as C
from engine.models.dual_encoder import DualEncoder
from engine.models.heads import ClassifierHead, ITCHead, ITMHead, MLMHead
from engine.models.one_tower import OneTower
from engine.models.towers import Groups
from engine.models.two_tower import TwoTower
from engine.models.types import Features
from engine.tasks import num_classes

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "one_tower": OneTower,
    "two_tower": TwoTower,
    "dual_encoder": DualEncoder,
}


@dataclass
class Outputs:
    features: Features
    logits: dict[str, Tensor] = field(default_factory=dict)


class VLModel(nn.Module):
    """An encoder plus its heads. Everything runs inside ``forward`` so that
    distributed wrappers (DDP, FSDP) see every parameter use."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.frozen_modules: list[nn.Module] = []

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        *,
        mlm_positions: Tensor | None = None,
        itm_rows: slice | None = None,
        itc: bool = False,
        task: bool = False,
        pair_pixel_values: Tensor | None = None,
    ) -> Outputs:
        """``pair_pixel_values`` (NLVR2): a second image per text; both images are encoded
        with the text in one batch and the task head sees the two pooled features side by side."""
        if pair_pixel_values is not None:
            input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
            pixel_values = torch.cat([pixel_values, pair_pixel_values])
        feats = self.encoder(input_ids, attention_mask, pixel_values)
        out = Outputs(features=feats)
        if mlm_positions is not None:
            out.logits["mlm"] = self.heads["mlm"](feats.text[mlm_positions])
        if itm_rows is not None:
            out.logits["itm"] = self.heads["itm"](feats.pooled[itm_rows])
        if itc:
            out.logits["itc"] = self.heads["itc"](feats.text_cls, feats.image_cls)
        if task:
            pooled = feats.pooled
            if pair_pixel_values is not None:
                first, second = pooled.chunk(2)
                pooled = torch.cat([first, second], dim=1)
            out.logits["task"] = self.heads["task"](pooled)
        return out

    def groups(self) -> Groups:
        groups = dict(self.encoder.groups())
        for name, head in self.heads.items():
            groups[f"heads.{name}"] = [head]
        return groups

    def train(self, mode: bool = True) -> "VLModel":
        """Frozen groups stay in eval mode (no dropout, frozen norm statistics)."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self


def build_model(cfg: C.RunConfig, *, vocab_size: int, num_answers: int | None = None) -> VLModel:
    """The encoder for ``cfg.model`` with the heads for its objectives or task."""
    encoder = ARCHITECTURES[cfg.model.kind](cfg.model, vocab_size)
    heads: dict[str, nn.Module] = {}
    if cfg.objectives is not None:
        obj = cfg.objectives
        if obj.mlm:
            heads["mlm"] = MLMHead(encoder.text_dim, encoder.vocab_size)
        if obj.itm:
            heads["itm"] = ITMHead(encoder.pooled_dim)
        if obj.itc:
            dim = cfg.model.projection_dim if cfg.model.kind == "dual_encoder" else encoder.hidden_size
            heads["itc"] = ITCHead(*encoder.unimodal_dims, dim, obj.itc.temperature, obj.itc.learn_temperature)
    if cfg.task is not None:
        in_dim = encoder.pooled_dim * (2 if cfg.task.name == "nlvr2" else 1)
        classes = num_classes(cfg.task.name, num_answers)
        heads["task"] = ClassifierHead(in_dim, classes, cfg.task.head_hidden_mult)
    return VLModel(encoder, heads)


__all__ = ["ARCHITECTURES", "Outputs", "VLModel", "build_model"]
