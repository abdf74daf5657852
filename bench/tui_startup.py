"""ren-tui start-up and Monitor-open times.

    .venv/bin/python bench/tui_startup.py [--repeats 5] [--runs 500] [--points 20000]

Builds two throw-away stores: an empty one, and one with ``--runs`` finished runs
of ``--points`` metric points each (written as the metrics writer writes them).
Then, in fresh processes (so every number includes the interpreter's start and
all imports):

- start-up: process creation to the Runs screen showing every run;
- Monitor: once start-up has settled (the app imports the chart screens in the
  background after the first paint), ``open_monitor`` on a run of the big store
  to its chart holding the run's points (downsampled to the terminal width).

The app runs headless at 120x40. Prints medians and maxima as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import sys, time, psutil
born = psutil.Process().create_time()
from ren_tui.app import make_app
from ren_tui.screens.runs import RunsScreen

store, expected, monitor = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = make_app(store, start_worker=False)
result = {}

async def drive(pilot):
    while not (isinstance(app.screen, RunsScreen) and app.screen.loaded
               and app.screen.query_one("#runs").row_count == expected):
        await pilot.pause(0.005)
    result["startup_s"] = time.time() - born
    if monitor != "-":
        await app.workers.wait_for_complete()  # start-up settled: the background warm-up import is done
        result["settled_s"] = time.time() - born
        await pilot.pause(0.2)
        t0 = time.perf_counter()
        app.open_monitor(monitor)
        from ren_tui.screens.monitor import MonitorScreen
        from ren_tui.widgets.chart import Chart
        while not (isinstance(app.screen, MonitorScreen) and app.screen.query(Chart)
                   and app.screen.chart.plotted.get("loss")):
            await pilot.pause(0.005)
        result["monitor_s"] = time.perf_counter() - t0
        result["monitor_points"] = len(app.screen._series.points)
    app.exit()

app.run(headless=True, size=(120, 40), auto_pilot=drive)
print("RESULT", __import__("json").dumps(result))
"""


def build_store(root: Path, runs: int, points: int) -> list[str]:
    """``runs`` finished runs with ``points`` points each; returns their ids."""
    from engine.store import Store
    from tests.tui_fake import preset_config

    store = Store(root)
    config = preset_config()
    ids = []
    for i in range(runs):
        record = store.create_run(name=f"run-{i:03d}", stage="finetune", kind="two_tower", config=config,
                                  tags=(f"study:s{i % 7}",), max_steps=points)
        metrics = store.run_dir(record.id) / "metrics"
        metrics.mkdir()
        series = [{"step": s, "time": 1.8e9 + s, "loss": 2 * math.exp(-s / points) + 0.1, "lr": 1e-4,
                   "samples_per_s": 200.0, "epoch": s / 1000} for s in range(1, points + 1)]
        for k in range(0, points, 5000):
            (metrics / f"{k // 5000:06d}.json").write_text(json.dumps({"points": series[k:k + 5000]}))
        ids.append(record.id)
    for run_id in ids:  # as the trainer leaves a finished run
        store.update_run(run_id, status="finished", step=points, best_scores={"eval/vqa_score": 0.9},
                         loss_trace=tuple(2 - j / 12 for j in range(24)), started_at=1.8e9, ended_at=1.8e9 + 600)
    return ids


def measure(store: Path, expected: int, monitor: str, repeats: int) -> list[dict]:
    out = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(expected), monitor],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        out.append(json.loads(line[len("RESULT "):]))
    return out


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the big store here and reuse it on later calls (it takes a minute)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty, big = Path(tmp) / "empty", args.keep or Path(tmp) / "big"
        t0 = time.perf_counter()
        if args.keep and (big / "index.json").exists():
            from engine.store import Store

            ids = [r.id for r in Store(big).list_runs()]
        else:
            ids = build_store(big, args.runs, args.points)
        built = time.perf_counter() - t0
        cold_empty = measure(empty, 0, "-", args.repeats)
        cold_big = measure(big, args.runs, ids[len(ids) // 2], args.repeats)
    print(json.dumps({
        "store": {"runs": args.runs, "points_per_run": args.points, "build_s": round(built, 1)},
        "startup_empty_s": summary([r["startup_s"] for r in cold_empty]),
        "startup_big_s": summary([r["startup_s"] for r in cold_big]),
        "settled_big_s": summary([r["settled_s"] for r in cold_big]),
        "monitor_open_s": summary([r["monitor_s"] for r in cold_big]),
        "monitor_points": cold_big[0]["monitor_points"],
    }, indent=2))


if __name__ == "__main__":
    main()
