"""Freezing by named layer groups.

The builder names every parameter group (``text.embeddings``, ``vision.layers[3]``, ``heads.vqa``, ...);
a freeze spec is a list of patterns over those names (exact, prefix, glob or slice), which
:func:`apply_freeze` applies, returning a :class:`FreezeReport`. Pattern forms and what freezing saves:
docs/presets-guide.md, "Freezing".
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from engine.config import FreezeConfig
from engine.errors import ConfigError

_SLICE = re.compile(r"^(?P<head>.*)\[(?P<start>\d*):(?P<stop>\d*)\](?P<tail>.*)$")
_INDEXED = re.compile(r"^(?P<head>.*)\[(?P<index>\d+)\](?P<tail>.*)$")


@dataclass(frozen=True)
class GroupReport:
    name: str
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass(frozen=True)
class FreezeReport:
    groups: tuple[GroupReport, ...]

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups)

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def by_prefix(self) -> dict[str, tuple[int, int]]:
        """(total, trainable) per top-level part: ``text``, ``vision``, ``fusion``, ``heads``..."""
        out: dict[str, tuple[int, int]] = {}
        for g in self.groups:
            key = g.name.split(".")[0]
            total, trainable = out.get(key, (0, 0))
            out[key] = (total + g.total, trainable + g.trainable)
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "frozen": self.frozen,
            "groups": {g.name: {"total": g.total, "trainable": g.trainable} for g in self.groups},
        }


def matches(pattern: str, name: str) -> bool:
    """Whether a freeze pattern selects the group ``name``."""
    if pattern == name or name.startswith((pattern + ".", pattern + "[")):
        return True
    sliced = _SLICE.match(pattern)
    if sliced:
        indexed = _INDEXED.match(name)
        if not indexed or not _glob(sliced["head"], indexed["head"]) or not _glob(sliced["tail"], indexed["tail"]):
            return False
        i = int(indexed["index"])
        start = int(sliced["start"]) if sliced["start"] else 0
        stop = int(sliced["stop"]) if sliced["stop"] else None
        return i >= start and (stop is None or i < stop)
    return _glob(pattern, name)


def _glob(pattern: str, name: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name) is not None


def select(patterns: tuple[str, ...], names: list[str], key: str) -> set[str]:
    """The group names selected by ``patterns``; a pattern matching nothing is an error."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if matches(pattern, n)}
        if not hits:
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            tops = sorted({n.split("[")[0] for n in names})
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(
                f"{key}: pattern {pattern!r} matches no layer group of this model.{hint} "
                f"Groups are: {', '.join(tops)} (run `ren validate` to list them all)."
            )
        chosen |= hits
    return chosen


def apply_freeze(model: nn.Module, spec: FreezeConfig) -> FreezeReport:
    """Set ``requires_grad`` from ``spec`` over ``model.groups()`` and report the counts.

    Groups listed in ``spec.groups`` are frozen, then those in ``spec.unfreeze``
    are made trainable again; everything else is trainable.
    """
    groups = model.groups()
    names = list(groups)
    frozen = select(spec.groups, names, "freeze.groups") - select(spec.unfreeze, names, "freeze.unfreeze")
    for name, modules in groups.items():
        for module in modules:
            module.requires_grad_(name not in frozen)
    model.frozen_modules = [m for name in names if name in frozen for m in groups[name]]
    model.train(model.training)
    return report(model)


def report(model: nn.Module) -> FreezeReport:
    """Parameter counts per group as the model stands now."""
    seen: set[int] = set()
    rows = []
    for name, modules in model.groups().items():
        total = trainable = 0
        for module in modules:
            for p in module.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        rows.append(GroupReport(name, total, trainable))
    return FreezeReport(tuple(rows))
