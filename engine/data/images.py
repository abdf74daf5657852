"""Decoded images to model-sized uint8 tensors, for data sets read from files.

Evaluation view (short side resized, centre crop, as METER and CLIP), ``data.augment``'s RandAugment and
ALBEF's random crop, never a flip; referring expressions see the whole image (:func:`whole_image_transform`).
Normalisation happens per batch. The references and choices: docs/PROTOCOLS.md, "Augmentation".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

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
