"""The common part of the arrow task data sets (VQAv2, NLVR2, SNLI-VE, RefCOCO): a row of an arrow file holds
several items (questions, sentences, pairs), and item ``i`` is slot ``slots[i]`` of row ``rows[i]``."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, expand_items, list_lengths
from engine.data.images import ImageTransform, ItemDraws
from engine.data.transforms import Normalization
from engine.errors import RenError


@dataclass(frozen=True)
class ItemView:
    """One item as a person looks at it: its text, where its image is, and the image(s) (NLVR2: two; none when
    unreadable)."""

    text: str
    image: str
    pictures: tuple[Image.Image, ...]


class ArrowItems(ItemDraws, Dataset):
    """Items of one arrow source, expanded from the list column ``items_column`` (subclasses check their own
    columns after this constructor and build batches in ``__getitems__``; an item's image comes from
    :meth:`~engine.data.images.ItemDraws.item_image`, its augmentation seeded once the trainer sets the epoch)."""

    def __init__(self, source: ArrowSource, tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization, *, items_column: str, items: str) -> None:
        self.source, self.tokenizer, self.max_text_len = source, tokenizer, max_text_len
        self.transform, self.norm = transform, norm
        self.paths = ", ".join(map(str, source.paths))
        if not len(source):
            raise RenError(f"{self.paths}: no rows.")
        self.items_column = items_column
        self.counts = list_lengths(source.column(items_column))
        self.rows, self.slots = expand_items(self.counts)
        if not len(self.rows):
            raise RenError(f"{self.paths}: no {items}.")

    def __len__(self) -> int:
        return len(self.rows)

    def item_text(self, cells: dict, slot: int) -> str:
        """Item ``slot``'s text among its row's ``cells`` (subclasses whose items are not a list of strings
        in ``items_column`` override it)."""
        return cells[self.items_column][slot]

    def describe(self, index: int) -> ItemView:
        """Item ``index``: its text, its file and row, and its row's image(s) as stored."""
        row, slot = int(self.rows[index]), int(self.slots[index])
        path, local = self.source.locate(row)
        text = self.item_text(self.source.row(row, (self.items_column,)), slot)
        pictures = tuple(self.source.image(row, column) for column in self.source.kind.image_columns)
        return ItemView(str(text), f"{path} row {local}",
                        () if any(p is None for p in pictures) else pictures)

    def fail(self, row: int, problem: str) -> None:
        """Raise the error for a bad row, naming its file and its row in that file."""
        path, local = self.source.locate(row)
        raise RenError(f"{path} row {local}: {problem}")

    def unreadable(self, indices: list[int], items: str) -> RenError:
        """The error for a batch whose every image was unreadable."""
        path = self.source.locate(int(self.rows[indices[0]]))[0]
        return RenError(f"Every image of a batch of {len(indices)} {items} was unreadable "
                        f"({self.source.skipped_images} skipped so far) in {path}.")

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """``input_ids`` and ``attention_mask`` of ``texts``, padded to the longest and cut at ``max_text_len``."""
        encoding = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                  return_tensors="pt")
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
