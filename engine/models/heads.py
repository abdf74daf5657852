"""Heads on top of an encoder: MLM, ITM, ITC and task heads."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class ITCEmbeddings:
    """L2-normalised ITC embeddings of each row's text and image, and the logit scale (the
    exponentiated learnt log-scale, clamped at 100 as CLIP does): similarity logits are
    ``scale * text @ image.T``. The ITC loss gathers them over processes before comparing."""

    text: Tensor
    image: Tensor
    scale: Tensor

    def logits(self) -> Tensor:
        return self.scale * self.text @ self.image.T


class ITCHead(nn.Module):
    """Projects unimodal summaries to a shared space, L2-normalised, with the logit scale."""

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

    def forward(self, text_cls: Tensor, image_cls: Tensor) -> ITCEmbeddings:
        t, v = self.embed(text_cls, image_cls)
        return ITCEmbeddings(t, v, self.logit_scale.clamp(max=math.log(100.0)).exp())


class ClassifierHead(nn.Sequential):
    """ViLT's task head: Linear -> LayerNorm -> GELU -> Linear."""

    def __init__(self, in_dim: int, num_classes: int, hidden_mult: float):
        hidden = max(8, int(in_dim * hidden_mult))
        super().__init__(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        init_weights(self)


MAX_LEADING_TOKENS = 8  # image tokens before the patch grid: CLS, DeiT's distillation token, registers


def patch_grid(image_tokens: Tensor) -> Tensor:
    """The patch tokens of ``(B, T, D)`` image tokens as ``(B, g, g, D)``: the last ``g*g``
    tokens with ``g = isqrt(T)``; the leading ones (CLS, distillation, registers) are dropped."""
    count = image_tokens.shape[1]
    side = math.isqrt(count)
    if side == 0 or count - side * side > MAX_LEADING_TOKENS:
        raise ValueError(f"{count} image tokens are not a square patch grid after at most "
                         f"{MAX_LEADING_TOKENS} leading tokens; box pooling needs a square image and a ViT-style "
                         "vision backbone")
    return image_tokens[:, count - side * side:].reshape(image_tokens.shape[0], side, side, -1)


def box_weights(boxes: Tensor, side: int) -> Tensor:
    """How much of each of a ``side x side`` grid's cells each box covers.

    ``boxes``: ``(B, K, 4)`` as ``x0, y0, x1, y1`` in ``[0, 1]`` image coordinates.
    Returns ``(B, K, side, side)`` in ``[0, 1]``; a box thinner than a cell still
    covers a sliver of the cell it lies in, so no box has all-zero weights."""
    edges = torch.linspace(0, 1, side + 1, device=boxes.device, dtype=boxes.dtype)
    lo, hi = edges[:-1], edges[1:]
    x0, y0, x1, y1 = boxes.clamp(0, 1).unbind(-1)
    eps = 1e-4
    x0, y0 = x0.clamp(max=1 - eps), y0.clamp(max=1 - eps)
    x1, y1 = torch.maximum(x1, x0 + eps), torch.maximum(y1, y0 + eps)

    def cover(a: Tensor, b: Tensor) -> Tensor:  # (B, K) -> (B, K, side): covered fraction of each cell
        return (torch.minimum(b[..., None], hi) - torch.maximum(a[..., None], lo)).clamp(min=0) * side

    return cover(y0, y1)[..., :, None] * cover(x0, x1)[..., None, :]


class RegionHead(nn.Module):
    """Referring expressions: one score per candidate box.

    Each box's feature is the mean of the fused (text-conditioned) patch tokens
    weighted by how much of each patch the box covers, plus an embedding of its
    geometry (corners and area); with the joint pooled feature it goes through
    a :class:`ClassifierHead` to one logit. Padding boxes get ``-inf``."""

    def __init__(self, token_dim: int, pooled_dim: int, hidden_mult: float):
        super().__init__()
        self.geometry = nn.Linear(5, token_dim)
        init_weights(self.geometry)
        self.score = ClassifierHead(token_dim + pooled_dim, 1, hidden_mult)

    def forward(self, image_tokens: Tensor, pooled: Tensor, boxes: Tensor, box_mask: Tensor) -> Tensor:
        grid = patch_grid(image_tokens)
        b, side = grid.shape[0], grid.shape[1]
        weights = box_weights(boxes.to(grid.dtype), side).flatten(2)  # (B, K, g*g)
        feats = weights @ grid.reshape(b, side * side, -1) / weights.sum(-1, keepdim=True)
        x0, y0, x1, y1 = boxes.to(grid.dtype).unbind(-1)
        geometry = torch.stack([x0, y0, x1, y1, (x1 - x0) * (y1 - y0)], dim=-1)
        joint = pooled[:, None].expand(-1, feats.shape[1], -1)
        logits = self.score(torch.cat([feats + self.geometry(geometry), joint], dim=-1)).squeeze(-1)
        return logits.float().masked_fill(~box_mask, float("-inf"))
