"""NLVR2 from ViLT-format arrow files (``nlvr2_{split}.arrow``, ``vilt/utils/write_nlvr2.py``).

Each row is one image pair; an item is one sentence, labelled 1 for ``"True"`` and 0 for ``"False"`` as
ViLT's ``NLVR2Dataset`` does, identified as ``{pair id}#{k}``. Details (identifiers, skipped images):
docs/tasks-and-data.md, "How each task reads its rows".
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, list_lengths, numbers
from engine.data.images import ImageTransform, draws_from
from engine.data.items import ArrowItems
from engine.data.transforms import Normalization
from engine.errors import RenError

ANSWERS = ("False", "True")  # by label id



class ArrowNLVR2Dataset(ArrowItems):
    """One item per sentence. Batch keys: ``input_ids``, ``attention_mask`` (B x L),
    ``pixel_values_0``, ``pixel_values_1`` (B x 3 x S x S each, normalised),
    ``labels`` (B, int64: 1 true, 0 false), ``identifiers`` (B strings)."""

    def __init__(self, source: ArrowSource, tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization) -> None:
        super().__init__(source, tokenizer, max_text_len, transform, norm, items_column="questions", items="sentences")
        answers = source.column("answers")
        answer_counts = list_lengths(answers)
        bad = np.flatnonzero(self.counts != answer_counts)
        if len(bad):
            self.fail(int(bad[0]), f"{self.counts[bad[0]]} sentences but {answer_counts[bad[0]]} answers; "
                      "ViLT's write_nlvr2.py writes one answer per sentence.")
        flat = pc.list_flatten(answers)
        valid = numbers(pc.is_in(flat, value_set=pa.array(ANSWERS, pa.string())), False).astype(bool)
        bad = np.flatnonzero(~valid)
        if len(bad):
            row, slot = int(self.rows[bad[0]]), int(self.slots[bad[0]])
            path, local = source.locate(row)
            cells = source.row(row, ("answers", "identifier"))
            raise RenError(f"{path} row {local} ({cells['identifier']}): answers[{slot}] = "
                           f"{cells['answers'][slot]!r}, but NLVR2 answers are the strings \"True\" and \"False\". "
                           f"Answers that are neither: {len(bad)} of {len(self.rows)} in {self.paths}.")
        self.labels = numbers(pc.equal(flat, ANSWERS[1])).astype(np.int64)

    def _pair(self, row: int) -> tuple[Tensor, Tensor] | None:
        first = self.source.image(row, "image_0")
        if first is None:
            return None
        second = self.source.image(row, "image_1")
        return None if second is None else (self.transform(first), self.transform(second))

    def _item_pair(self, row: int, index: int, pairs: dict[int, tuple[Tensor, Tensor] | None]
                   ) -> tuple[Tensor, Tensor] | None:
        """Row ``row``'s pair for item ``index``: shared by the batch's items of that row (``pairs``) until the
        trainer sets the epoch, then the item's own, both images transformed under its seed (one generator,
        so the two draw differently; see :meth:`~engine.data.images.ItemDraws.item_image`)."""
        seed = self.item_seed(index)
        if seed is not None:
            with draws_from(seed):
                return self._pair(row)
        if row not in pairs:
            pairs[row] = self._pair(row)
        return pairs[row]

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor | list[str]]:
        pairs: dict[int, tuple[Tensor, Tensor] | None] = {}
        cells: dict[int, dict] = {}
        texts, kept, identifiers, left, right = [], [], [], [], []
        for index in indices:
            row, slot = int(self.rows[index]), int(self.slots[index])
            pair = self._item_pair(row, index, pairs)
            if pair is None:
                continue
            if row not in cells:
                cells[row] = self.source.row(row, ("questions", "identifier"))
            texts.append(cells[row]["questions"][slot])
            identifiers.append(f"{cells[row]['identifier']}#{slot}")
            kept.append(index)
            left.append(pair[0])
            right.append(pair[1])
        if not texts:
            path = self.source.locate(int(self.rows[indices[0]]))[0]
            raise RenError(f"Every image pair of a batch of {len(indices)} NLVR2 sentences had an unreadable image "
                           f"({self.source.skipped_images} skipped so far) in {path}.")
        return {**self.encode(texts),
                "pixel_values_0": self.norm.apply(torch.stack(left)),
                "pixel_values_1": self.norm.apply(torch.stack(right)),
                "labels": torch.as_tensor(self.labels[kept], dtype=torch.int64), "identifiers": identifiers,
                "items": torch.as_tensor(kept, dtype=torch.int64)}
