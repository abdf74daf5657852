"""Pixel normalisation follows the vision backbone (data.image_norm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import load_preset
from engine.data.transforms import NORMS, resolve_normalization
from engine.errors import ConfigError
from tests.helpers.paths import PRESETS, REPO

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"


def test_named_choices_override_the_lookup() -> None:
    for name in ("imagenet", "clip", "half"):
        norm = resolve_normalization(load_preset(PRESETS / "quickstart.toml", [f'data.image_norm="{name}"']))
        assert (norm.mean, norm.std, norm.source) == (*NORMS[name], name)


def test_towers_trained_from_scratch_use_half() -> None:
    assert resolve_normalization(load_preset(PRESETS / "quickstart.toml")).source == "half"  # manual + random timm
    assert resolve_normalization(load_preset(ONE_TOWER)).source == "half"


def test_a_pretrained_hf_tower_brings_its_processor_statistics() -> None:
    norm = resolve_normalization(load_preset(PRESETS / "electra_deit_two_tower_pretrain.toml"))
    assert norm.mean == (0.485, 0.456, 0.406) and norm.std == (0.229, 0.224, 0.225)
    assert norm.source.endswith("preprocessor_config.json")  # read from the (offline) hub cache
    one_tower = resolve_normalization(load_preset(PRESETS / "deit_one_tower_pretrain.toml"))
    assert one_tower.mean == norm.mean
    text_backbone = resolve_normalization(load_preset(PRESETS / "electra_one_tower_pretrain.toml"))
    assert text_backbone.source == "half"  # a text backbone's image embedding is fresh


def test_a_local_directory_with_and_without_a_processor_config(tmp_path: Path) -> None:
    cache = Path(next((REPO / "tests/fixtures/hf_cache").glob("models--facebook--deit-tiny-patch16-224/snapshots/*")))
    model = tmp_path / "vit"
    model.mkdir()
    (model / "config.json").write_text((cache / "config.json").read_text())
    overrides = ['model.vision.source="pretrained"', f'model.vision.name="{model}"', "model.vision.image_size=224",
                 'model.vision.library="hf"']
    cfg = load_preset(PRESETS / "quickstart.toml", overrides)
    with pytest.raises(ConfigError, match="has no preprocessor_config.json.*data.image_norm"):
        resolve_normalization(cfg)
    (model / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                "image_std": [0.2, 0.2, 0.2]}))
    assert resolve_normalization(cfg).mean == (0.5, 0.4, 0.3)


def test_timm_towers_use_timm_statistics() -> None:
    base = ['model.vision.source="pretrained"', 'model.vision.library="timm"']
    resnet = resolve_normalization(load_preset(PRESETS / "quickstart.toml", [*base, 'model.vision.name="resnet50"']))
    assert resnet.mean == NORMS["imagenet"][0] and resnet.source == "timm:resnet50"
    clip = resolve_normalization(load_preset(
        PRESETS / "quickstart.toml", [*base, 'model.vision.name="vit_base_patch16_clip_224.openai@/w.safetensors"']))
    assert clip.mean == pytest.approx(NORMS["clip"][0]) and clip.source == "timm:vit_base_patch16_clip_224.openai"


def test_apply_maps_uint8_through_mean_and_std() -> None:
    norm = resolve_normalization(load_preset(PRESETS / "quickstart.toml", ['data.image_norm="imagenet"']))
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = norm.apply(images)
    mean, std = torch.tensor(norm.mean).view(3, 1, 1), torch.tensor(norm.std).view(3, 1, 1)
    assert torch.allclose(out[0], (-mean / std).expand(3, 2, 2))
    assert torch.allclose(out[1], ((1 - mean) / std).expand(3, 2, 2))
    half = resolve_normalization(load_preset(PRESETS / "quickstart.toml"))
    assert half.apply(images).min() == -1.0 and half.apply(images).max() == 1.0
