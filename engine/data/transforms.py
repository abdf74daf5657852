"""Pixel normalisation that matches the vision backbone.

A pretrained vision tower was trained on images normalised with its own
per-channel mean and std (ImageNet's for DeiT and most timm models, 0.5/0.5
for Google's ViT, CLIP's for CLIP towers); feeding it other statistics shifts
every input. ``data.image_norm = "auto"`` reads them where the backbone keeps
them: an HF model's ``preprocessor_config.json`` (``image_mean``/``image_std``)
or a timm model's pretrained config. Towers trained from scratch (manual or
random) and the fresh image embedding of a text backbone use 0.5/0.5. The
named choices ``imagenet``, ``clip`` and ``half`` override the lookup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from engine.config import RunConfig
from engine.errors import ConfigError, ModelLoadError
from engine.hub import hub_kwargs
from engine.recipes import image_statistics, is_ren_model

NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / 255 - mean) / std`` for uint8 images, and where it came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = "half"

    def apply(self, images_u8: Tensor) -> Tensor:
        """``(B, 3, H, W)`` uint8 -> float32, normalised."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return images_u8.float().div_(255.0).sub_(mean).div_(std)


HALF = Normalization(*NORMS["half"], source="half")


def resolve_normalization(cfg: RunConfig) -> Normalization:
    """The normalisation ``cfg.data.image_norm`` asks for (see the module docstring)."""
    choice = cfg.data.image_norm
    if choice != "auto":
        return Normalization(*NORMS[choice], source=choice)
    model = cfg.model
    if model.kind == "one_tower":
        tower, library, key = model.backbone, "hf", "model.backbone.name"
        if _backbone_modality(tower.modality, tower.name, key) == "text":
            return HALF  # the image embedding is fresh: nothing to match
    else:
        tower, library, key = model.vision, model.vision.library, "model.vision.name"
    if tower.source != "pretrained" or tower.name is None:
        return HALF
    if library == "timm":
        return _timm_normalization(tower.name, key)
    return _hf_normalization(tower.name, key)


def _backbone_modality(modality: str | None, name: str | None, key: str) -> str:
    """A one-tower backbone's modality: as set, else read from its config."""
    if modality is not None or name is None:
        return modality or "text"
    from engine.backbones import load_hf_config, modality_of

    return modality_of(load_hf_config(name, key))


def _timm_normalization(name: str, key: str) -> Normalization:
    import timm

    arch = name.split("@", 1)[0]  # "resnet50@/path/weights.safetensors": local weights of an architecture
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not getattr(cfg, "mean", None):
        raise ConfigError(
            f"{key} = {name!r}: timm has no pretrained config with image statistics for {arch!r}; "
            "set data.image_norm to \"imagenet\", \"clip\" or \"half\"."
        )
    return Normalization(tuple(cfg.mean), tuple(cfg.std), source=f"timm:{arch}")


def _hf_normalization(name: str, key: str) -> Normalization:
    if is_ren_model(name):  # a model ren builds: the statistics it is (or will be) trained with
        mean, std = image_statistics(name)
        return Normalization(mean, std, source=name)
    local = Path(name).expanduser()
    if local.is_dir():
        path: Path | None = local / PROCESSOR_FILE if (local / PROCESSOR_FILE).exists() else None
    else:
        path = _hub_file(name, key)
    if path is None:
        raise ConfigError(
            f"{key} = {name!r} has no {PROCESSOR_FILE}, so its image statistics are unknown; set "
            "data.image_norm to \"imagenet\" (DeiT, BEiT, Swin, most CNNs), \"clip\" (CLIP towers) or "
            "\"half\" (Google's ViT)."
        )
    try:
        processor = json.loads(path.read_text())
        mean, std = processor["image_mean"], processor["image_std"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot read image_mean/image_std from {path}: {exc}.") from exc
    if len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"{path}: expected three image_mean and image_std values, got {mean} and {std}.")
    return Normalization(tuple(map(float, mean)), tuple(map(float, std)), source=str(path))


def _hub_file(name: str, key: str) -> Path | None:
    """The hub (or hub cache) copy of the model's processor config; None when it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name, PROCESSOR_FILE, **hub_kwargs(name)))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{key} = {name!r}: {PROCESSOR_FILE} is not in the local hub cache and the hub cannot be "
            "reached; download the model directory once and point the preset at it, or set "
            "data.image_norm explicitly."
        ) from exc
