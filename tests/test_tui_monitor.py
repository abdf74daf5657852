"""The Monitor screen: one run's header, curves and log, read live."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Log, Static

import engine.store
from engine.jobs.runner import log_path
from engine.store import Store
from ren_tui.app import RenApp
from ren_tui.backend import Backend, Series
from ren_tui.dialogs import Prompt
from ren_tui.screens.monitor import MonitorScreen, parse_range

from .tui_fake import Replay, canned_points, canned_run, preset_config

KEYS = ("loss", "loss_mlm")


def make_app(home: Path) -> RenApp:
    return RenApp(Backend(Store(home), start_worker=False))


async def settle(app: RenApp, pilot: Pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def header(screen: MonitorScreen) -> str:
    return str(screen.query_one("#header", Static).render())


def screen_lines(app: RenApp) -> list[str]:
    """The terminal's text as the app paints it, one string per row."""
    return [strip.text.rstrip() for strip in app.screen._compositor.render_strips()]


def write_log(store: Store, run_id: str, lines: list[str], mode: str = "w") -> Path:
    log = log_path(store.run_dir(run_id))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, mode, encoding="utf-8") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
    return log


async def wait_for(pilot: Pilot, condition, seconds: float = 4.0) -> None:
    """Let the Monitor's 1 s timer run until ``condition()`` holds (or time is up)."""
    for _ in range(int(seconds / 0.1)):
        if condition():
            return
        await pilot.pause(0.1)


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
        log = screen.query_one("#log", Log)
        assert log.lines[-1] == "step 99 loss 0.5" and "step 99 loss 0.5" in "\n".join(screen_lines(app))

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


# --- issue 17: the log pane, the full log, eval of a pretraining run, takeover, ETA ---------------------

async def test_monitor_log_pane_shows_the_newest_lines_and_follows_them(ren_home: Path) -> None:
    store = Store(ren_home)
    run = canned_run(store, "logged", steps=400, status="running", written=120)
    write_log(store, run.id, [f"step {i} loss 0.5" for i in range(100)] + ["colour \x1b[31mred\x1b[0m \u202eevil"])
    app = make_app(ren_home)
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        text = "\n".join(screen_lines(app))
        assert "step 99 loss 0.5" in text  # the newest lines are on screen, the oldest scrolled away
        assert "colour \\x1b[31mred\\x1b[0m \\u202eevil" in text and "\x1b" not in text
        assert "step 60 loss" not in text

        write_log(store, run.id, [f"step {i} loss 0.4" for i in range(100, 120)], mode="a")
        await wait_for(pilot, lambda: "step 119 loss 0.4" in "\n".join(screen_lines(app)))
        assert "step 119 loss 0.4" in "\n".join(screen_lines(app))

        log = app.screen.query_one("#log")
        log.focus()
        await pilot.press("pageup")  # reading back: new lines must not pull the view away
        await pilot.pause()
        top = log.scroll_y
        write_log(store, run.id, [f"step {i} loss 0.3" for i in range(120, 130)], mode="a")
        await wait_for(pilot, lambda: log.line_count >= 131)
        await pilot.pause()
        assert log.line_count >= 131 and log.scroll_y == top and "step 129" not in "\n".join(screen_lines(app))
        await pilot.press("end")  # back to the end: following again
        write_log(store, run.id, ["the newest line"], mode="a")
        await wait_for(pilot, lambda: "the newest line" in "\n".join(screen_lines(app)))
        assert "the newest line" in "\n".join(screen_lines(app))


