"""Heads on top of an encoder: MLM, ITM, ITC and task heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.layers import init_weights


class MLMHead(nn.Module):
    """Transform + vocabulary projection, applied to the masked positions only."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        init_weights(self)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.transform(tokens))


class ITMHead(nn.Linear):
    """Matched / not matched, from the pooled joint representation."""

    def __init__(self, pooled_dim: int):
        super().__init__(pooled_dim, 2)
        init_weights(self)


class ITCHead(nn.Module):
    """Projects unimodal summaries to a shared space; returns image-text similarity logits."""

    def __init__(self, text_dim: int, image_dim: int, dim: int, temperature: float, learnable: bool):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        init_weights(self)
        scale = torch.tensor(math.log(1.0 / temperature))
        # a fixed temperature is a buffer, not a frozen parameter: apply_freeze
        # sets requires_grad per group and would make a frozen parameter trainable
        if learnable:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)

    def embed(self, text_cls: Tensor, image_cls: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.text_proj(text_cls), dim=-1), F.normalize(self.image_proj(image_cls), dim=-1)

    def forward(self, text_cls: Tensor, image_cls: Tensor) -> Tensor:
        t, v = self.embed(text_cls, image_cls)
        return self.logit_scale.clamp(max=math.log(100.0)).exp() * t @ v.T


class ClassifierHead(nn.Sequential):
    """ViLT's task head: Linear -> LayerNorm -> GELU -> Linear."""

    def __init__(self, in_dim: int, num_classes: int, hidden_mult: float):
        hidden = max(8, int(in_dim * hidden_mult))
        super().__init__(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        init_weights(self)
