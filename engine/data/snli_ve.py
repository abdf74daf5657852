"""SNLI-VE from METER-format arrow files (``snli_{split}.arrow``, ``meter/utils/write_snli.py``).

An item is one [premise, hypothesis] pair; as in METER's ``SNLIDataset`` the image is the premise and the
model reads the hypothesis alone. Labels are METER's (:data:`LABELS`). Details: docs/tasks-and-data.md,
"How each task reads its rows".
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, expand_items, list_lengths, numbers
from engine.data.images import ImageTransform
from engine.data.transforms import Normalization
from engine.errors import RenError

LABELS = ("contradiction", "neutral", "entailment")  # by METER's label id (write_snli.py's label2id)



class ArrowSNLIVEDataset(Dataset):
    """One item per [premise, hypothesis] pair. Batch keys: ``input_ids``,
    ``attention_mask`` (B x L, the hypotheses), ``pixel_values`` (B x 3 x S x S,
    normalised), ``labels`` (B, int64 ids into :data:`LABELS`)."""

    def __init__(self, source: ArrowSource, tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization) -> None:
        self.source, self.tokenizer, self.max_text_len = source, tokenizer, max_text_len
        self.transform, self.norm = transform, norm
        if not len(source):
            raise RenError(f"{', '.join(map(str, source.paths))}: no rows.")
        sentences, labels = source.column("sentences"), source.column("labels")
        counts = list_lengths(sentences)
        self._check_aligned(counts, list_lengths(labels))
        self.rows, self.slots = expand_items(counts)
        if not len(self.rows):
            raise RenError(f"{', '.join(map(str, source.paths))}: no sentence pairs.")
        pairs = pc.list_flatten(sentences)
        self._check_items(np.flatnonzero(list_lengths(pairs) != 2), "sentences", "is not a [premise, hypothesis] pair")
        ids = numbers(pc.list_flatten(labels), -1).astype(np.int64)
        self._check_items(np.flatnonzero((ids < 0) | (ids >= len(LABELS))), "labels",
                          "is not an SNLI-VE label id (METER writes 0 contradiction, 1 neutral, 2 entailment)")
        self.labels = ids

    def _check_aligned(self, counts: np.ndarray, label_counts: np.ndarray) -> None:
        bad = np.flatnonzero(counts != label_counts)
        if len(bad):
            path, local = self.source.locate(int(bad[0]))
            raise RenError(f"{path} row {local}: {counts[bad[0]]} sentence pairs but {label_counts[bad[0]]} labels; "
                           "METER's write_snli.py writes one label per [premise, hypothesis] pair.")

    def _check_items(self, bad: np.ndarray, column: str, problem: str) -> None:
        if len(bad):
            row, slot = int(self.rows[bad[0]]), int(self.slots[bad[0]])
            path, local = self.source.locate(row)
            value = self.source.row(row, (column,))[column][slot]
            raise RenError(f"{path} row {local}: {column}[{slot}] = {value!r} {problem}. Pairs with such a "
                           f"value: {len(bad)} of {len(self.rows)} in {', '.join(map(str, self.source.paths))}.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        images: dict[tuple[int, str], Tensor | None] = {}
        sentences: dict[int, list[list[str]]] = {}
        texts, kept, pixels = [], [], []
        for index in indices:
            row, slot = int(self.rows[index]), int(self.slots[index])
            pixel = self.source.transformed_image(row, self.transform, images)
            if pixel is None:
                continue
            if row not in sentences:
                sentences[row] = self.source.row(row, ("sentences",))["sentences"]
            texts.append(sentences[row][slot][1].strip())
            kept.append(index)
            pixels.append(pixel)
        if not texts:
            path = self.source.locate(int(self.rows[indices[0]]))[0]
            raise RenError(f"Every image of a batch of {len(indices)} SNLI-VE pairs was unreadable "
                           f"({self.source.skipped_images} skipped so far) in {path}.")
        encoding = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                  return_tensors="pt")
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
                "pixel_values": self.norm.apply(torch.stack(pixels)),
                "labels": torch.as_tensor(self.labels[kept], dtype=torch.int64)}
