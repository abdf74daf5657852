"""The queue worker: one per store, started on demand, detached from the terminal.

Each tick it (1) reconciles the runs it supervises — a run whose process group is
gone without a final record is marked failed (or cancelled, when a cancel was
asked), a cancelled run still alive after the grace period gets SIGKILL — and
(2) starts the queued runs that :func:`engine.scheduler.plan` places, each under a
runner (:mod:`engine.runner`) leading its own session and process group.

Everything lives in the store: killing the worker loses nothing, and a new worker
adopts the running runs by their recorded pids. ``worker.lock`` (held for the
worker's lifetime, released by the kernel when it dies) makes it one per store.
The CLI wakes it with SIGUSR1 after changing the queue; its children wake it with
SIGCHLD when they exit, so a finished run is followed by the next one at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from filelock import FileLock, Timeout

from engine.config import config_from_dict
from engine.distributed import free_port, launch_command
from engine.errors import ConfigError, RenError
from engine.gpus import GPU, devices_env, visible_gpus
from engine.runner import describe_exit, read_log_tail
from engine.scheduler import plan
from engine.store import RunRecord, Store, atomic_write_text, is_alive, process_start_time

LOCK_NAME = "worker.lock"
INFO_NAME = "worker.json"
LOG_NAME = "worker.log"

# A run's processes exit a moment after its final record; its devices stay held until
# they have. Older records are not checked (a runner lives seconds past its record).
HOLD_AFTER_END_S = 600.0

Inventory = Callable[[], Sequence[GPU]]


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    started: float | None
    host: str


def worker_info(store: Store) -> WorkerInfo | None:
    """The live worker of this store, or None when none runs."""
    lock = FileLock(store.root / LOCK_NAME)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        pass
    else:
        lock.release()
        return None
    try:
        data = json.loads((store.root / INFO_NAME).read_text())
        return WorkerInfo(pid=int(data["pid"]), started=data.get("started"), host=data.get("host", "?"))
    except (OSError, ValueError, KeyError):
        return WorkerInfo(pid=0, started=None, host=socket.gethostname())  # starting: lock held, no info yet


def ensure_worker(store: Store) -> WorkerInfo | None:
    """Start a detached worker for ``store`` unless one runs; returns the running one (None if just started)."""
    info = worker_info(store)
    if info is not None:
        wake(info)
        return info
    log = open(store.root / LOG_NAME, "ab")
    with log:
        subprocess.Popen([sys.executable, "-m", "engine.worker"], start_new_session=True, close_fds=True,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         env={**os.environ, "REN_HOME": str(store.root)})
    return None


def wake(info: WorkerInfo | None) -> None:
    """Ask the worker to look at the queue now (it otherwise polls every ``poll_s``)."""
    if info is not None and info.pid and info.host == socket.gethostname():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(info.pid, signal.SIGUSR1)


def stop_worker(store: Store, timeout_s: float = 10.0) -> WorkerInfo | None:
    """SIGTERM the worker and wait for it to exit; running runs are not touched."""
    info = worker_info(store)
    if info is None or not info.pid:
        return info
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_alive(info.pid, info.started):
        time.sleep(0.05)
    return info


def signal_run(record: RunRecord, sig: int) -> bool:
    """Send ``sig`` to the run's processes: the runner's whole process group for a queued
    run, the trainer's pid for one started by ``ren run``. False when nothing was alive."""
    try:
        if record.runner_pid and is_alive(record.runner_pid, record.runner_started):
            os.killpg(record.runner_pid, sig)
            return True
        if record.pid and is_alive(record.pid, record.pid_started):
            os.kill(record.pid, sig)
            return True
    except ProcessLookupError:
        pass
    return False


