"""The queue worker: one per store, started on demand, detached from the terminal.

Each tick it reconciles the runs it supervises and starts the queued runs that
:func:`engine.jobs.scheduler.plan` places, each under a runner (:mod:`engine.jobs.runner`).
Everything lives in the store, and a launch is three compare-and-set writes, so a killed
worker loses nothing and no run starts twice. The tick, the wake-ups and the launch
protocol: docs/queue-and-store.md, "How the worker starts and watches a run".
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from filelock import FileLock, Timeout

from engine import faults
from engine.config import config_from_dict
from engine.errors import ConfigError, RenError
from engine.jobs.gpus import GPU, devices_env, visible_gpus
from engine.jobs.launchers import free_port, launch_command
from engine.jobs.runner import append_log_line, describe_exit, read_log_tail
from engine.jobs.scheduler import Plan, plan, sane_settings
from engine.store import (
    END_STATUSES,
    QueueSettings,
    RunRecord,
    Store,
    atomic_write_text,
    group_alive,
    is_alive,
    process_start_time,
)

LOCK_NAME = "worker.lock"
INFO_NAME = "worker.json"
LOG_NAME = "worker.log"
READY_ENV = "REN_WORKER_READY_FD"  # a pipe the worker writes one byte to once it serves the store
READY_TIMEOUT_S = 60.0
# A run whose runner keeps dying before its trainer begins is requeued this many times, then failed.
MAX_REQUEUES = 3

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
    """The worker serving ``store`` (woken), started first when none runs; None if it could not start."""
    info = worker_info(store)
    if info is not None:
        wake(info)
        return info
    return start_worker(store)


def start_worker(store: Store, timeout_s: float = READY_TIMEOUT_S) -> WorkerInfo | None:
    """Start a detached worker and return once it serves the store (it says so through a pipe), so what is
    printed next is true; a worker that lost the start to another one exits, and that one is returned."""
    read_end, write_end = os.pipe()
    try:
        with open(store.root / LOG_NAME, "ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "engine.jobs.worker"], start_new_session=True,
                                     pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env={**os.environ, "REN_HOME": str(store.root), READY_ENV: str(write_end)})
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], timeout_s)
        if ready and os.read(read_end, 1) == b"1":
            return WorkerInfo(pid=child.pid, started=process_start_time(child.pid), host=socket.gethostname())
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    return worker_info(store)


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
    run (also once the runner itself is gone), the trainer's pid for one started by
    ``ren run``. False when nothing was alive."""
    try:
        if record.runner_pid and (is_alive(record.runner_pid, record.runner_started)
                                  or group_alive(record.runner_pid)):
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
        self._said: set[Any] = set()  # what the worker's log already says (each problem once, not every tick)
        self._requeued: dict[str, int] = {}

    # --- one tick ---------------------------------------------------------------

    def tick(self) -> list[str]:
        """Reconcile, then start what fits; returns the ids of the runs started. A record that
        raises is marked failed with the error; the others are still scheduled."""
        for run_id, child in list(self.children.items()):
            if child.poll() is not None:  # reap: the runner recorded the outcome
                del self.children[run_id]
        settings = sane_settings(self.store.queue_settings(), self._say_once)
        self._poll_s = settings.poll_s
        active = []
        for record in self.store.list_runs():
            try:
                if self._reconcile(record, settings.cancel_grace_s):
                    active.append(record)
            except Exception as exc:  # noqa: BLE001 - one bad record never stops the others
                self._fail(record, f"the worker could not check it: {type(exc).__name__}: {exc}")
        records = self.store.list_runs()  # reconciling may have put runs back in the queue
        queued = sorted((r for r in records if r.status == "queued"), key=lambda r: r.queue_pos or 0.0)
        self._busy = bool(active or queued or self.children)
        if not queued:
            return []
        status_of = {r.id: r.status for r in records}
        gpus = list(self.inventory())
        decided = self._plan(queued, active, gpus, settings, status_of)
        for run_id, reason in decided.doomed.items():
            self.store.transition(run_id, ("queued",), status="cancelled", error=reason, ended_at=time.time())
        started = []
        for placement in decided.start:
            record = next(r for r in queued if r.id == placement.run_id)
            try:
                if self._launch(record, placement.devices, gpus, settings.log_max_mb, settings.log_backups):
                    started.append(record.id)
            except Exception as exc:  # noqa: BLE001
                child = self.children.pop(record.id, None)
                if child is not None:  # a runner half-launched: stop it before the run is failed
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                self._fail(record, f"the worker could not start it: {type(exc).__name__}: {exc}",
                           ("queued", "running"))
        return started

    def _plan(self, queued: list[RunRecord], active: list[RunRecord], gpus: list[GPU], settings: QueueSettings,
              status_of: dict[str, str]) -> Plan:
        """:func:`plan`; when a record breaks it, each queued run is tried alone and the ones that break
        are failed, so the others are placed."""
        try:
            return plan(queued, active, gpus, settings, status_of)
        except Exception:  # noqa: BLE001
            good = []
            for record in queued:
                try:
                    plan([record], active, gpus, settings, status_of)
                    good.append(record)
                except Exception as exc:  # noqa: BLE001
                    self._fail(record, f"the worker cannot schedule it: {type(exc).__name__}: {exc}")
            return plan(good, active, gpus, settings, status_of)

    def _fail(self, record: RunRecord, reason: str, statuses: tuple[str, ...] = ()) -> None:
        """Mark ``record`` failed with ``reason`` if it still has its status (or one of ``statuses``); say so
        in the worker's log."""
        self._say_once(f"run {record.id}: {reason}")
        try:
            self.store.transition(record.id, statuses or (record.status,), status="failed", error=reason,
                                  ended_at=time.time())
        except Exception as exc:  # noqa: BLE001 - the record cannot even be written: the log says so
            self._say_once(f"run {record.id}: cannot record the failure either: {type(exc).__name__}: {exc}")

    def _say_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            print(f"worker: {text}", file=sys.stderr, flush=True)

    def _reconcile(self, record: RunRecord, grace_s: float) -> bool:
        """Whether ``record`` is a queue run still holding its devices (its processes may
        outlive its final record by a moment); settles the ones whose processes are gone."""
        if record.host != self.host:
            return False
        if record.status in END_STATUSES and record.status != "crashed":
            if not record.runner_pid or record.ended_at is None or time.time() - record.ended_at > HOLD_AFTER_END_S:
                return False
            return is_alive(record.runner_pid, record.runner_started) or bool(
                record.pid and is_alive(record.pid, record.pid_started))
        if record.status not in ("running", "crashed") or (record.launched_at is None and not record.runner_pid):
            return False  # not started, or started by `ren run` in a terminal: not the queue's
        if not record.runner_pid:
            child = self.children.get(record.id)
            if child is not None and child.poll() is None:
                return True  # launched by this worker a moment ago
            if record.pid is not None:  # a trainer with no runner recorded (a record of an older version)
                if is_alive(record.pid, record.pid_started):
                    return True
                self._settle(record)
                return False
            # The worker that launched it died before a runner was recorded. A runner it may have
            # started claims the run for this launch before doing anything; voiding the launch makes
            # that claim fail, so the run can safely start again.
            if self._requeue(record, {"runner_pid": None, "pid": None, "launched_at": record.launched_at}):
                self._note(record, "its worker stopped before starting it; it is back in the queue")
            return False
        if not is_alive(record.runner_pid, record.runner_started):
            if group_alive(record.runner_pid):  # the runner was killed under a live trainer
                self._note(record, f"its runner (pid {record.runner_pid}) was killed; its training processes go "
                                   "on without it and write this log themselves")
            elif self.children.get(record.id) is None or self.children[record.id].poll() is not None:
                self._settle(record)
                return False
        if record.cancel_requested_at is not None and time.time() - record.cancel_requested_at > grace_s:
            signal_run(record, signal.SIGKILL)
        return True

    def _settle(self, record: RunRecord) -> None:
        """A run whose runner and trainers are all gone without a final record: requeued when its
        trainer never began (nothing was lost), else failed (or cancelled) with the reason."""
        run_dir = self.store.run_dir(record.id)
        expect = {"runner_pid": record.runner_pid, "pid": record.pid}
        if record.pid is None and record.cancel_requested_at is None:  # its trainer never began this launch
            self._requeued[record.id] = self._requeued.get(record.id, 0) + 1
            if self._requeued[record.id] <= MAX_REQUEUES:
                if self._requeue(record, expect):
                    self._note(record, f"its runner (pid {record.runner_pid}) ended before training began, "
                                       "without recording an outcome; it is back in the queue")
                return
        tail = "\n".join(read_log_tail(run_dir))
        if record.cancel_requested_at is not None:
            status, reason = "cancelled", "killed after the cancel grace period"
        else:
            status = "failed"
            runner = f"its runner (pid {record.runner_pid})" if record.runner_pid else "no runner"
            reason = ("The run's processes are gone (killed with their runner, or the machine restarted), and "
                      f"{runner} recorded no outcome. {describe_exit(-signal.SIGKILL, tail, record)}")
        if self.store.transition(record.id, ("running", "crashed"), expect, status=status, error=reason,
                                 log_tail=tail, ended_at=time.time()):
            self._note(record, reason)

    def _requeue(self, record: RunRecord, expect: dict[str, Any]) -> bool:
        """Put a run that never began back in the queue, at the place it had."""
        return self.store.transition(
            record.id, ("running", "crashed"), expect, status="queued", launched_at=None, started_at=None,
            devices=(), pid=None, pid_started=None, runner_pid=None, runner_started=None, error=None) is not None

    def _note(self, record: RunRecord, text: str) -> None:
        """Say ``text`` once, in the worker's log and the run's (where `ren logs` shows it)."""
        if (record.id, text) in self._said:
            return
        self._said.add((record.id, text))
        print(f"worker: run {record.id}: {text}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, RenError):
            append_log_line(self.store.run_dir(record.id), f"[ren worker] {text}")

    def _launch(self, record: RunRecord, devices: tuple[int, ...], gpus: Sequence[GPU],
                log_max_mb: float, log_backups: int) -> bool:
        try:
            cfg = config_from_dict(record.config, source=f"run {record.id}")
            processes = record.gpus
            command = launch_command(record.id, processes=processes, mixed_precision=cfg.train.mixed_precision,
                                     dist=cfg.distributed, resume=record.resume, grad_clip=cfg.optim.grad_clip,
                                     main_process_port=free_port() if processes > 1 else None, python=self.python)
        except (ConfigError, RenError) as exc:
            self.store.transition(record.id, ("queued",), status="failed", error=str(exc), ended_at=time.time())
            return False
        placed = [g for g in gpus if g.index in devices]
        launch = time.time()  # identifies this launch: the runner claims the run for it
        if self.store.transition(record.id, ("queued",), status="running", devices=devices, host=self.host,
                                 launched_at=launch, started_at=launch, ended_at=None, pid=None, pid_started=None,
                                 runner_pid=None, runner_started=None, cancel_requested_at=None, error=None) is None:
            return False  # cancelled or changed since the tick read it
        faults.at("worker:marked-running")
        runner = [self.python, "-m", "engine.jobs.runner", record.id, "--launch", repr(launch), "--log-max-mb",
                  str(log_max_mb), "--log-backups", str(log_backups), "--", *command]
        env = {**os.environ, "REN_HOME": str(self.store.root), **devices_env(placed)}
        child = subprocess.Popen(runner, start_new_session=True, close_fds=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.children[record.id] = child
        faults.at("worker:spawned")
        self.store.transition(record.id, ("running",), {"launched_at": launch, "runner_pid": None},
                              runner_pid=child.pid, runner_started=process_start_time(child.pid))
        faults.at("worker:recorded")
        return True

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
                    self._say_once(str(exc))
                except Exception:  # noqa: BLE001 - a bug or an unreadable index: logged once, the next tick retries
                    self._say_once(traceback.format_exc())
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
        _say_ready()
        Worker(store, inventory).serve()
    finally:
        lock.release()
    return 0


def _say_ready() -> None:
    """Tell the process that started this worker that it serves the store (see :func:`start_worker`)."""
    fd = os.environ.pop(READY_ENV, None)  # not inherited by the runs it starts
    if fd is not None:
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), b"1")
            os.close(int(fd))


if __name__ == "__main__":
    sys.exit(run_worker(Store()))
