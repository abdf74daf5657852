"""The Monitor screen: one run's header, curves and log, read live."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Static

import engine.store
from engine.jobs.runner import log_path
from engine.store import Store
from ren_tui.app import RenApp
from ren_tui.backend import Backend
from ren_tui.dialogs import Prompt
from ren_tui.screens.monitor import MonitorScreen, parse_range

from .tui_fake import Replay, canned_points, canned_run

KEYS = ("loss", "loss_mlm")


def make_app(home: Path) -> RenApp:
    return RenApp(Backend(Store(home), start_worker=False))


async def settle(app: RenApp, pilot: Pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def header(screen: MonitorScreen) -> str:
    return str(screen.query_one("#header", Static).render())


async def test_monitor_shows_the_run_and_follows_new_points(ren_home: Path) -> None:
    store = Store(ren_home)
    run = canned_run(store, "live", steps=400, status="running", keys=KEYS, eval_every=50, written=120)
    replay = Replay(store, run.id, canned_points(400, keys=KEYS, eval_every=50))
    replay.done = 120
    log = log_path(store.run_dir(run.id))
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"step {i} loss 0.5\n" for i in range(100)))
    app = make_app(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, MonitorScreen)
        text = header(screen)
        assert run.id in text and "running" in text and f"{run.step}/400 steps" in text
        assert "best val/vqa 0." in text
        loss_points = sum("loss" in p for p in replay.points[:120])
        chart = screen.chart
        assert list(chart.series) == ["loss", "loss_mlm"]
        assert len(chart.series["loss"][0]) == loss_points
        assert chart.plotted["loss"][0][-1] == run.step
        log_text = str(screen.query_one("#log", Static).render())
        assert "step 99 loss 0.5" in log_text and "step 10 loss" not in log_text

        replay.advance(100)
        expected = sum("loss" in p for p in replay.points[:220])
        for _ in range(40):  # the 1 s timer picks the new points up
            await pilot.pause(0.1)
            if len(chart.series["loss"][0]) == expected:
                break
        assert len(chart.series["loss"][0]) == expected
        await settle(app, pilot)
        assert f"{replay.points[219]['step']}/400 steps" in header(screen)


async def test_monitor_keys_change_chart_smoothing_axis_and_zoom(ren_home: Path) -> None:
    store = Store(ren_home)
    run = canned_run(store, "keys", steps=1000, status="finished", keys=KEYS, eval_every=100)
    app = make_app(ren_home)
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, MonitorScreen)
        chart = screen.chart
        steps, losses = chart.series["loss"]
        spike = losses[steps.index(600)]  # canned_points puts a +1.5 spike at 60% of the run
        assert len(chart.plotted["loss"][0]) <= 2 * chart.size.width < len(steps)
        assert spike in chart.plotted["loss"][1]

        await pilot.press("s")
        await pilot.pause()
        assert chart.smoothing == 0.6 and spike not in chart.plotted["loss"][1]
        await pilot.press("s", "s", "s")
        assert chart.smoothing == 0.0

        await pilot.press("z")
        await pilot.pause()
        assert isinstance(app.screen, Prompt)
        app.screen.query_one(Input).value = "100-300"
        await pilot.press("enter")
        await pilot.pause()
        assert chart.x_range == (100.0, 300.0)
        assert 100 <= min(chart.plotted["loss"][0]) and max(chart.plotted["loss"][0]) <= 300
        await pilot.press("right_square_bracket")
        assert chart.x_range == (200.0, 400.0)
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert chart.x_range == (1.0, 201.0)  # clamped at the first point
        assert "zoom 1-201" in str(screen.query_one("#controls", Static).render())
        await pilot.press("0")
        assert chart.x_range is None
        await pilot.press("right_square_bracket")
        assert chart.x_range == (500.5, 1000.0)  # no zoom: the last half
        await pilot.press("0")

        await pilot.press("x")
        await settle(app, pilot)
        batch = store.get_run(run.id).config["train"]["batch_size"]
        assert chart.xlabel == "samples seen" and chart.series["loss"][0][-1] == 1000 * batch
        await pilot.press("x")
        await settle(app, pilot)
        assert chart.xlabel == "wall time (s)" and chart.x_range is None
        times = chart.series["loss"][0]  # seconds since the first point, as the fake trainer wrote them
        assert times[0] == 0.0 and times == sorted(times) and times[-1] < 60
        await pilot.press("x")
        await settle(app, pilot)
        assert chart.xlabel == "step (no compute recorded)" and chart.series["loss"][0][-1] == 1000
        await pilot.press("x")
        await settle(app, pilot)
        assert chart.xlabel == "step" and chart.series["loss"][0][-1] == 1000

        await pilot.press("s", "c")  # learning rate: drawn unsmoothed
        await pilot.pause()
        assert chart.chart_title == "learning rate" and list(chart.series) == ["lr"] and chart.smoothing == 0.0
        await pilot.press("c", "c")
        assert list(chart.series) == ["vqa_score"] and chart.smoothing == 0.6
        assert len(chart.series["vqa_score"][0]) == 10
        await pilot.press("c", "escape")
        assert not isinstance(app.screen, MonitorScreen)


def test_series_stamp_changes_only_when_points_are_written(ren_home: Path) -> None:
    store = Store(ren_home)
    backend = Backend(store, start_worker=False)
    empty = store.create_run(name="empty", stage="finetune", kind="two_tower", config={})
    assert backend.series_stamp(empty.id) == ()
    run = canned_run(store, "stamped", steps=100, written=10)
    replay = Replay(store, run.id, canned_points(100, eval_every=50))
    replay.done = 10
    before = backend.series_stamp(run.id)
    assert before and before == backend.series_stamp(run.id)
    replay.advance(5)
    assert backend.series_stamp(run.id) != before


def test_parse_range() -> None:
    assert parse_range("100-500") == (100.0, 500.0)
    assert parse_range(" 500 : 100 ") == (100.0, 500.0)
    assert parse_range("1.5..2") == (1.5, 2.0)
    for bad in ("100", "a-b", "5-5", "-5-10"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_monitor_snapshot(snap_compare, ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.store, "_new_run_id", lambda name, created_at: f"20250101-000000-{name}")
    store = Store(ren_home)
    run = canned_run(store, "snapshot", steps=600, status="finished", keys=KEYS, eval_every=100)
    app = make_app(ren_home)

    async def run_before(pilot: Pilot) -> None:
        app.sub_title = "test store"
        app.open_monitor(run.id)
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


def test_compute_axis_places_every_point_at_the_compute_spent_by_its_step() -> None:
    from ren_tui.backend import Series
    from ren_tui.screens.monitor import curves

    points = [{"step": 10, "time": 0.0, "loss": 2.0, "compute/pflops": 0.5},
              {"step": 20, "time": 1.0, "loss": 1.5, "compute/pflops": 1.0},
              {"step": 20, "time": 1.5, "eval/vqa_score": 0.4},
              {"step": 30, "time": 2.0, "loss": 1.0, "compute/pflops": 1.5}]
    out, label = curves(Series("r1", points), "compute")
    assert label == "training compute (PFLOPs)"
    assert out["loss"] == ([0.5, 1.0, 1.5], [2.0, 1.5, 1.0])
    assert out["eval/vqa_score"] == ([1.0], [0.4])  # an eval point at step 20: the compute of step 20
    assert "compute/pflops" not in out