class Worker:
    """The scheduler loop. ``inventory`` lists the GPUs (NVML by default; tests inject one)."""

    def __init__(self, store: Store, inventory: Inventory = visible_gpus, python: str = sys.executable) -> None:
        self.store = store
        self.inventory = inventory
        self.python = python
        self.host = socket.gethostname()
        self.children: dict[str, subprocess.Popen] = {}
        self._wake = threading.Event()
        self._stop = False
        self._busy = True  # runs to watch or place at the last tick
        self._poll_s = 1.0

    # --- one tick ---------------------------------------------------------------

    def tick(self) -> list[str]:
        """Reconcile, then start what fits; returns the ids of the runs started."""
        for run_id, child in list(self.children.items()):
            if child.poll() is not None:  # reap: the runner recorded the outcome
                del self.children[run_id]
        settings = self.store.queue_settings()
        self._poll_s = settings.poll_s
        records = self.store.list_runs()
        active = [r for r in records if self._reconcile(r, settings.cancel_grace_s)]
        queued = sorted((r for r in records if r.status == "queued"), key=lambda r: r.queue_pos or 0.0)
        self._busy = bool(active or queued or self.children)
        if not queued:
            return []
        status_of = {r.id: r.status for r in records}
        gpus = list(self.inventory())
        decided = plan(queued, active, gpus, settings, status_of)
        for run_id, reason in decided.doomed.items():
            self.store.mark_ended(run_id, "cancelled", error=reason)
        started = []
        for placement in decided.start:
            record = next(r for r in queued if r.id == placement.run_id)
            self._launch(record, placement.devices, gpus, settings.log_max_mb, settings.log_backups)
            started.append(record.id)
        return started

    def _reconcile(self, record: RunRecord, grace_s: float) -> bool:
        """Whether ``record`` is a queue run still holding its devices (its processes may
        outlive its final record by a moment); settles the ones that are gone."""
        if record.host != self.host or record.runner_pid is None and record.status != "running":
            return False
        if record.status not in ("running", "crashed"):
            recent = record.ended_at is not None and time.time() - record.ended_at < HOLD_AFTER_END_S
            return recent and is_alive(record.runner_pid, record.runner_started)
        if record.runner_pid is None:
            if record.pid is None and record.status == "running":  # worker died between marking and launching
                self.store.enqueue(record.id, gpus=record.gpus, after=record.after, resume=record.resume)
            return False
        if record.status == "crashed":  # runner and trainer gone, no final record
            if record.id in self.children:
                return True  # its runner is a zombie about to be reaped; its record is being written
            tail = "\n".join(read_log_tail(self.store.run_dir(record.id)))
            if record.cancel_requested_at is not None:
                self.store.update_run(record.id, log_tail=tail)
                self.store.mark_ended(record.id, "cancelled", error="killed after the cancel grace period")
            else:
                reason = describe_exit(-signal.SIGKILL, tail, record)
                self.store.update_run(record.id, log_tail=tail)
                self.store.mark_ended(record.id, "failed", error="The run's processes are gone (killed with their "
                                      f"supervisor, or the machine restarted). {reason}")
            return False
        if record.cancel_requested_at is not None and time.time() - record.cancel_requested_at > grace_s:
            signal_run(record, signal.SIGKILL)
        return True

    def _launch(self, record: RunRecord, devices: tuple[int, ...], gpus: Sequence[GPU],
                log_max_mb: float, log_backups: int) -> None:
        try:
            cfg = config_from_dict(record.config, source=f"run {record.id}")
            processes = record.gpus
            command = launch_command(record.id, processes=processes, mixed_precision=cfg.train.mixed_precision,
                                     dist=cfg.distributed, resume=record.resume, grad_clip=cfg.optim.grad_clip,
                                     main_process_port=free_port() if processes > 1 else None, python=self.python)
        except (ConfigError, RenError) as exc:
            self.store.mark_ended(record.id, "failed", error=str(exc))
            return
        placed = [g for g in gpus if g.index in devices]
        now = time.time()
        self.store.update_run(record.id, status="running", devices=devices, host=self.host, launched_at=now,
                              started_at=now, ended_at=None, pid=None, runner_pid=None, error=None)
        runner = [self.python, "-m", "engine.runner", record.id, "--log-max-mb", str(log_max_mb),
                  "--log-backups", str(log_backups), "--", *command]
        env = {**os.environ, "REN_HOME": str(self.store.root), **devices_env(placed)}
        child = subprocess.Popen(runner, start_new_session=True, close_fds=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.children[record.id] = child
        self.store.update_run(record.id, runner_pid=child.pid, runner_started=process_start_time(child.pid))

    # --- the loop ---------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop = True
        self._wake.set()

    def serve(self) -> None:
        """Tick until SIGTERM/SIGINT; wakes on SIGUSR1/SIGCHLD or every ``poll_s``. With
        nothing to watch or place, a tick is skipped unless the index file changed."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        woken, seen = True, None
        while not self._stop:
            stamp = self.store.index_stamp()
            if woken or self._busy or stamp != seen:
                seen = stamp
                self._wake.clear()
                try:
                    self.tick()
                except RenError as exc:  # a store hiccup (lock timeout, full disk): say so, keep serving
                    print(f"worker: {exc}", file=sys.stderr, flush=True)
            woken = self._wake.wait(self._poll_s)


def run_worker(store: Store, inventory: Inventory = visible_gpus) -> int:
    """Serve the queue of ``store`` in this process; returns 1 if another worker holds it."""
    lock = FileLock(store.root / LOCK_NAME, thread_local=False)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        print(f"worker: another worker serves {store.root}", file=sys.stderr)
        return 1
    try:
        atomic_write_text(store.root / INFO_NAME, json.dumps(
            {"pid": os.getpid(), "started": process_start_time(os.getpid()), "host": socket.gethostname()}))
        print(f"worker {os.getpid()} serving {store.root}", file=sys.stderr, flush=True)
        Worker(store, inventory).serve()
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(run_worker(Store()))
