"""Eight trainer-like processes write metrics (and step updates to the shared index)
while a reader polls every 100 ms for 60 s; a ninth writer is SIGKILLed part way.

Every read must parse and show each run's series as a prefix of what its writer
logs; at the end every point of the surviving writers is there, and the killed
writer lost at most the points it logged after its last reported flush.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.store import Store
from tests.helpers.paths import REPO

WRITERS, DURATION_S, POLL_S, SEGMENT = 8, 60.0, 0.1, 500

# One trainer-like writer: ``ROOT RUN_ID SECONDS MODE``. It logs a point every 10 ms
# whose values are a function of the step, updates its record's step about once a
# second, and closes its writer at the end ("done N"). MODE "auto" flushes the way
# training does (every 2 s, on log); MODE "report" flushes itself every 0.5 s and
# prints "flushed N" once each flush has returned, so its parent knows what is on disk.
WRITER = """
import sys, time
from engine.store import Store
root, run_id, seconds, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
store = Store(root)
writer = store.metrics_writer(run_id, flush_every_s=2.0 if mode == "auto" else 3600.0, segment_points=%d)
end = time.monotonic() + seconds
step, last_index, last_flush = 0, 0.0, time.monotonic()
while time.monotonic() < end:
    step += 1
    writer.log(step, loss=1.0 / step, lr=step * 1e-6)
    now = time.monotonic()
    if mode == "report" and now - last_flush >= 0.5:
        writer.flush()
        last_flush = now
        print("flushed", step, flush=True)
    if now - last_index >= 1.0:
        store.update_run(run_id, step=step)
        last_index = now
    time.sleep(0.01)
writer.close()
print("done", step, flush=True)
""" % SEGMENT


def _check_series(run_id: str, points: list[dict]) -> None:
    steps = [p["step"] for p in points]
    assert steps == list(range(1, len(points) + 1)), f"{run_id}: steps are not a prefix of the logged series"
    for p in points:
        assert p["loss"] == 1.0 / p["step"] and p["lr"] == p["step"] * 1e-6, f"{run_id}: wrong values {p}"


@pytest.mark.slow
def test_eight_writers_and_a_killed_one_while_a_reader_polls(ren_home: Path) -> None:
    store = Store(ren_home)
    ids = [store.create_run(name=f"writer-{i}", stage="pretrain", kind="two_tower", config={}).id
           for i in range(WRITERS + 1)]
    killed_id = ids[-1]

    def start(run_id: str, mode: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", WRITER, str(ren_home), run_id, str(DURATION_S), mode],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {run_id: start(run_id, "auto") for run_id in ids[:-1]}
    victim = start(killed_id, "report")
    flushed: list[int] = []
    listener = threading.Thread(target=lambda: flushed.extend(
        int(line.split()[1]) for line in victim.stdout if line.startswith("flushed")), daemon=True)
    listener.start()

    reader = Store(ren_home, read_only=True)
    kill_at = time.monotonic() + random.Random(7).uniform(0.25, 0.75) * DURATION_S
    seen = dict.fromkeys(ids, 0)
    reads, failures, gaps = 0, [], []
    t_prev = next_poll = time.monotonic()
    while any(p.poll() is None for p in procs.values()):
        try:
            assert len(reader.list_runs()) == len(ids)
            for run_id in ids:
                points = reader.read_metrics(run_id)
                _check_series(run_id, points)
                assert len(points) >= seen[run_id], f"{run_id}: the series got shorter"
                seen[run_id] = len(points)
        except Exception as exc:  # every failed read is kept; the test reports the first ones
            failures.append(f"{type(exc).__name__}: {exc}")
        reads += 1
        now = time.monotonic()
        gaps.append(now - t_prev)
        t_prev = now
        if victim.poll() is None and now >= kill_at:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        next_poll += POLL_S
        time.sleep(max(0.0, next_poll - time.monotonic()))
    listener.join(timeout=10)
    print(f"{reads} reads over {sum(gaps):.0f} s, slowest poll interval {max(gaps) * 1000:.0f} ms")

    assert not failures, f"{len(failures)} of {reads} reads failed; first: {failures[:3]}"
    assert reads >= DURATION_S / POLL_S / 10  # it polled throughout (a loaded machine stretches the 100 ms)
    assert victim.returncode == -signal.SIGKILL and flushed
    counts = []
    for run_id, proc in procs.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        logged = int(out.split()[-1])
        points = reader.read_metrics(run_id)
        _check_series(run_id, points)
        assert len(points) == logged, f"{run_id}: {logged} points logged, {len(points)} stored"
        counts.append(logged)
        assert reader.get_run(run_id).step > 0

    kept = reader.read_metrics(killed_id)
    _check_series(killed_id, kept)
    print(f"survivors stored {min(counts)}-{max(counts)} points each; the killed writer kept {len(kept)}, "
          f"its last reported flush was step {flushed[-1]}")
    gap = [b - a for a, b in zip(flushed, flushed[1:])]
    assert flushed[-1] <= len(kept) <= flushed[-1] + 2 * max(gap)  # only the unflushed tail is lost
    with store.metrics_writer(killed_id) as writer:  # the kill released the run's writer lock
        writer.log(len(kept) + 1, loss=1.0 / (len(kept) + 1), lr=(len(kept) + 1) * 1e-6)
    _check_series(killed_id, reader.read_metrics(killed_id))
    assert not list((store.run_dir(killed_id) / "metrics").glob(".*.tmp"))  # the new writer removed the kill's temp