async def test_L_opens_the_whole_log_which_follows_and_searches(ren_home: Path) -> None:
    store = Store(ren_home)
    run = canned_run(store, "searched", steps=400, status="running", written=120)
    write_log(store, run.id, [f"step {i} loss {i % 7}" + (" WARNING nan" if i in (30, 260, 420) else "")
                              for i in range(500)])
    app = make_app(ren_home)
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        await pilot.press("L")
        await settle(app, pilot)
        screen = app.screen
        assert type(screen).__name__ == "LogScreen"
        assert "step 499 loss" in "\n".join(screen_lines(app))  # opens at the end, following
        assert "step 0 loss" not in "\n".join(screen_lines(app))

        await pilot.press("slash")
        await pilot.pause()
        for key in "WARNING":
            await pilot.press(key)
        await pilot.press("enter")
        await pilot.pause()
        lines = screen_lines(app)
        # the first match after the view's top, else from the start: the view stopped following
        current = next(line for line in lines if "WARNING nan" in line)
        assert "step 420 loss" in current or "step 30 loss" in current
        first = "step 420" if "step 420 loss" in current else "step 30"
        await pilot.press("n")
        await pilot.pause()
        after_n = "\n".join(screen_lines(app))
        following = {"step 420": "step 30 loss", "step 30": "step 260 loss"}[first]
        assert following in after_n
        await pilot.press("N")
        await pilot.pause()
        assert first + " loss" in "\n".join(screen_lines(app))
        styles = [seg.style for strip in app.screen._compositor.render_strips() for seg in strip
                  if seg.text == "WARNING"]
        assert styles and all(s.reverse or s.bgcolor is not None for s in styles)  # matches are highlighted

        write_log(store, run.id, ["new line while reading"], mode="a")
        await pilot.pause(1.5)
        assert "new line while reading" not in "\n".join(screen_lines(app))  # not pulled to the end
        await pilot.press("end")
        await wait_for(pilot, lambda: "new line while reading" in "\n".join(screen_lines(app)))
        assert "new line while reading" in "\n".join(screen_lines(app))
        write_log(store, run.id, ["and another \x1b]0;title\x07"], mode="a")
        await wait_for(pilot, lambda: "and another" in "\n".join(screen_lines(app)))
        assert "and another \\x1b]0;title\\x07" in "\n".join(screen_lines(app))  # followed, escaped
        await pilot.press("escape")
        assert isinstance(app.screen, MonitorScreen)


async def test_a_pretraining_run_has_no_eval_chart(ren_home: Path) -> None:
    store = Store(ren_home)
    run = canned_run(store, "pretrained", steps=300, stage="pretrain", keys=("loss", "loss_mlm", "loss_itm"),
                     eval_every=0, config=preset_config("easyvqa_pretrain.toml"))
    app = make_app(ren_home)
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        screen = app.screen
        titles = []
        for _ in range(4):
            titles.append(screen.chart.chart_title)
            await pilot.press("c")
            await pilot.pause()
        assert titles == ["loss", "learning rate", "samples/s", "loss"]
        controls = str(screen.query_one("#controls", Static).render())
        assert "Eval" not in controls and "no points yet" not in "\n".join(screen_lines(app))


