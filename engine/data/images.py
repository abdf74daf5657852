"""Decoded images to model-sized uint8 tensors, for data sets read from files.

Evaluation view (short side resized, centre crop, as METER and CLIP), ``data.augment``'s RandAugment and
ALBEF's random crop, never a flip; referring expressions see the whole image (:func:`whole_image_transform`).
Normalisation happens per batch. The references and choices: docs/PROTOCOLS.md, "Augmentation".

A training set's random draws are each item's own (:class:`ItemDraws`): torchvision's transforms draw from
torch's global generator and take none of their own, so each item's transform runs with that generator seeded
by (run seed, epoch, item index) (:func:`draws_from`), and a resumed run augments as the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

if TYPE_CHECKING:
    from engine.data.arrow import ImageRows

TRAIN_CROP_SCALE = (0.5, 1.0)
RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE = 2, 9

Augment = Literal["none", "randaugment", "crop", "crop+randaugment"]
AUGMENTS: tuple[Augment, ...] = ("none", "randaugment", "crop", "crop+randaugment")
ImageTransform = Callable[[Image.Image], Tensor]


def image_transform(size: int, *, train: bool, augment: Augment = "none") -> ImageTransform:
    """A PIL RGB image -> ``(3, size, size)`` uint8 tensor; ``augment`` applies when ``train``."""
    augment = augment if train else "none"
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    randaugment = [v2.RandAugment(num_ops=RANDAUGMENT_OPS, magnitude=RANDAUGMENT_MAGNITUDE)]
    if augment.startswith("crop"):
        steps = [v2.RandomResizedCrop(size, scale=TRAIN_CROP_SCALE, antialias=True)]
        steps += randaugment if augment == "crop+randaugment" else []
    else:
        steps = (randaugment if augment == "randaugment" else []) + [v2.Resize(size, antialias=True),
                                                                      v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps])


def whole_image_transform(size: int) -> ImageTransform:
    """A PIL RGB image -> ``(3, size, size)`` uint8 tensor of the whole image (aspect not kept)."""
    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])


@contextmanager
def draws_from(seed: int | None) -> Iterator[None]:
    """Inside, torch's global CPU generator (which torchvision's transforms draw from) is seeded with ``seed``;
    afterwards it is as it was, so what runs inside neither depends on nor moves the draws around it. ``None``
    leaves the generator alone. CUDA generators are not touched: the transforms run on the CPU."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class ItemDraws:
    """For a training set whose items draw at random (the augmentation of ``data.augment``): once the trainer
    sets the epoch with :meth:`use_epoch`, :meth:`item_seed` gives each item the seed of its own draws, a pure
    function of (run seed, epoch, item index), as fairseq seeds an item's masking by (seed, epoch, index)
    (``fairseq/data/mask_tokens_dataset.py``). An item's augmentation then depends neither on the items
    drawn before it in the process, nor on its batch, the DataLoader worker that loads it or the number of
    processes; a run resumed mid-epoch augments as the uninterrupted run did. Without an epoch set (evaluation
    sets, a data set read outside the trainer) the seed is None: the transform draws from the global
    generator as it stands. The epoch must be set before the loader's iterator is created: its workers take
    a copy of the data set then."""

    _draws: tuple[int, int] | None = None  # (run seed, epoch)

    def use_epoch(self, seed: int, epoch: int) -> None:
        self._draws = (seed, epoch)

    def item_seed(self, index: int) -> int | None:
        """The seed of item ``index``'s draws in the epoch set; None before :meth:`use_epoch`."""
        if self._draws is None:
            return None
        seed, epoch = self._draws
        key = f"item/{seed}/{epoch}/{index}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

    def item_image(self, source: ImageRows, row: int, index: int, transform: Callable[[Image.Image], Any],
                   cache: dict[tuple[int, str], Any], column: str = "image") -> Any | None:
        """Row ``row``'s image (``column``) through ``transform`` for item ``index``; None when unreadable.
        Before an epoch is set, through ``source.transformed_image`` and its per-batch ``cache``: the items of
        a batch that show one image share one transform of it. After, each item's transform is its own,
        under :func:`draws_from` its :meth:`item_seed` (the image is decoded for each item: in a shuffled
        training batch two items rarely share one)."""
        seed = self.item_seed(index)
        if seed is None:
            return source.transformed_image(row, transform, cache, column)
        with draws_from(seed):
            return source.transformed_image(row, transform, {}, column)
