"""Placement: which queued runs start now, and on which GPUs. Pure functions only.

The queue is first-come first-served: a run that does not fit yet holds back the
runs behind it, so a 4-GPU run is not starved by a stream of 1-GPU runs. Runs
waiting for another run (``--after``) or asking for more GPUs than the queue may
ever use step aside instead of stalling the queue, and every waiting run gets a
reason that ``ren queue ls`` and the TUI show.

On a machine without GPUs each run takes CPU slots (one per process, at most
``cpu_slots``) and runs with no visible GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine.gpus import GPU
from engine.store import QueueSettings, RunRecord

_DEAD = ("failed", "cancelled", "crashed")


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
    cpu_free = settings.cpu_slots - sum(min(r.gpus, settings.cpu_slots) for r in active if not r.devices)
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
            need = min(record.gpus, settings.cpu_slots)
            if cpu_free < need:
                result.waiting[record.id] = f"needs {need} CPU slot(s), {max(cpu_free, 0)} free"
                blocker = record.id
                continue
            cpu_free -= need
            devices = ()
        result.start.append(Placement(record.id, devices))
    return result
