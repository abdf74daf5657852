"""In-memory map-style datasets for the training loop.

All preprocessing happens once, at construction: images are stored as one
uint8 ``(N, 3, S, S)`` tensor already resized to the model's image size, and
texts are tokenized into padded tensors. Fetching a batch is indexing, a float
conversion and normalisation (the vision backbone's mean and std, see
:mod:`engine.data.transforms`), and the text tensors are trimmed to the longest
sequence in the batch. :meth:`~torch.utils.data.Dataset.__getitems__` returns a whole batch as
a dict, so use ``DataLoader(dataset, batch_size=B, collate_fn=identity_collate)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from engine.data.items import ItemView
from engine.data.transforms import HALF, Normalization

_RESIZE_CHUNK = 256  # images resized per step, to bound the float32 working memory


def identity_collate(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """DataLoader ``collate_fn`` for these datasets: the batch is already a dict."""
    return batch


class _ImageTextDataset(Dataset):
    """Shared storage and batching: one text per item, each paired with one image."""

    def __init__(
        self,
        images_u8: np.ndarray,
        image_index: np.ndarray,
        texts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        max_text_len: int,
        image_size: int,
        *,
        with_word_ids: bool,
        norm: Normalization = HALF,
    ) -> None:
        if len(image_index) != len(texts):
            raise ValueError(f"{len(image_index)} image indices for {len(texts)} texts")
        self.images = _resize_images(images_u8, image_size)
        self.norm = norm
        self.image_index = torch.as_tensor(np.asarray(image_index), dtype=torch.int64)
        _check_range(self.image_index, len(self.images), "image indices")
        encoding = tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=max_text_len,
            padding_side="right",
            return_special_tokens_mask=with_word_ids,
            return_tensors="pt",
        )
        self.text: dict[str, Tensor] = {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
        }
        if with_word_ids:
            self.text["special_tokens_mask"] = encoding["special_tokens_mask"]
            self.text["word_ids"] = torch.tensor(
                [[-1 if word is None else word for word in encoding.word_ids(row)] for row in range(len(texts))],
                dtype=torch.int64,
            )
        self.lengths = encoding["attention_mask"].sum(dim=1)
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """One item, its text trimmed to its own length."""
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        """A batch: text trimmed to the batch's longest sequence, normalised pixels."""
        rows = torch.as_tensor(indices, dtype=torch.int64)
        length = int(self.lengths[rows].max())
        batch = {key: value[rows, :length] for key, value in self.text.items()}
        image_ids = self.image_index[rows]
        batch["pixel_values"] = self.norm.apply(self.images[image_ids])
        batch["image_ids"] = image_ids
        return batch


class VQADataset(_ImageTextDataset):
    """Question answering: one item per question.

    Batch keys: ``input_ids``, ``attention_mask`` (int64, B x L),
    ``pixel_values`` (float32, B x 3 x S x S), ``labels`` (float32 soft targets,
    B x num_answers; one-hot for easy-VQA), ``answer_ids`` (int64),
    ``image_ids`` (int64, the row in ``images_u8``) and ``items`` (int64, the items' indices).
    ``image_names``: where each image of ``images_u8`` comes from, for :meth:`describe`.
    """

    def __init__(
        self,
        images_u8: np.ndarray,
        image_index: np.ndarray,
        questions: Sequence[str],
        answer_ids: np.ndarray,
        num_answers: int,
        tokenizer: PreTrainedTokenizerBase,
        max_text_len: int,
        image_size: int,
        norm: Normalization = HALF,
        image_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            images_u8, image_index, questions, tokenizer, max_text_len, image_size, with_word_ids=False, norm=norm
        )
        if image_names is not None and len(image_names) != len(self.images):
            raise ValueError(f"{len(image_names)} image names for {len(self.images)} images")
        self.image_names = list(image_names) if image_names is not None else None
        self.answer_ids = torch.as_tensor(np.asarray(answer_ids), dtype=torch.int64)
        if len(self.answer_ids) != len(questions):
            raise ValueError(f"{len(self.answer_ids)} answers for {len(questions)} questions")
        _check_range(self.answer_ids, num_answers, "answer ids")
        self.num_answers = num_answers

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        """A batch, with the answers as ids and as soft-target vectors."""
        batch = super().__getitems__(indices)
        answer_ids = self.answer_ids[torch.as_tensor(indices, dtype=torch.int64)]
        batch["answer_ids"] = answer_ids
        batch["labels"] = F.one_hot(answer_ids, self.num_answers).float()
        batch["items"] = torch.as_tensor(indices, dtype=torch.int64)
        return batch

    def describe(self, index: int) -> ItemView:
        """Question ``index``, the name of its image (its row when unnamed) and the image as the model sees it
        (resized, before normalisation)."""
        row = int(self.image_index[index])
        name = self.image_names[row] if self.image_names is not None else f"image {row}"
        picture = Image.fromarray(self.images[row].permute(1, 2, 0).numpy())
        return ItemView(self.texts[index], name, (picture,))


class CaptionDataset(_ImageTextDataset):
    """Image-caption pretraining: one item per caption.

    Batch keys: ``input_ids``, ``attention_mask``, ``special_tokens_mask`` and
    ``word_ids`` (int64, B x L; ``word_ids`` is -1 on special and padding
    tokens, for whole-word masking), ``pixel_values`` (float32,
    B x 3 x S x S) and ``image_ids`` (int64, the row in ``images_u8``); with
    ``text_keys`` given, also ``text_keys`` (int64, B: captions with one key say
    the same thing, so ITM never takes one as the other's negative; without it the
    trainer keys captions by their tokens).
    """

    def __init__(
        self,
        images_u8: np.ndarray,
        image_index: np.ndarray,
        captions: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        max_text_len: int,
        image_size: int,
        norm: Normalization = HALF,
        *,
        text_keys: np.ndarray | None = None,
    ) -> None:
        super().__init__(images_u8, image_index, captions, tokenizer, max_text_len, image_size, with_word_ids=True,
                         norm=norm)
        if text_keys is not None and len(text_keys) != len(captions):
            raise ValueError(f"{len(text_keys)} text keys for {len(captions)} captions")
        self.text_keys = None if text_keys is None else torch.as_tensor(np.asarray(text_keys), dtype=torch.int64)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        batch = super().__getitems__(indices)
        if self.text_keys is not None:
            batch["text_keys"] = self.text_keys[torch.as_tensor(indices, dtype=torch.int64)]
        return batch


def _check_range(values: Tensor, upper: int, what: str) -> None:
    """Raise :class:`ValueError` unless every value lies in ``[0, upper)``."""
    if len(values) and not (0 <= int(values.min()) and int(values.max()) < upper):
        raise ValueError(f"{what} must lie in [0, {upper})")


def _resize_images(images_u8: np.ndarray, image_size: int) -> Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, S, S)`` uint8, bilinear with antialiasing."""
    images = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2)
    if images.shape[-2:] == (image_size, image_size):
        return images.contiguous()
    return torch.cat(
        [
            F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for chunk in images.split(_RESIZE_CHUNK)
        ]
    )
