"""Downstream tasks: losses and metrics with explicit arguments."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def vqa_loss(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """VQA as multi-label classification over the answer vocabulary (ViLT, METER):
    binary cross-entropy against soft targets, scaled by the number of answers."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_targets) * soft_targets.shape[1]


def vqa_score(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Per-sample VQA score: the soft target of the predicted answer (1.0 for an
    answer given by 3 or more annotators; plain accuracy when targets are one-hot)."""
    return soft_targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
