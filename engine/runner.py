"""The supervisor of one queued run: ``python -m engine.runner RUN_ID -- COMMAND...``.

The worker starts it in a new session, so the runner leads the process group that
holds the training processes (one, or ``accelerate launch`` and its ranks). It
copies their output into ``runs/<id>/logs/run.log`` (rotated at a size limit) and,
when they exit, makes sure the run has a final record: a trainer that died without
writing one (SIGKILL, the OOM killer, a segfault, a crash before training began)
is marked failed with the reason and the last lines of its log.

The runner outlives the worker: killing or restarting the worker does not touch
running runs. Cancelling signals the whole group; the runner itself waits for its
children and records the outcome.
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
from collections import deque
from pathlib import Path
from typing import Any

from engine.errors import oom_message
from engine.store import RunRecord, Store

LOG_DIR = "logs"
LOG_NAME = "run.log"
TAIL_LINES = 20

_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED")
_RANK_SIGNAL = re.compile(r"Signal (\d+) \((SIG[A-Z]+)\) received|exitcode\s*:\s*-(\d+)")


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
    return f"The training process exited with code {returncode} before recording a result."


def finalize(store: Store, run_id: str, returncode: int, tail: str) -> RunRecord:
    """Give the run a final record if its trainer did not write one."""
    record = store.get_run(run_id)
    if record.status == "failed":  # the trainer recorded an exception: add what the log says
        error = record.error
        if _OOM.search(f"{error}\n{tail}") and not (error or "").startswith("CUDA out of memory on"):
            error = record_oom_message(record)
        return store.update_run(run_id, error=error, log_tail=tail)
    if record.status not in ("running", "crashed", "queued"):
        return record  # finished or cancelled, recorded by the trainer
    if record.cancel_requested_at is not None:
        store.update_run(run_id, log_tail=tail)
        return store.mark_ended(run_id, "cancelled", error="cancelled before a checkpoint could be written")
    store.update_run(run_id, log_tail=tail)
    return store.mark_ended(run_id, "failed", error=describe_exit(returncode, tail, record))


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


def supervise(store: Store, run_id: str, command: list[str], *, log_max_mb: float, log_backups: int) -> int:
    """Run ``command``, copying its output to the run's log; returns its exit code."""
    run_dir = store.run_dir(run_id)
    log = open_log(run_dir, log_max_mb, log_backups)
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def note(signum: int, frame: Any) -> None:  # the group got the signal too: wait for the children
        log.info(f"[ren runner] received {_signal_name(signum)}; waiting for the training processes")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, note)
    log.info(f"[ren runner] {' '.join(command)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
    finalize(store, run_id, returncode, "\n".join(tail))
    return returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m engine.runner", usage="%(prog)s RUN_ID [options] -- COMMAND...")
    parser.add_argument("run_id")
    parser.add_argument("--log-max-mb", type=float, default=20.0)
    parser.add_argument("--log-backups", type=int, default=3)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("give the training command after --")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    return supervise(Store(), args.run_id, command, log_max_mb=args.log_max_mb, log_backups=args.log_backups)


if __name__ == "__main__":
    sys.exit(main())