async def test_a_queued_run_keeps_its_start_and_shows_its_trainer_pid_through_takeover(ren_home: Path) -> None:
    """The worker launches the run (started_at = its launch stamp, the runner's pid); the trainer then
    records itself with mark_running: the time goes on from the launch and the pid is the trainer's."""
    from ren_tui.screens.queue import COLUMNS, running_cells

    def queue_pid(record) -> str:
        return dict(zip(COLUMNS["running"], running_cells(record)))["pid"]

    store = Store(ren_home)
    run = store.create_run(name="takeover", stage="finetune", kind="two_tower", config=preset_config(),
                           max_steps=400)
    store.enqueue(run.id)
    launch = time.time() - 100
    store.transition(run.id, ("queued",), status="running", host="gpu-box", launched_at=launch, started_at=launch,
                     devices=(0,))
    store.transition(run.id, ("running",), {"launched_at": launch}, runner_pid=4242, runner_started=launch)
    app = make_app(ren_home)
    async with app.run_test(size=(120, 30)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        screen = app.screen
        before = header(screen)
        assert "1m4" in before and "pid 4242" not in before  # 1m40s since launch
        assert queue_pid(store.get_run(run.id)) != "4242"  # the runner's pid is not the trainer's

        store.mark_running(run.id, pid=5151, host="gpu-box", device="NVIDIA H100", max_steps=400)
        await wait_for(pilot, lambda: "NVIDIA H100" in header(screen))
        after = header(screen)
        assert "1m4" in after and "pid 5151" in after  # the time went on from the launch
        assert store.get_run(run.id).started_at == launch
        assert queue_pid(store.get_run(run.id)) == "5151"

    # a run started by hand (`ren run`) starts when its trainer does; so does each resumed session
    direct = store.create_run(name="direct", stage="finetune", kind="two_tower", config=preset_config())
    t0 = time.time()
    assert store.mark_running(direct.id, pid=5252, host="gpu-box", device="cpu").started_at >= t0


class TrainerClock:
    """``time`` for engine.store while a fake trainer logs: each point 0.5 s after the one before."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.monotonic = time.monotonic

    def time(self) -> float:
        self.now += 0.5
        return self.now


async def test_monitor_header_and_queue_show_each_running_runs_eta(ren_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    with monkeypatch.context() as patched:
        patched.setattr(engine.store, "time", TrainerClock())
        run = canned_run(store, "eta", steps=1000, status="running", written=400, eval_every=0)
    batch = run.config["train"]["batch_size"]
    store.update_run(run.id, host="gpu-box", runner_pid=4242, launched_at=time.time() - 300,
                     compute={"samples_per_s": batch / 0.5})  # the trainer's last measured interval
    app = make_app(ren_home)
    async with app.run_test(size=(140, 30)) as pilot:
        app.open_monitor(run.id)
        await settle(app, pilot)
        assert "ETA 5m00s" in header(app.screen)  # one step per 0.5 s, 600 steps to go
        await pilot.press("escape", "3")
        await settle(app, pilot)
        from textual.widgets import DataTable

        table = app.screen.query_one("#running", DataTable)
        assert table.get_cell(run.id, "eta") == "5m00s"  # from the record's samples/s: the same estimate


def test_monitor_cursor_and_smoothing_snapshot(snap_compare, ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Smoothed curves bold over their raw ones, the cursor's readout under the plot, a hidden series."""
    monkeypatch.setattr(engine.store, "_new_run_id", lambda name, created_at: f"20250101-000000-{name}")
    store = Store(ren_home)
    run = canned_run(store, "cursor", steps=600, status="finished", keys=("loss", "loss_mlm", "loss_itm"),
                     eval_every=100)
    app = make_app(ren_home)

    async def run_before(pilot: Pilot) -> None:
        app.sub_title = "test store"
        app.open_monitor(run.id)
        await settle(app, pilot)
        await pilot.press("s", "s", "down", "down", "space", "end", *["left"] * 12)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


def test_log_screen_snapshot(snap_compare, ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full log with a search: matches highlighted, the current one marked, the view paused on it."""
    monkeypatch.setattr(engine.store, "_new_run_id", lambda name, created_at: f"20250101-000000-{name}")
    store = Store(ren_home)
    run = canned_run(store, "logged", steps=100, status="running", written=50)
    write_log(store, run.id, [f"step {i:3d} loss {1 / (i + 1):.4f}" + ("  WARNING: loss spike" if i % 37 == 5 else "")
                              for i in range(200)])
    app = make_app(ren_home)

    async def run_before(pilot: Pilot) -> None:
        app.sub_title = "test store"
        app.open_monitor(run.id)
        await settle(app, pilot)
        await pilot.press("L")
        await settle(app, pilot)
        await pilot.press("slash", *"warning", "enter", "n")
        await pilot.pause()

    assert snap_compare(app, terminal_size=(100, 24), run_before=run_before)


def test_monitor_messages_merge_so_a_screen_that_fell_behind_redraws_once() -> None:
    """Messages from the Monitor's workers: a newer log message carries the older one's lines; a newer
    read of the run replaces an older one, keeping the older's recomputed curves when it has none."""
    older, newer = MonitorScreen.LogRead(["a", "b"], True), MonitorScreen.LogRead(["c"], True)
    assert older.can_replace(newer) and newer.lines == ["a", "b", "c"]
    record = engine.store.RunRecord(id="r", name="r", stage="finetune", kind="two_tower", status="running")
    series = Series("r", [])
    curves = ({"loss": ([1.0], [2.0])}, "step")
    first = MonitorScreen.Loaded(record, series, curves, ((), "step"))
    second = MonitorScreen.Loaded(record, series, None, ((), "step"))
    assert first.can_replace(second) and second.plotted is curves
    other_axis = MonitorScreen.Loaded(record, series, None, ((), "time"))
    assert not first.can_replace(other_axis)  # its curves are for another axis: both are shown in turn
    assert not older.can_replace(first)
