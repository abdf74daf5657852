"""Image transforms for file-backed data sets."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.data.images import image_transform


def three_bands(width: int = 300, height: int = 100) -> Image.Image:
    """Red left third, green middle third, blue right third."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    pixels[:, :third, 0] = 255
    pixels[:, third:2 * third, 1] = 255
    pixels[:, 2 * third:, 2] = 255
    return Image.fromarray(pixels)


def test_eval_resizes_the_short_side_and_takes_the_centre() -> None:
    out = image_transform(64, train=False)(three_bands())
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    green = out[1].float().mean()
    assert green > 200 and out[0].float().mean() < 30 and out[2].float().mean() < 30  # only the middle band
    assert torch.equal(out, image_transform(64, train=False)(three_bands()))  # deterministic


def test_augment_none_trains_on_the_evaluation_view() -> None:
    image = three_bands(300, 240)
    expected = image_transform(48, train=False)(image)
    for seed in range(5):  # no random crop (ViLT and METER finetune without one): the same pixels every time
        torch.manual_seed(seed)
        assert torch.equal(image_transform(48, train=True)(image), expected)
        assert torch.equal(image_transform(48, train=True, augment="none")(image), expected)


def test_crop_crops_at_random_and_never_flips() -> None:
    transform = image_transform(48, train=True, augment="crop")
    crops = []
    for seed in range(20):
        torch.manual_seed(seed)
        crop = transform(three_bands(300, 240))
        assert crop.shape == (3, 48, 48) and crop.dtype == torch.uint8
        red_cols = (crop[0] > 128).float().mean(dim=0)
        blue_cols = (crop[2] > 128).float().mean(dim=0)
        red_at = torch.nonzero(red_cols > 0.5).flatten()
        blue_at = torch.nonzero(blue_cols > 0.5).flatten()
        if len(red_at) and len(blue_at):
            assert red_at.max() < blue_at.min()  # red stays left of blue
        crops.append(crop)
    assert len({(c[0] > 128).float().mean().item() for c in crops}) > 5  # the crops differ


def test_randaugment_changes_pixels_not_shape() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    torch.manual_seed(0)
    plain = image_transform(64, train=True)(image)
    torch.manual_seed(0)
    augmented = image_transform(64, train=True, augment="randaugment")(image)
    assert augmented.shape == plain.shape == (3, 64, 64)
    assert not torch.equal(plain, augmented)
    assert torch.equal(image_transform(64, train=False, augment="randaugment")(image), plain)  # never in evaluation



def test_whole_image_transform_squeezes_without_cropping() -> None:
    from engine.data.images import whole_image_transform

    out = whole_image_transform(30)(three_bands(300, 100))
    assert out.shape == (3, 30, 30)
    assert out[0, :, :9].float().mean() > 200 and out[1, :, 11:19].float().mean() > 200  # all three bands stay
    assert out[2, :, 21:].float().mean() > 200
