"""The ETA of a running run (engine.display.estimate_eta): from its measured throughput."""

from __future__ import annotations

from engine.display import estimate_eta, format_eta, seconds_per_step
from engine.store import RunRecord


def record(**fields) -> RunRecord:
    base = {"id": "r1", "name": "r", "stage": "finetune", "kind": "two_tower", "status": "running", "step": 100,
            "max_steps": 1000, "config": {"train": {"batch_size": 32}}}
    return RunRecord(**{**base, **fields})


def points(steps: range, seconds: float, t0: float = 1000.0) -> list[dict]:
    return [{"step": s, "time": t0 + s * seconds, "loss": 1.0} for s in steps]


def test_seconds_per_step_from_the_recent_points() -> None:
    assert seconds_per_step([]) is None
    assert seconds_per_step(points(range(10, 11), 0.5)) is None  # one step: nothing measured yet
    assert seconds_per_step(points(range(10, 500, 10), 0.5)) == 0.5
    slow_then_fast = points(range(1, 101), 2.0) + points(range(101, 301), 0.25, t0=1000.0 + 100 * 1.75)
    assert seconds_per_step(slow_then_fast, window=50) == 0.25  # the last 50 points, not the average
    with_evals = points(range(1, 11), 1.0) + [{"step": 10, "time": 1010.5, "eval/vqa": 0.5}]
    assert seconds_per_step(with_evals) == (1010.5 - 1001.0) / 9  # an evaluation's time counts: wall clock


def test_estimate_eta_prefers_points_then_the_compute_record() -> None:
    run = record(step=400)
    assert estimate_eta(run, points(range(1, 401), 0.5)) == 600 * 0.5
    assert estimate_eta(run) is None  # no points, no throughput recorded
    measured = record(step=400, compute={"samples_per_s": 64.0})  # batch 32: 0.5 s per step
    assert estimate_eta(measured) == 300.0
    assert estimate_eta(record(step=400, compute={"samples_per_s": 0.0})) is None
    assert estimate_eta(record(step=1000, compute={"samples_per_s": 64.0})) == 0.0
    # steps the points have and the record does not yet (the index is written every few seconds)
    assert estimate_eta(record(step=300), points(range(1, 401), 0.5)) == 300.0


def test_eta_only_for_running_runs_with_a_step_budget() -> None:
    pts = points(range(1, 401), 0.5)
    for done in (record(status="finished"), record(status="queued"), record(max_steps=None)):
        assert estimate_eta(done, pts) is None and format_eta(done, pts) == "-"
    assert format_eta(record(step=400), pts) == "5m00s"
    assert format_eta(record(step=400, max_steps=8000), pts) == "1h03m"
