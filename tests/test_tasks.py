"""Task losses and metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from engine import tasks as T


def test_classification_accuracy_and_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.5, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert T.task_score("snli_ve", logits, labels).tolist() == [1.0, 0.0, 1.0]
    expected = -sum(math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))
                    for row, label in zip(logits.tolist(), labels.tolist())) / 3
    assert T.task_loss("snli_ve", logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_vqa_score_is_the_soft_target_of_the_predicted_answer() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 0.0, 1.0]])
    assert T.task_score("vqa", logits, targets).tolist() == pytest.approx([0.6, 0.3])
    assert T.METRICS == {"vqa": "vqa_score", "snli_ve": "accuracy", "nlvr2": "accuracy", "refcoco": "accuracy"}


def test_head_sizes() -> None:
    assert T.num_classes("vqa", 3129) == 3129
    assert (T.num_classes("snli_ve", None), T.num_classes("nlvr2", None)) == (3, 2)
    with pytest.raises(ValueError, match="number of answers"):
        T.num_classes("vqa", None)
