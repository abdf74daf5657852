"""The queue API: what ``ren queue``, ``ren logs`` and the TUI's Queue screen call.

Queued runs are ordinary run records with status "queued" (the queue lives in
the store); :mod:`engine.jobs.worker` starts them. Every change wakes the worker, or
starts one when none serves the store. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import RunConfig, load_preset
from engine.errors import RenError
from engine.jobs.gpus import GPU, visible_gpus
from engine.jobs.runner import log_files, log_path
from engine.jobs.scheduler import plan, setting_problem
from engine.jobs.worker import WorkerInfo, ensure_worker, signal_run, wake, worker_info
from engine.runs import Provider, check_init_from, create_run, find_finished, resolve_init_from
from engine.store import END_STATUSES, QueueSettings, RunRecord, Store, is_alive


@dataclass(frozen=True)
class QueueView:
    """One snapshot of the queue for display."""

    running: list[RunRecord]
    queued: list[RunRecord]  # in queue order
    reasons: dict[str, str]  # queued run id -> why it waits
    settings: QueueSettings
    worker: WorkerInfo | None
    gpus: list[GPU]


def _queued_or_running(store: Store, cfg: RunConfig) -> RunRecord | None:
    for record in store.list_runs():
        if record.status in ("queued", "running") and record.config == cfg.to_dict():
            return record
    return None


def queued_upstream(store: Store, gpus: int, waits: list[str], created: list[str]) -> Provider:
    """Provide a pretraining for ``init_from = "preset:..."`` without training it here:
    a finished run, else a queued or running one, else a newly queued one (appended to
    ``created``). Each unfinished one is appended to ``waits``, so the finetuning run
    starts after it."""

    def provide(upstream: RunConfig, path: Path) -> str:
        record = find_finished(store, upstream)
        if record is None:
            record = _queued_or_running(store, upstream)
            if record is None:
                record = create_run(store, upstream, str(path))
                record = store.enqueue(record.id, gpus=gpus, after=list(waits))
                created.append(record.id)
            waits.append(record.id)
        return record.id

    return provide


def check_fits(gpus: int, inventory: Sequence[GPU], settings: QueueSettings) -> None:
    """Refuse a request no placement can ever satisfy (as SLURM's sbatch and pueue refuse one): more
    processes than the CPU slots of a machine without GPUs, or more GPUs than the machine has."""
    if inventory and gpus > len(inventory):
        raise RenError(f"--gpus {gpus}: this machine has {len(inventory)} GPU(s), so the run could never start. "
                       f"Ask for at most --gpus {len(inventory)}.")
    if not inventory and gpus > settings.cpu_slots:
        raise RenError(f"--gpus {gpus}: this machine has no GPU, and the queue runs each process in a CPU slot; it "
                       f"has {settings.cpu_slots} (queue setting cpu_slots), so the run could never start. Ask for "
                       f"--gpus {settings.cpu_slots} or fewer, or raise the slots first (`ren queue config "
                       f"cpu_slots={gpus}`).")


def add(store: Store, preset: Path, overrides: list[str] = (), *, gpus: int = 1, after: list[str] = (),
        name: str | None = None, start_worker: bool = True,
        inventory: Sequence[GPU] | None = None) -> list[RunRecord]:
    """Queue a preset; returns the queued runs (a pretraining it names first, then it). With the machine's
    ``inventory`` of GPUs given, a request it can never satisfy is refused (:func:`check_fits`)."""
    if gpus < 1:
        raise RenError(f"--gpus {gpus}: a run needs at least one GPU (or CPU process).")
    if inventory is not None:
        check_fits(gpus, inventory, store.queue_settings())
    if name:
        overrides = [*overrides, f"run.name={json.dumps(name)}"]
    cfg = load_preset(preset, list(overrides))
    check_init_from(store, cfg)
    deps, created = [store.get_run(dep).id for dep in after], []
    cfg = resolve_init_from(cfg, preset, store, queued_upstream(store, gpus, deps, created))
    record = create_run(store, cfg, str(preset))
    queued = [store.get_run(run_id) for run_id in created]
    queued.append(store.enqueue(record.id, gpus=gpus, after=deps))
    if start_worker:
        ensure_worker(store)
    return queued


def cancel(store: Store, run_id: str) -> RunRecord:
    """Cancel a queued run, or stop a running one: SIGTERM to its process group (the
    trainer checkpoints and records "cancelled"); the worker sends SIGKILL after
    ``cancel_grace_s``."""
    record = store.get_run(run_id)
    if record.status not in ("queued", "running"):
        raise RenError(f"run {record.id} is {record.status}; only queued or running runs can be cancelled.")
    if record.status == "queued":  # each write checks that the run did not change since it was read
        done = store.transition(record.id, ("queued",), status="cancelled", error="cancelled while queued",
                                ended_at=time.time())
        record = done or store.get_run(record.id)  # not queued any more: the worker started it meanwhile
    if record.status == "running":
        if record.cancel_requested_at is None:
            record = store.transition(record.id, ("running",), cancel_requested_at=time.time()) or record
        if not signal_run(record, signal.SIGTERM):
            # nothing of it runs (a runner still starting claims the run first, and finds it cancelled)
            gone = store.transition(record.id, ("running", "crashed"), {"runner_pid": record.runner_pid,
                                    "pid": record.pid}, status="cancelled", error="its process was already gone",
                                    ended_at=time.time())
            if gone is None:  # a runner claimed it meanwhile: stop that one
                record = store.get_run(record.id)
                signal_run(record, signal.SIGTERM)
            record = gone or record
    wake(worker_info(store))
    return record


def retry(store: Store, run_id: str, *, start_worker: bool = True) -> RunRecord:
    """Queue a failed, cancelled or crashed run again; it resumes from its last checkpoint
    (:func:`engine.runs.resume_point` says which), or starts over when it saved none."""
    record = store.get_run(run_id)
    if record.status not in ("failed", "cancelled", "crashed"):
        raise RenError(f"run {record.id} is {record.status}; only failed, cancelled or crashed runs can be retried.")
    record = store.enqueue(record.id, gpus=record.gpus, after=record.after, resume=True)
    if start_worker:
        ensure_worker(store)
    return record


def move(store: Store, run_id: str, position: int) -> list[RunRecord]:
    """Move a queued run to 1-based ``position``; returns the queue in its new order."""
    if position < 1:
        raise RenError(f"position {position}: queue positions start at 1.")
    order = store.move_in_queue(run_id, position)
    wake(worker_info(store))
    return order


def set_paused(store: Store, paused: bool) -> QueueSettings:
    settings = store.update_queue_settings(paused=paused)
    if not paused:
        ensure_worker(store)
    return settings


def parse_setting(assignment: str) -> tuple[str, Any]:
    """``key=value`` for ``ren queue config``: integers, numbers, ``none``, lists ``0,1``; a value out of the
    setting's range (:data:`engine.jobs.scheduler.SETTING_RANGES`), NaN or infinite is refused."""
    key, sep, value = assignment.partition("=")
    key, value = key.strip(), value.strip()
    fields = {f.name: f for f in dataclasses.fields(QueueSettings)}
    if not sep or key not in fields:
        raise RenError(f"{assignment!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}.")
    try:
        if value.lower() in ("none", "null", ""):
            if key not in ("allow_gpus", "foreign_memory_mb"):
                raise ValueError("only allow_gpus and foreign_memory_mb can be none")
            return key, None
        if key == "allow_gpus":
            parsed = tuple(int(v) for v in value.split(",") if v.strip())
            if (problem := setting_problem(key, parsed)) is not None:
                raise RenError(f"queue setting allow_gpus={value} is refused: {problem}.")
            return key, parsed
        if key == "paused":
            return key, {"true": True, "false": False}[value.lower()]
        kind = type(getattr(QueueSettings(), key))
        parsed = int(value) if kind is int or key == "foreign_memory_mb" else float(value)
    except (ValueError, KeyError) as exc:
        raise RenError(f"queue setting {assignment!r}: cannot use {value!r} ({exc}).") from exc
    problem = setting_problem(key, parsed)
    if problem is not None:
        raise RenError(f"queue setting {key}={value} is refused: {problem}.")
    return key, parsed


def configure(store: Store, assignments: list[str]) -> QueueSettings:
    """Apply ``key=value`` queue settings; they take effect at the worker's next tick."""
    changes = dict(parse_setting(a) for a in assignments)
    if not changes:
        return store.queue_settings()
    try:
        settings = store.update_queue_settings(**changes)
    except ValueError as exc:
        raise RenError(str(exc)) from exc
    wake(worker_info(store))
    return settings


def view(store: Store, gpus: list[GPU] | None = None) -> QueueView:
    """The queue now: running and queued runs, why each queued run waits, the worker."""
    records = store.list_runs()
    running = [r for r in records if r.status == "running" and (r.supervised or r.launched_at is not None)]
    queued = sorted((r for r in records if r.status == "queued"), key=lambda r: r.queue_pos or 0.0)
    settings = store.queue_settings()
    gpus = visible_gpus() if gpus is None else gpus
    decided = plan(queued, running, gpus, settings, {r.id: r.status for r in records})
    info = worker_info(store)
    reasons = {**decided.waiting, **decided.doomed}
    for placement in decided.start:
        reasons[placement.run_id] = "starting" if info else "no worker is running (`ren worker`)"
    return QueueView(running, queued, reasons, settings, info, gpus)


def follow_log(store: Store, run_id: str, *, follow: bool = False, poll_s: float = 0.25,
               lines: int | None = None) -> Iterator[str]:
    """The run's log lines (all, or the last ``lines``); with ``follow``, keep yielding new
    lines across rotations until the run ends."""
    record = store.get_run(run_id)
    run_dir = store.run_dir(record.id)
    files = log_files(run_dir)
    if not files and not follow:
        raise RenError(f"run {record.id} has no log yet ({log_path(run_dir)}); only queued runs write one.")
    text = "".join(path.read_text(encoding="utf-8", errors="replace") for path in files)
    existing = text.splitlines()
    yield from existing[-lines:] if lines else existing
    if not follow:
        return
    current = log_path(run_dir)
    fh = open(current, encoding="utf-8", errors="replace") if current.exists() else None
    if fh is not None:
        fh.seek(0, 2)
    partial = ""
    try:
        while True:
            ended = _finished_writing(store.get_run(record.id))
            chunk = fh.read() if fh is not None else ""
            if chunk:
                *complete, partial = (partial + chunk).split("\n")
                yield from complete
                continue
            try:
                rotated = os.stat(current).st_ino != (os.fstat(fh.fileno()).st_ino if fh else None)
            except FileNotFoundError:
                rotated = False
            if rotated:  # go on with the new file from its start, once the old one is drained
                rest = fh.read() if fh is not None else ""
                if rest:
                    *complete, partial = (partial + rest).split("\n")
                    yield from complete
                if fh is not None:
                    fh.close()
                fh = open(current, encoding="utf-8", errors="replace")
                continue
            if ended:
                if partial:
                    yield partial
                return
            time.sleep(poll_s)
    finally:
        if fh is not None:
            fh.close()


def _finished_writing(record: RunRecord) -> bool:
    """The run has its final record and its runner, which writes the log's last lines
    after the trainer exits, is gone too."""
    if record.status not in END_STATUSES:
        return False
    return not (record.runner_pid and is_alive(record.runner_pid, record.runner_started))
