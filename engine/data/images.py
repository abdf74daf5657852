"""Decoded images to model-sized uint8 tensors, for data sets read from files.

Evaluation resizes the shorter side to the model's image size and takes the
centre crop (as METER and CLIP do). Training takes a random crop of 50-100% of
the image area, resized to the image size (ALBEF's crop), and optionally
RandAugment (2 operations of magnitude 9, as ViLT and ALBEF use). Nothing
flips images: "left" and "right" in questions and captions must stay true.
Referring expressions (:func:`whole_image_transform`) see the whole image
resized to a square, so that every candidate box stays in view and keeps its
place relative to the image.
Normalisation happens per batch, with :class:`engine.data.transforms.Normalization`.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

TRAIN_CROP_SCALE = (0.5, 1.0)
RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE = 2, 9

ImageTransform = Callable[[Image.Image], Tensor]


def image_transform(size: int, *, train: bool, randaugment: bool = False) -> ImageTransform:
    """A PIL RGB image -> ``(3, size, size)`` uint8 tensor."""
    if train:
        steps: list = [v2.RandomResizedCrop(size, scale=TRAIN_CROP_SCALE, antialias=True)]
        if randaugment:
            steps.append(v2.RandAugment(num_ops=RANDAUGMENT_OPS, magnitude=RANDAUGMENT_MAGNITUDE))
    else:
        steps = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps])


def whole_image_transform(size: int) -> ImageTransform:
    """A PIL RGB image -> ``(3, size, size)`` uint8 tensor of the whole image (aspect not kept)."""
    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
