"""Soak: tiny runs through the queue (2 CPU slots) while a seeded chaos loop kills and pokes everything.

For ``REN_SOAK_S`` seconds (default 40: the smoke variant CI runs; the full soak is 180) the loop, every
0.5-3 s, SIGKILLs the worker (and starts a new one 0-2 s later), a runner or a trainer, cancels a queued or
running run, retries an ended one, pauses or resumes the queue, or restarts the worker gracefully. Then it
resumes the queue and lets it drain, retries every run that did not finish, and lets it drain again. A
monitor thread records each trainer process's interval (from its start time to the last poll that saw it).
Checked at the end: after the chaos, every run is in a final state with a reason; after the retries, every
run finished (a killed run resumes to its end); no run ever had two trainers at once, and never more trainers
lived than slots; every JSON file of the store is strict JSON; every finished run holds each step
1..max_steps once, its scores and its final weights; the worker logged no traceback.

``REN_SOAK_RUNS`` (default 6; the full soak 30) runs are queued; ``REN_SOAK_SEED`` seeds the loop (default:
random). The seed and the counts are printed (``pytest -s`` shows them):

    REN_SOAK_S=180 REN_SOAK_RUNS=30 REN_SOAK_SEED=1 pytest -s tests/reliability/test_soak.py
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from engine.jobs import api as Q
from engine.jobs.worker import LOG_NAME, wake, worker_info
from engine.store import END_STATUSES, Store, is_alive
from tests.helpers.training import tiny_preset

SLOTS = 2
MAX_STEPS = 6
POLL_S = 0.1
DURATION_S = float(os.environ.get("REN_SOAK_S", "40"))
RUNS = int(os.environ.get("REN_SOAK_RUNS", "6"))


@dataclass
class Trainer:
    run_id: str
    start: float  # the process's create time
    last_seen: float


@dataclass
class Monitor:
    """Polls the trainer processes of this store: their intervals, and the most alive at once."""

    home: str
    trainers: dict[int, Trainer] = field(default_factory=dict)
    most_at_once: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def poll(self) -> None:
        alive = 0
        found = store_processes(self.home)
        for pid, (module, run_id, started, parent) in found.items():
            if module != "engine.train" or found.get(parent, ("",))[0] == "engine.train":
                continue  # a trainer's own child (a fork before an exec) shows the trainer's command line
            alive += 1
            now = time.time()
            self.trainers.setdefault(pid, Trainer(run_id, started, now)).last_seen = now
        self.most_at_once = max(self.most_at_once, alive)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.poll()
                time.sleep(POLL_S)
        except BaseException as exc:  # the test fails on it: a monitor that stopped proves nothing
            self.error = exc

    def overlaps(self) -> list[str]:
        """Runs that had two trainers at once: one started before the other was last seen alive."""
        by_run: dict[str, list[Trainer]] = collections.defaultdict(list)
        for trainer in self.trainers.values():
            by_run[trainer.run_id].append(trainer)
        found = []
        for run_id, trainers in by_run.items():
            trainers.sort(key=lambda t: t.start)
            found += [f"{run_id}: a trainer started at {b.start:.2f}, the previous one was alive at {a.last_seen:.2f}"
                      for a, b in zip(trainers, trainers[1:]) if b.start < a.last_seen]
        return found


def store_processes(home: str) -> dict[int, tuple[str, str | None, float, int]]:
    """pid -> (module, run id, start time, parent pid) of the ren processes (worker, runner, trainer) serving
    ``home``."""
    found = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if "-m" not in cmd[:3] or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            module = cmd[cmd.index("-m") + 1] if cmd.index("-m") + 1 < len(cmd) else ""
            ours = proc.environ().get("REN_HOME") == home
            if module in ("engine.jobs.worker", "engine.jobs.runner", "engine.train") and ours:
                run_id = cmd[cmd.index("-m") + 2] if module != "engine.jobs.worker" else None
                found[proc.pid] = (module, run_id, proc.create_time(), proc.ppid())
    return found


def kill_own(home: str, pid: int | None, started: float | None) -> bool:
    """SIGKILL ``pid`` only if it is that same process (start time) and serves this test's store."""
    if not pid or not is_alive(pid, started):
        return False
    if pid not in store_processes(home):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def strict_json(path: Path) -> None:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which strict JSON has not")

    json.loads(path.read_text(), parse_constant=refuse)


