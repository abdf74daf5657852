"""Tiny model configs of every architecture, built offline, and a padded batch to feed them."""

from __future__ import annotations

import torch

from engine.config import config_from_dict
from engine.models import build_model

VOCAB = 60
B, L = 3, 8
N_ANSWERS = 7

TINY = {"hidden_size": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0}
FUSION = {"hidden_size": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0}
PRETRAIN = {"objectives": {"mlm": {}, "itm": {}}}
PRETRAIN_ITC = {"objectives": {"mlm": {}, "itm": {}, "itc": {}}}


def one_tower(modality: str = "text", pooler: str = "single", **backbone):
    return {"kind": "one_tower", "pooler": pooler,
            "backbone": {**TINY, "modality": modality, "patch_size": 8, "image_size": 32,
                         "max_text_positions": 16, **backbone}}


def two_tower(text=None, vision=None):
    return {"kind": "two_tower",
            "text": text or {**TINY, "max_positions": 16},
            "vision": vision or {**TINY, "patch_size": 8, "image_size": 32},
            "fusion": FUSION}


def dual_encoder():
    return {"kind": "dual_encoder", "text": {**TINY, "max_positions": 16},
            "vision": {**TINY, "patch_size": 8, "image_size": 32}, "projection_dim": 16}


TIMM_VISION = {"library": "timm", "source": "random", "name": "resnet18", "image_size": 64}


def make(model: dict, stage: dict | None = None, seed: int = 0):
    cfg = config_from_dict({"model": model, **(stage or PRETRAIN)})
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=VOCAB, num_answers=N_ANSWERS if "task" in (stage or {}) else None)


def inputs(b: int = B, length: int = L, image_size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, length - 3:] = 0  # row 0 is padded
    ids[0, length - 3:] = 0
    return ids, mask, torch.randn(b, 3, image_size, image_size, generator=g)


def mlm_positions(mask: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros_like(mask, dtype=torch.bool)
    pos[:, 1] = True
    pos[1, 3] = True
    return pos


ALL_KINDS = {
    "one_tower_text": (lambda: one_tower("text"), PRETRAIN),
    "one_tower_vision_double": (lambda: one_tower("vision", "double"), {"task": {}}),
    "one_tower_vision_fresh": (lambda: one_tower("vision", embeddings="fresh"), PRETRAIN),
    "two_tower": (two_tower, PRETRAIN_ITC),
    "two_tower_timm": (lambda: two_tower(vision=TIMM_VISION), PRETRAIN_ITC),
    "dual_encoder": (dual_encoder, {"objectives": {"itc": {}}}),
}
