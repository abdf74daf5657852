"""Placement: which queued runs start now, and on which GPUs. Pure functions only.

The queue is first-come first-served: a run that does not fit yet holds back the
runs behind it, so a 4-GPU run is not starved by a stream of 1-GPU runs. Runs
waiting for another run (``--after``) or asking for more GPUs than the queue may
ever use step aside instead of stalling the queue, and every waiting run gets a
reason that ``ren queue ls`` and the TUI show.

On a machine without GPUs each run takes CPU slots (one per process) and runs with
no visible GPU; a run of more processes than ``cpu_slots`` waits (``ren queue add``
refuses one), it is never squeezed into fewer slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.jobs.gpus import GPU
from engine.store import QueueSettings, RunRecord

_DEAD = ("failed", "cancelled", "crashed")

# The values each numeric queue setting may take: (lowest, highest). A value outside
# can only be a mistake (a NaN grace period never expires, a poll of a nanosecond spins the worker).
SETTING_RANGES: dict[str, tuple[float, float]] = {
    "cpu_slots": (1, 1024),
    "runs_per_gpu": (1, 64),
    "foreign_memory_mb": (0, 10_000_000),
    "cancel_grace_s": (0.1, 7 * 24 * 3600),
    "log_max_mb": (0.01, 100_000),
    "log_backups": (0, 1000),
    "poll_s": (0.05, 3600),
}


def setting_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be queue setting ``key`` (None when it can)."""
    if key == "paused":
        return None if isinstance(value, bool) else "expected true or false"
    if key == "allow_gpus":
        if value is None:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return "it must list GPU indices 0, 1, ... (nvidia-smi numbering), e.g. allow_gpus=0,1"
        return "it lists a GPU twice" if len(set(value)) != len(value) else None
    if key not in SETTING_RANGES:
        return None
    if value is None:
        return None if key == "foreign_memory_mb" else "it cannot be none"
    low, high = SETTING_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high:
        return f"it must be a finite number from {low:g} to {high:g}"
    return None


def sane_settings(settings: QueueSettings, say: Callable[[str], None] = lambda _: None) -> QueueSettings:
    """``settings`` with each unusable value (stored by an older version, or by hand) replaced by its
    default, which ``say`` reports."""
    defaults, changes = QueueSettings(), {}
    for f in dataclasses.fields(QueueSettings):
        value = getattr(settings, f.name)
        problem = setting_problem(f.name, value)
        if problem is not None:
            changes[f.name] = getattr(defaults, f.name)
            say(f"queue setting {f.name} = {value!r} is not usable ({problem}); using {changes[f.name]!r}")
    return dataclasses.replace(settings, **changes) if changes else settings


@dataclass(frozen=True)
class Placement:
    run_id: str
    devices: tuple[int, ...]  # GPU indices; () for a CPU run


@dataclass
class Plan:
    start: list[Placement] = field(default_factory=list)
    doomed: dict[str, str] = field(default_factory=dict)  # run id -> why it can never start
    waiting: dict[str, str] = field(default_factory=dict)  # run id -> why it has not started yet


def usable_gpus(gpus: Sequence[GPU], settings: QueueSettings) -> list[GPU]:
    """The GPUs the queue may use (the allow-list applied)."""
    allowed = settings.allow_gpus
    return [g for g in gpus if allowed is None or g.index in allowed]


def gpu_capacity(gpus: Sequence[GPU], active: Sequence[RunRecord], settings: QueueSettings) -> dict[int, int]:
    """Free run slots per usable GPU: ``runs_per_gpu`` minus the ren runs on it; a GPU no
    ren run holds has none when foreign processes take more than ``foreign_memory_mb``."""
    load: dict[int, int] = {}
    for record in active:
        for index in record.devices:
            load[index] = load.get(index, 0) + 1
    capacity = {}
    for gpu in usable_gpus(gpus, settings):
        held = load.get(gpu.index, 0)
        foreign = settings.foreign_memory_mb is not None and gpu.memory_used_mb > settings.foreign_memory_mb
        capacity[gpu.index] = 0 if held == 0 and foreign else max(settings.runs_per_gpu - held, 0)
    return capacity


def plan(queued: Sequence[RunRecord], active: Sequence[RunRecord], gpus: Sequence[GPU],
         settings: QueueSettings, status_of: Mapping[str, str]) -> Plan:
    """What to start now. ``queued`` is in queue order, ``active`` the runs the queue is
    running, ``gpus`` the visible GPUs, ``status_of`` maps run ids to their status."""
    result = Plan()
    gpu_mode = bool(gpus)
    capacity = gpu_capacity(gpus, active, settings) if gpu_mode else {}
    cpu_free = settings.cpu_slots - sum(r.gpus for r in active if not r.devices)
    blocker: str | None = None
    for record in queued:
        deps = [(dep, status_of.get(dep, "missing")) for dep in record.after]
        dead = [f"{dep} ({status})" for dep, status in deps if status in (*_DEAD, "missing")]
        if dead:
            result.doomed[record.id] = f"the run it waits for ended without finishing: {', '.join(dead)}"
            continue
        pending = [dep for dep, status in deps if status != "finished"]
        if pending:
            result.waiting[record.id] = f"waiting for {', '.join(pending)}"
            continue
        if gpu_mode and record.gpus > len(capacity):
            result.waiting[record.id] = (f"needs {record.gpus} GPUs; the queue may use {len(capacity)} "
                                         "(see `ren queue config allow_gpus`)")
            continue
        if not gpu_mode and record.gpus > settings.cpu_slots:  # one process per slot, never squeezed
            result.waiting[record.id] = (f"needs {record.gpus} CPU slots (one per process); the queue has "
                                         f"{settings.cpu_slots} (see `ren queue config cpu_slots`)")
            continue
        if blocker is not None:
            result.waiting[record.id] = f"behind {blocker}"
            continue
        if settings.paused:
            result.waiting[record.id] = "the queue is paused"
            continue
        if gpu_mode:
            free = sorted((idx for idx, cap in capacity.items() if cap > 0), key=lambda i: (-capacity[i], i))
            if len(free) < record.gpus:
                result.waiting[record.id] = f"needs {record.gpus} free GPU(s), {len(free)} free"
                blocker = record.id
                continue
            devices = tuple(sorted(free[: record.gpus]))
            for idx in devices:
                capacity[idx] -= 1
        else:
            need = record.gpus
            if cpu_free < need:
                result.waiting[record.id] = f"needs {need} CPU slot(s), {max(cpu_free, 0)} free"
                blocker = record.id
                continue
            cpu_free -= need
            devices = ()
        result.start.append(Placement(record.id, devices))
    return result
