"""Scheduling overhead of the queue worker, measured on real tiny CPU runs.

    .venv/bin/python bench/queue_overhead.py [--runs 6] [--idle-s 30]

1. hand-off: N tiny runs queued behind one CPU slot; for each consecutive pair,
   the time from the first run's processes exiting (its runner's exit, seen by
   polling psutil every 10 ms) to the worker launching the next one, and from
   its final record to that launch (this includes the trainer's interpreter
   teardown, which is not the worker's). Medians and maxima are reported.
2. idle CPU: the worker's CPU time over ``--idle-s`` seconds with an empty queue,
   and again with a run queued behind a paused queue (the worker reads the
   index every tick), as a percentage of one core.

Uses a throw-away store; prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import queue as Q  # noqa: E402
from engine.data.easyvqa import load_easy_vqa  # noqa: E402
from engine.jobs.worker import worker_info  # noqa: E402
from engine.store import Store  # noqa: E402


def tiny_preset(directory: Path, cache: Path) -> Path:
    path = directory / "tiny.toml"
    path.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
        f'[data]\ncache_dir = "{cache}"\neval_max_samples = 16\n'
        "[train]\nmax_steps = 2\nbatch_size = 4\nlog_every = 1\neval_every = 100000\ncpu_threads = 1\n"
    )
    return path


def start_worker(home: Path) -> psutil.Process:
    proc = subprocess.Popen([sys.executable, "-m", "engine.jobs.worker"], env={**os.environ, "REN_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    while not (worker_info(Store(home)) or None):
        time.sleep(0.02)
    return psutil.Process(proc.pid)


def handoff(home: Path, preset: Path, runs: int) -> dict:
    store = Store(home)
    ids = [Q.add(store, preset, name=f"r{i}", start_worker=False)[0].id for i in range(runs)]
    worker = start_worker(home)
    exits: dict[str, float] = {}
    try:
        while len(exits) < runs:
            for record in store.list_runs():
                if record.id in exits or record.runner_pid is None:
                    continue
                if not psutil.pid_exists(record.runner_pid) or psutil.Process(record.runner_pid).status() == "zombie":
                    exits[record.id] = time.time()
            time.sleep(0.01)
    finally:
        worker.terminate()
    records = {r.id: r for r in store.list_runs()}
    statuses = {records[i].status for i in ids}
    after_exit = [records[b].launched_at - exits[a] for a, b in zip(ids, ids[1:])]
    after_record = [records[b].launched_at - records[a].ended_at for a, b in zip(ids, ids[1:])]
    return {"runs": runs, "statuses": sorted(statuses),
            "exit_to_launch_s": {"median": statistics.median(after_exit), "max": max(after_exit)},
            "record_to_launch_s": {"median": statistics.median(after_record), "max": max(after_record)}}


def idle_cpu(home: Path, seconds: float, preset: Path | None) -> float:
    store = Store(home)
    if preset is not None:
        Q.set_paused(store, True)
        Q.add(store, preset, name="waiting", start_worker=False)
    worker = start_worker(home)
    time.sleep(2)  # past start-up
    before = sum(worker.cpu_times()[:2])
    t0 = time.monotonic()
    time.sleep(seconds)
    used = sum(worker.cpu_times()[:2]) - before
    wall = time.monotonic() - t0
    worker.terminate()
    return 100 * used / wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--idle-s", type=float, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        load_easy_vqa(cache)
        preset = tiny_preset(tmp, cache)
        result = {"handoff": handoff(tmp / "store_a", preset, args.runs),
                  "idle_cpu_percent_empty": idle_cpu(tmp / "store_b", args.idle_s, None),
                  "idle_cpu_percent_paused_with_queued_run": idle_cpu(tmp / "store_c", args.idle_s, preset)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
