"""Downstream tasks: losses and metrics with explicit arguments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vqa_loss(logits: Tensor, soft_targets: Tensor, kind: str = "bce") -> Tensor:
    """The VQA training loss.

    ``bce`` (ViLT, METER, Renaissance): multi-label binary cross-entropy against
    the soft targets, scaled by the number of answers. ``ce``: softmax
    cross-entropy against the soft targets normalised to a distribution;
    questions with no scored answer contribute nothing.
    """
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, soft_targets) * soft_targets.shape[1]
    if kind != "ce":
        raise ValueError(f"unknown VQA loss {kind!r}; expected 'bce' or 'ce'")
    mass = soft_targets.sum(dim=1)
    per_sample = -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1) / mass.clamp(min=1e-12)
    valid = mass > 0
    return per_sample[valid].mean() if bool(valid.any()) else logits.sum() * 0.0


def vqa_score(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Per-sample VQA score: the soft target of the predicted answer (1.0 for an
    answer given by 3 or more annotators; plain accuracy when targets are one-hot)."""
    return soft_targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of aligned ``(..., 4)`` boxes given as ``x0, y0, x1, y1``."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area - inter).clamp(min=torch.finfo(inter.dtype).tiny)


REFCOCO_IOU = 0.5  # a pick is correct when it overlaps the referred box this much (UNITER, MAttNet)


def refcoco_score(logits: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
    """Per-expression RefCOCO accuracy: 1.0 when the highest-scoring candidate box has
    IoU >= 0.5 with the referred one (so picking an overlapping duplicate counts, as in
    UNITER's evaluation on ground-truth boxes), else 0.0. ``logits``: ``(B, K)``, padding
    boxes at ``-inf``; ``labels``: ``(B,)`` index of the referred box; ``boxes``: ``(B, K, 4)``."""
    rows = torch.arange(len(labels), device=labels.device)
    picked, referred = boxes[rows, logits.argmax(dim=1)], boxes[rows, labels]
    return (box_iou(picked.float(), referred.float()) >= REFCOCO_IOU).float()


CLASSES = {"snli_ve": 3, "nlvr2": 2}  # vqa: the data set's answer vocabulary; refcoco: one logit per box
METRICS = {"vqa": "vqa_score", "snli_ve": "accuracy", "nlvr2": "accuracy", "refcoco": "accuracy"}
# VQA scored by the official scorer (GT-Vision-Lab/VQA vqaEval.py) against the annotators' raw answers, where
# the split carries them; "vqa_score" is ViLT's soft-target score (engine.vqa_answers).
OFFICIAL_VQA_METRIC = "vqa_accuracy"


def metric_name(task: str, official: bool) -> str:
    """The name of a task's evaluation score: :data:`OFFICIAL_VQA_METRIC` when every VQA batch was scored
    by the official scorer, else :data:`METRICS`."""
    return OFFICIAL_VQA_METRIC if official and task == "vqa" else METRICS[task]


def num_classes(task: str, num_answers: int | None) -> int:
    """Outputs of the task head: the answer vocabulary for VQA, else the task's classes."""
    if task == "vqa":
        if num_answers is None:
            raise ValueError("task 'vqa' needs the data set's number of answers")
        return num_answers
    return CLASSES[task]


def task_loss(task: str, logits: Tensor, labels: Tensor, vqa_kind: str = "bce") -> Tensor:
    """VQA: :func:`vqa_loss` on soft targets; classification tasks: cross-entropy on class ids
    (for RefCOCO, over the candidate boxes)."""
    if task == "vqa":
        return vqa_loss(logits, labels, vqa_kind)
    return F.cross_entropy(logits.float(), labels)


def task_score(task: str, logits: Tensor, labels: Tensor, boxes: Tensor | None = None) -> Tensor:
    """Per-sample score: the VQA score for VQA, :func:`refcoco_score` for RefCOCO (needs the
    candidate ``boxes``), 1.0/0.0 accuracy for classification."""
    if task == "vqa":
        return vqa_score(logits, labels)
    if task == "refcoco":
        if boxes is None:
            raise ValueError("task 'refcoco' is scored against the candidate boxes; pass boxes")
        return refcoco_score(logits, labels, boxes)
    return (logits.argmax(dim=1) == labels).float()
