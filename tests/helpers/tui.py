"""The TUI on a test's store: a :class:`RenApp` that starts no queue worker, and a fake model inspector
that answers from quickstart's fixed layer-group table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import config_from_dict
from engine.errors import ConfigError
from engine.freeze import select
from engine.store import Store
from ren_tui.app import RenApp
from ren_tui.backend import Backend

GROUPS = {  # quickstart's model, as the real inspector reports it
    "text.embeddings": 8960, "text.layers[0]": 132480, "text.layers[1]": 132480, "text.final": 0,
    "vision.embeddings": 7472, "vision.layers[0]": 18560, "vision.layers[1]": 36384, "vision.layers[2]": 42432,
    "vision.layers[3]": 267840, "vision.final": 0, "fusion.proj": 29184, "fusion.layers[0]": 398080,
    "fusion.layers[1]": 398080, "fusion.final": 512, "pooler": 33024, "heads.task": 139277,
}


class FakeInspector:
    """Answers as ``engine.inspector`` does, from the fixed group table (10 FLOPs per
    parameter): validation and freeze patterns are the engine's own."""

    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []

    def start(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def inspect(self, config: dict[str, Any]) -> dict[str, Any]:
        self.configs.append(config)
        try:
            cfg = config_from_dict(config)
            names = list(GROUPS)
            frozen = select(cfg.freeze.groups, names, "freeze.groups") - select(cfg.freeze.unfreeze, names, "")
        except ConfigError as exc:
            return {"id": None, "ok": False, "error": str(exc), "key": exc.key or str(exc).split(":")[0]}
        groups = {n: {"total": t, "trainable": 0 if n in frozen else t} for n, t in GROUPS.items()}
        total = sum(GROUPS.values())
        trainable = sum(g["trainable"] for g in groups.values())
        flops = {n: 10 * t for n, t in GROUPS.items()}
        return {"id": None, "ok": True, "config": cfg.to_dict(),
                "params": {"total": total, "trainable": trainable, "frozen": total - trainable, "groups": groups},
                "frozen_groups": [n for n in names if n in frozen],
                "flops_per_sample": {"forward": sum(flops.values()), "train": 3 * sum(flops.values()),
                                     "groups": flops}}


def make_app(ren_home: Path, inspector: Any = None) -> RenApp:
    """The app on the store at ``ren_home`` with no queue worker; ``inspector`` stands in for the real one."""
    backend = Backend(Store(ren_home), start_worker=False)
    if inspector is not None:
        backend.inspector = inspector
    return RenApp(backend)
