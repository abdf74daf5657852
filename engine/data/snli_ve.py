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
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, list_lengths, numbers
from engine.data.images import ImageTransform
from engine.data.items import ArrowItems
from engine.data.transforms import Normalization
from engine.errors import RenError

LABELS = ("contradiction", "neutral", "entailment")  # by METER's label id (write_snli.py's label2id)



class ArrowSNLIVEDataset(ArrowItems):
    """One item per [premise, hypothesis] pair. Batch keys: ``input_ids``,
    ``attention_mask`` (B x L, the hypotheses), ``pixel_values`` (B x 3 x S x S,
    normalised), ``labels`` (B, int64 ids into :data:`LABELS`)."""

    def __init__(self, source: ArrowSource, tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization) -> None:
        super().__init__(source, tokenizer, max_text_len, transform, norm, items_column="sentences",
                         items="sentence pairs")
        sentences, labels = source.column("sentences"), source.column("labels")
        self._check_aligned(self.counts, list_lengths(labels))
        pairs = pc.list_flatten(sentences)
        self._check_items(np.flatnonzero(list_lengths(pairs) != 2), "sentences", "is not a [premise, hypothesis] pair")
        ids = numbers(pc.list_flatten(labels), -1).astype(np.int64)
        self._check_items(np.flatnonzero((ids < 0) | (ids >= len(LABELS))), "labels",
                          "is not an SNLI-VE label id (METER writes 0 contradiction, 1 neutral, 2 entailment)")
        self.labels = ids

    def _check_aligned(self, counts: np.ndarray, label_counts: np.ndarray) -> None:
        bad = np.flatnonzero(counts != label_counts)
        if len(bad):
            self.fail(int(bad[0]), f"{counts[bad[0]]} sentence pairs but {label_counts[bad[0]]} labels; "
                      "METER's write_snli.py writes one label per [premise, hypothesis] pair.")

    def _check_items(self, bad: np.ndarray, column: str, problem: str) -> None:
        if len(bad):
            row, slot = int(self.rows[bad[0]]), int(self.slots[bad[0]])
            path, local = self.source.locate(row)
            value = self.source.row(row, (column,))[column][slot]
            raise RenError(f"{path} row {local}: {column}[{slot}] = {value!r} {problem}. Pairs with such a "
                           f"value: {len(bad)} of {len(self.rows)} in {self.paths}.")

    def item_text(self, cells: dict, slot: int) -> str:
        return cells["sentences"][slot][1].strip()  # the hypothesis

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        images: dict[tuple[int, str], Tensor | None] = {}
        sentences: dict[int, list[list[str]]] = {}
        texts, kept, pixels = [], [], []
        for index in indices:
            row, slot = int(self.rows[index]), int(self.slots[index])
            pixel = self.item_image(self.source, row, index, self.transform, images)
            if pixel is None:
                continue
            if row not in sentences:
                sentences[row] = self.source.row(row, ("sentences",))["sentences"]
            texts.append(sentences[row][slot][1].strip())
            kept.append(index)
            pixels.append(pixel)
        if not texts:
            raise self.unreadable(indices, "SNLI-VE pairs")
        return {**self.encode(texts),
                "pixel_values": self.norm.apply(torch.stack(pixels)),
                "labels": torch.as_tensor(self.labels[kept], dtype=torch.int64),
                "items": torch.as_tensor(kept, dtype=torch.int64)}
