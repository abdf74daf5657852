"""The supervisor of one queued run: ``python -m engine.jobs.runner RUN_ID -- COMMAND...``.

It leads the run's process group, copies its output into ``runs/<id>/logs/run.log`` and makes sure
the run gets a final record. Before starting anything it claims the run for the launch the worker
stamped (``--launch``, the record's ``launched_at``) and ends at once if the claim is refused.
Details: docs/queue-and-store.md, "How the worker starts and watches a run".
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from engine import faults
from engine.errors import oom_message
from engine.store import RunRecord, Store, process_start_time

LOG_DIR = "logs"
LOG_NAME = "run.log"
TAIL_LINES = 20
RUN_LOG_ENV = "REN_RUN_LOG"  # given to the trainer: where its output goes should its runner die

_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED")
_RANK_SIGNAL = re.compile(r"Signal (\d+) \((SIG[A-Z]+)\) received|exitcode\s*:\s*-(\d+)")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)\b.*")


def log_path(run_dir: Path) -> Path:
    return run_dir / LOG_DIR / LOG_NAME


def read_log_tail(run_dir: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of the run's current log ([] when it has none)."""
    try:
        with open(log_path(run_dir), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - 64 * 1024, 0))
            return fh.read().decode("utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def append_log_line(run_dir: Path, line: str) -> None:
    """Add one line to the run's current log (for the worker, once the run's runner is gone)."""
    path = log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def log_files(run_dir: Path) -> list[Path]:
    """The run's log files, oldest first (rotated backups, then the current one)."""
    current = log_path(run_dir)
    backups = sorted(current.parent.glob(f"{LOG_NAME}.*"), key=lambda p: -int(p.suffix[1:]) if
                     p.suffix[1:].isdigit() else 0)
    return [p for p in (*backups, current) if p.exists()]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def record_oom_message(record: RunRecord) -> str:
    train = record.config.get("train", {})
    where = f"GPU(s) {','.join(map(str, record.devices))}" if record.devices else "the device"
    return oom_message(batch_size=train.get("batch_size"), micro_batch_size=train.get("micro_batch_size"),
                       processes=record.gpus, where=where)


def describe_exit(returncode: int, tail: str, record: RunRecord) -> str:
    """Why the run's processes ended without a final record, in one paragraph."""
    if _OOM.search(tail):
        return record_oom_message(record)
    rank = _RANK_SIGNAL.search(tail)
    number = -returncode if returncode < 0 else None
    if number is None and rank:
        number = int(rank.group(1) or rank.group(3))
    if number == signal.SIGKILL:
        return ("The training process was killed by SIGKILL: the kernel's out-of-memory killer "
                "(check `dmesg`) or a `kill -9`.")
    if number is not None:
        return f"The training process was killed by {_signal_name(number)}."
    raised = [line.strip() for line in tail.splitlines() if _EXCEPTION.match(line.strip())]
    said = f": {raised[-1]}" if raised else ""
    return f"The training process exited with code {returncode} before recording a result{said}."


def claim(store: Store, run_id: str, launch: float | None) -> RunRecord | None:
    """Record this process as the run's runner, if the run is still "running" for the launch stamped
    ``launch`` (its ``launched_at``; None: whatever launch); None, changing nothing, when it is not."""
    me = os.getpid()
    expect: dict[str, Any] = {} if launch is None else {"launched_at": launch}
    for recorded in (me, None):  # the worker may have recorded this runner's pid already
        record = store.transition(run_id, ("running",), {**expect, "runner_pid": recorded}, runner_pid=me,
                                  runner_started=process_start_time(me))
        if record is not None:
            return record
    return None


def finalize(store: Store, run_id: str, returncode: int, tail: str) -> RunRecord:
    """Give the run a final record if its trainer did not write one (and the run is still this runner's)."""
    record = store.get_run(run_id)
    mine = {"runner_pid": record.runner_pid} if record.runner_pid in (None, os.getpid()) else None
    if mine is None:
        return record  # another launch owns the run now
    if record.status == "failed":  # the trainer recorded an exception: add what the log says
        error = record.error
        if _OOM.search(f"{error}\n{tail}") and not (error or "").startswith("CUDA out of memory on"):
            error = record_oom_message(record)
        return store.transition(run_id, ("failed",), mine, error=error, log_tail=tail) or store.get_run(run_id)
    if record.status not in ("running", "crashed"):
        return record  # finished or cancelled, recorded by the trainer
    if record.cancel_requested_at is not None:
        status, error = "cancelled", "cancelled before a checkpoint could be written"
    else:
        status, error = "failed", describe_exit(returncode, tail, record)
    ended = store.transition(run_id, ("running", "crashed"), mine, status=status, error=error, log_tail=tail,
                             ended_at=time.time())
    return ended or store.get_run(run_id)


def open_log(run_dir: Path, max_mb: float, backups: int) -> logging.Logger:
    """A logger that writes raw lines to the run's rotating log file."""
    path = log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=int(max_mb * 1024 * 1024), backupCount=backups,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"ren.run.{run_dir.name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def supervise(store: Store, run_id: str, command: list[str], *, log_max_mb: float, log_backups: int,
              launch: float | None = None) -> int:
    """Claim the run for ``launch``, then run ``command``, copying its output to the run's log; returns its
    exit code (0, starting nothing, when the claim is refused)."""
    run_dir = store.run_dir(run_id)
    log = open_log(run_dir, log_max_mb, log_backups)
    if claim(store, run_id, launch) is None:
        log.info(f"[ren runner] run {run_id} is no longer waiting for this launch (cancelled, or put back in the "
                 "queue by a worker that found its predecessor gone); nothing started")
        return 0
    faults.at("runner:claimed")
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def note(signum: int, frame: Any) -> None:  # the group got the signal too: wait for the children
        log.info(f"[ren runner] received {_signal_name(signum)}; waiting for the training processes")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, note)
    log.info(f"[ren runner] {' '.join(command)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_LOG_ENV: str(log_path(run_dir).resolve())}
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env)
    except OSError as exc:
        log.info(f"[ren runner] cannot start: {exc}")
        finalize(store, run_id, 127, str(exc))
        return 127
    assert child.stdout is not None
    for raw in iter(child.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        log.info(line)
        tail.append(line)
    returncode = child.wait()
    log.info(f"[ren runner] training processes exited with code {returncode}")
    faults.at("runner:finalizing")
    finalize(store, run_id, returncode, "\n".join(tail))
    return returncode


class _Rerouted:
    """``sys.stdout``/``sys.stderr`` of a trainer whose runner may die: when the pipe to the runner
    breaks, the process's stdout and stderr are pointed at the run's log file and the write is retried."""

    def __init__(self, stream: Any, log: str) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        return self._retry(self._stream.write, text)

    def flush(self) -> None:
        self._retry(self._stream.flush)

    def _retry(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            _to_log_file(self._log)
            return call(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _to_log_file(path: str) -> None:
    """Point file descriptors 1 and 2 at the run's log (once; both streams share them)."""
    if os.environ.get(RUN_LOG_ENV) != path:
        return  # done already
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (f"[ren trainer] the runner that copied this output is gone (killed); the training process "
                  f"(pid {os.getpid()}) writes this log itself from here\n").encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ[RUN_LOG_ENV] = ""


def install_output_guard() -> None:
    """In a trainer started by a runner (``$REN_RUN_LOG`` set): survive the runner's death by writing to the
    run's log file once the pipe to the runner breaks, instead of dying of BrokenPipeError."""
    path = os.environ.get(RUN_LOG_ENV)
    if path and not isinstance(sys.stdout, _Rerouted):
        sys.stdout = _Rerouted(sys.stdout, path)
        sys.stderr = _Rerouted(sys.stderr, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m engine.jobs.runner",
                                     usage="%(prog)s RUN_ID [options] -- COMMAND...")
    parser.add_argument("run_id")
    parser.add_argument("--launch", type=float, default=None, help="the launched_at stamp this runner claims")
    parser.add_argument("--log-max-mb", type=float, default=20.0)
    parser.add_argument("--log-backups", type=int, default=3)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("give the training command after --")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    return supervise(Store(), args.run_id, command, log_max_mb=args.log_max_mb, log_backups=args.log_backups,
                     launch=args.launch)


if __name__ == "__main__":
    sys.exit(main())
