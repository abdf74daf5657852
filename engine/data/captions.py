"""Image-caption pretraining corpora from ViLT-format arrow files, mixed in one run.

Corpora (``data.corpora``): ``coco_caption``, ``vg``, ``f30k_caption``, ``cc``, ``sbu``. An item is one
caption; the corpora are concatenated as ViLT and METER mix them (each drawn in proportion to its captions),
and batches match :class:`~engine.data.datasets.CaptionDataset`'s, with one image id over all corpora.
Details: docs/tasks-and-data.md, "How each task reads its rows" and "Pretraining corpora".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, arrow_kind, expand_items, find_arrow_files, list_lengths, open_arrow
from engine.data.images import ImageTransform, ItemDraws
from engine.data.transforms import Normalization
from engine.errors import RenError

CORPORA = ("coco_caption", "vg", "f30k_caption", "cc", "sbu")


def open_corpus(root: Path | str, corpus: str, split: str) -> ArrowSource:
    """A corpus split; ``train``/``val``/``test`` mean what ViLT reads for them
    (e.g. coco_caption ``train`` is Karpathy train + restval)."""
    layout = arrow_kind(corpus)
    files = layout.vilt_splits.get(split, split)
    return open_arrow(find_arrow_files(root, corpus, files), corpus)


class ArrowCaptionDataset(ItemDraws, Dataset):
    """The captions of several corpora, concatenated (see the module docstring); a caption's image is
    augmented with draws of its own once the trainer sets the epoch (:class:`~engine.data.images.ItemDraws`)."""

    def __init__(self, sources: Sequence[ArrowSource], tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization) -> None:
        if not sources:
            raise RenError("No caption corpora were given (data.corpora is empty).")
        self.sources, self.tokenizer, self.max_text_len = list(sources), tokenizer, max_text_len
        self.transform, self.norm = transform, norm
        parts, image_offset = [], 0
        self.image_offsets = []
        for index, source in enumerate(self.sources):
            rows, slots = expand_items(list_lengths(source.column(source.kind.text_column)))
            parts.append(np.stack([np.full_like(rows, index), rows, slots], axis=1))
            self.image_offsets.append(image_offset)
            image_offset += len(source)
        self.items = np.concatenate(parts)
        if not len(self.items):
            raise RenError(f"The corpora {', '.join(s.kind.name for s in self.sources)} hold no captions.")

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        """Captions per corpus (what the concatenation mixes)."""
        per = np.bincount(self.items[:, 0], minlength=len(self.sources))
        return {source.kind.name: int(n) for source, n in zip(self.sources, per)}

    @property
    def skipped_images(self) -> int:
        return sum(source.skipped_images for source in self.sources)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        images: list[dict[tuple[int, str], Tensor | None]] = [{} for _ in self.sources]
        texts, pixels, image_ids = [], [], []
        for index in indices:
            corpus, row, slot = (int(v) for v in self.items[index])
            source = self.sources[corpus]
            pixel = self.item_image(source, row, index, self.transform, images[corpus])
            if pixel is None:
                continue
            texts.append(source.row(row, (source.kind.text_column,))[source.kind.text_column][slot])
            pixels.append(pixel)
            image_ids.append(self.image_offsets[corpus] + row)
        if not texts:
            raise RenError(f"Every image of a batch of {len(indices)} captions was unreadable "
                           f"({self.skipped_images} skipped so far).")
        encoding = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                  return_special_tokens_mask=True, return_tensors="pt")
        word_ids = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(len(texts))],
                                dtype=torch.int64)
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
                "special_tokens_mask": encoding["special_tokens_mask"], "word_ids": word_ids,
                "pixel_values": self.norm.apply(torch.stack(pixels)),
                "image_ids": torch.as_tensor(image_ids, dtype=torch.int64)}