class Chaos:
    def __init__(self, store: Store, seed: int) -> None:
        self.store, self.home = store, str(store.root)
        self.rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.worker: subprocess.Popen | None = None
        self.restart_at: float | None = None

    def start_worker(self) -> None:
        with open(self.store.root / LOG_NAME, "ab") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "engine.jobs.worker"], stdout=log, stderr=log,
                                           env={**os.environ, "REN_HOME": self.home}, start_new_session=True)
        self.restart_at = None

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait(timeout=60)

    def step(self) -> None:
        if self.worker is not None and self.worker.poll() is not None and self.restart_at is not None \
                and time.monotonic() >= self.restart_at:
            self.start_worker()
            self.counts["worker restarts after a kill"] += 1
        records = self.store.list_runs()
        running = [r for r in records if r.status == "running"]
        action = self.rng.choices(
            ["kill worker", "kill runner", "kill trainer", "cancel", "retry", "pause", "resume", "restart worker"],
            weights=[2, 2, 3, 1, 3, 1, 1, 1])[0]
        if action == "kill worker":
            if self.worker is not None and self.worker.poll() is None:
                self.worker.kill()
                self.worker.wait()
                self.restart_at = time.monotonic() + self.rng.uniform(0, 2)
                self.counts["kills: worker"] += 1
        elif action in ("kill runner", "kill trainer"):
            targets = [(r.runner_pid, r.runner_started) if action == "kill runner" else (r.pid, r.pid_started)
                       for r in running]
            targets = [(pid, started) for pid, started in targets if pid and is_alive(pid, started)]
            if targets and kill_own(self.home, *self.rng.choice(targets)):
                self.counts[f"kills: {action.split()[1]}"] += 1
        elif action == "cancel":
            live = [r for r in records if r.status in ("queued", "running")]
            if live:
                with contextlib.suppress(Exception):  # it may have ended since it was listed
                    Q.cancel(self.store, self.rng.choice(live).id)
                    self.counts["cancels"] += 1
        elif action == "retry":
            ended = [r for r in records if r.status in ("failed", "cancelled", "crashed")]
            if ended:
                with contextlib.suppress(Exception):
                    Q.retry(self.store, self.rng.choice(ended).id, start_worker=False)
                    self.counts["retries"] += 1
        elif action in ("pause", "resume"):
            self.store.update_queue_settings(paused=action == "pause")
            wake(worker_info(self.store))
            self.counts[f"{action}s"] += 1
        elif action == "restart worker" and self.worker is not None and self.worker.poll() is None:
            self.stop_worker()
            self.start_worker()
            self.counts["graceful worker restarts"] += 1


def drain(store: Store, runs: int) -> None:
    """Wait until every run has a final record ("crashed" is how a run whose processes are gone reads until
    the worker settles it, so it is not final here)."""
    wake(worker_info(store))
    deadline = time.monotonic() + 120 + 40 * runs
    while not all(r.status in ("finished", "failed", "cancelled") for r in store.list_runs()):
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(int(300 + DURATION_S + 100 * RUNS))  # the full soak outlasts the suite's 600 s per test
def test_soak(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    duration, runs = DURATION_S, RUNS
    seed = int(os.environ.get("REN_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nsoak: seed {seed} (REN_SOAK_SEED), {duration:.0f} s of chaos, {runs} runs, {SLOTS} CPU slots")
    store = Store(ren_home)
    Q.configure(store, [f"cpu_slots={SLOTS}", "cancel_grace_s=5", "poll_s=0.5"])
    preset = tiny_preset(tmp_path / "tiny.toml", data_cache, max_steps=MAX_STEPS, batch_size=4, checkpoint_every=2,
                         eval_every=1000)
    ids = [Q.add(store, preset, name=f"soak-{i:02d}", start_worker=False)[0].id for i in range(runs)]
    monitor = Monitor(str(ren_home))
    watcher = threading.Thread(target=monitor.run, daemon=True)
    watcher.start()
    chaos = Chaos(store, seed)
    chaos.start_worker()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < duration:
            chaos.step()
            time.sleep(chaos.rng.uniform(0.5, 3.0))
        store.update_queue_settings(paused=False)
        if chaos.worker.poll() is not None:
            chaos.start_worker()
        drain(store, runs)
        after_chaos = {r.id: r for r in store.list_runs()}
        drained = time.monotonic() - t0
        for record in after_chaos.values():  # then every run that did not finish is retried, once
            if record.status != "finished":
                Q.retry(store, record.id, start_worker=False)
        drain(store, runs)
    finally:
        monitor.stop.set()
        watcher.join()
        chaos.stop_worker()
        for pid, (_, _, started, _) in store_processes(str(ren_home)).items():  # nothing of the test outlives it
            kill_own(str(ren_home), pid, started)

    records = {r.id: r for r in store.list_runs()}
    outcomes = collections.Counter(r.status for r in after_chaos.values())
    print(f"soak: {dict(sorted(chaos.counts.items()))}; runs {len(records)}: after the chaos "
          f"{dict(sorted(outcomes.items()))} (drained {drained:.0f} s after the start), after retrying the rest "
          f"{dict(collections.Counter(r.status for r in records.values()))}; trainer processes "
          f"{len(monitor.trainers)}, at most {monitor.most_at_once} at once")
    assert sorted(after_chaos) == sorted(ids)
    for record in after_chaos.values():
        assert record.status in END_STATUSES, (record.id, record.status)
        assert record.status == "finished" or record.error, (record.id, record.status, "no reason")
    assert [r.id for r in records.values() if r.status != "finished"] == []  # killed runs resume to the end
    assert monitor.error is None
    assert monitor.overlaps() == []
    assert monitor.most_at_once <= SLOTS
    for path in ren_home.rglob("*.json"):
        strict_json(path)
    for record in records.values():
        if record.status != "finished":
            continue
        steps = [p["step"] for p in store.read_metrics(record.id) if "loss" in p]
        assert steps == list(range(1, MAX_STEPS + 1)), (record.id, steps)
        assert record.step == MAX_STEPS and record.final_scores and record.test_scores, record.id
        assert (store.run_dir(record.id) / "model.safetensors").stat().st_size > 0
    assert "Traceback" not in (ren_home / LOG_NAME).read_text()
