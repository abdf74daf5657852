"""Dual encoder (CLIP-style): two towers, compared through the ITC head's
projections. No fusion: usable for fast retrieval and as a first stage."""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from engine import config as C
from engine.models.features import Features
from engine.models.towers import Groups, TextTower, VisionTower


class DualEncoder(nn.Module):
    def __init__(self, cfg: C.DualEncoderModel, vocab_size: int):
        super().__init__()
        self.text = TextTower(cfg.text, vocab_size)
        self.vision = VisionTower(cfg.vision)
        self.vocab_size = self.text.vocab_size
        self.unimodal_dims = (self.text.hidden_size, self.vision.hidden_size)
        self.pooled_dim = 0
        self.text_dim = self.text.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, *,
                tokens: Collection[str] = ()) -> Features:
        """``tokens`` is accepted for a uniform encoder interface: a dual encoder has no fused tokens."""
        return Features(text_mask=attention_mask,
                        text_cls=self.text(input_ids, attention_mask)[:, 0],
                        image_cls=self.vision(pixel_values)[:, 0])

    def groups(self) -> Groups:
        return {**self.text.groups("text"), **self.vision.groups("vision")}
