"""VQAv2 from ViLT/METER-format arrow files (``vqav2_{split}.arrow``).

An item is one question, labelled with the files' own ViLT label ids and soft scores. Files that also carry
``raw_answers`` give an evaluation batch ``official_scores``: each vocabulary answer's official VQA accuracy
(:func:`engine.vqa_answers.official_targets`), which scoring then uses. Details: docs/tasks-and-data.md,
"How each task reads its rows".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, numbers
from engine.data.images import ImageTransform
from engine.data.items import ArrowItems
from engine.data.transforms import Normalization
from engine.errors import RenError
from engine.vqa_answers import answer_forms, official_targets


def answer_vocabulary(sources: Sequence[ArrowSource]) -> list[str]:
    """Answer strings by label id, read from the ``answers``/``answer_labels`` columns
    (aligned per question in ViLT's files). Ids no row uses get ``""``. Only the first
    answer of each label is converted to Python (about 3,000 of VQAv2's 4 million)."""
    vocab: dict[int, str] = {}
    for source in sources:
        labels = numbers(pc.list_flatten(pc.list_flatten(source.column("answer_labels"))))
        answers = pc.list_flatten(pc.list_flatten(source.column("answers")))
        if len(labels) != len(answers):
            raise RenError(f"{', '.join(map(str, source.paths))}: the answers and answer_labels columns are not "
                           f"aligned ({len(answers)} answers, {len(labels)} labels).")
        ids, first = np.unique(labels, return_index=True)
        for label, index in zip(ids.tolist(), first.tolist()):
            vocab.setdefault(label, answers[index].as_py())
    if not vocab:
        raise RenError("The VQAv2 training files hold no answers (are they test files?).")
    return [vocab.get(i, "") for i in range(max(vocab) + 1)]


class ArrowVQADataset(ArrowItems):
    """One item per question. Batch keys: ``input_ids``, ``attention_mask`` (B x L),
    ``pixel_values`` (B x 3 x S x S, normalised), ``labels`` (B x num_answers soft
    targets), ``question_ids`` (B,); with ``answers`` (the vocabulary) and files that carry
    ``raw_answers``, also ``official_scores`` (B x num_answers, see the module docstring)."""

    def __init__(self, source: ArrowSource, tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization, num_answers: int,
                 answers: Sequence[str] | None = None) -> None:
        super().__init__(source, tokenizer, max_text_len, transform, norm, items_column="questions", items="questions")
        self.num_answers = num_answers
        self.vocab = list(answers) if answers is not None and has_raw_answers(source) else None
        if self.vocab is not None and len(self.vocab) != num_answers:
            raise RenError(f"ArrowVQADataset: {len(self.vocab)} answers for a head of {num_answers}.")
        self.forms = answer_forms(self.vocab) if self.vocab is not None else {}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        images: dict[tuple[int, str], Tensor | None] = {}
        texts, targets, qids, pixels, official, kept = [], [], [], [], [], []
        columns = ("questions", "answer_labels", "answer_scores", "question_id")
        columns += ("raw_answers",) if self.vocab is not None else ()
        for index in indices:
            row, slot = int(self.rows[index]), int(self.slots[index])
            pixel = self.item_image(self.source, row, index, self.transform, images)
            if pixel is None:
                continue
            cells = self.source.row(row, columns)
            if self.vocab is not None:  # a question without answers scores 0, as with the soft targets
                raw = [answer for answer in _slot(cells.get("raw_answers"), slot) if answer is not None]
                official.append(official_targets(raw, self.vocab, self.forms) if raw
                                else torch.zeros(self.num_answers))
            target = torch.zeros(self.num_answers)
            if cells["answer_labels"]:
                labels = torch.as_tensor(cells["answer_labels"][slot], dtype=torch.int64)
                scores = torch.as_tensor(cells["answer_scores"][slot], dtype=torch.float32)
                if len(labels) and int(labels.max()) >= self.num_answers:
                    self.fail(row, f"answer label {int(labels.max())} is outside the training vocabulary of "
                              f"{self.num_answers}.")
                target[labels] = scores
            texts.append(cells["questions"][slot])
            targets.append(target)
            qids.append(cells["question_id"][slot])
            pixels.append(pixel)
            kept.append(index)
        if not texts:
            raise self.unreadable(indices, "questions")
        batch = {**self.encode(texts),
                 "pixel_values": self.norm.apply(torch.stack(pixels)), "labels": torch.stack(targets),
                 "question_ids": torch.as_tensor(qids, dtype=torch.int64),
                 "items": torch.as_tensor(kept, dtype=torch.int64)}
        if self.vocab is not None:
            batch["official_scores"] = torch.stack(official)
        return batch


def _slot(lists: list[list[str | None]] | None, slot: int) -> list[str | None]:
    """Question ``slot``'s list in a row's list column (empty where the row has none: test splits)."""
    return (lists[slot] or []) if lists and slot < len(lists) else []


def has_raw_answers(source: ArrowSource) -> bool:
    """Whether the rows carry ``raw_answers`` (the annotators' answers; ViLT's files do not)."""
    try:
        source.column("raw_answers")
    except RenError:
        return False
    return True
