"""What ren-tui does behind the screen in front to be quick (issue 17; the timings are bench/tui_startup.py's):
Compose and the Queue made behind Runs after start-up, and the Runs table filled a batch of rows at a time.
These tests check that the result is the same as doing it all at once."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest
from textual.render import measure
from textual.widgets import DataTable, Input
from textual.widgets._data_table import default_cell_formatter

from engine.store import Store
from ren_tui import app as app_module
from ren_tui.app import RenApp
from ren_tui.backend import Backend
from ren_tui.screens import compose as compose_module
from ren_tui.screens import runs as runs_module
from ren_tui.screens.compose import ComposeScreen, wid
from ren_tui.screens.queue import QueueScreen
from ren_tui.screens.runs import RunsScreen
from tests.helpers.tui import FakeInspector
from tests.tui_fake import canned_run, preset_config


def prebuilding_app(ren_home: Path) -> RenApp:
    backend = Backend(Store(ren_home), start_worker=False)
    backend.inspector = FakeInspector()
    return RenApp(backend, prebuild=True)


async def until(pilot: Any, ready: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        await pilot.pause(0.05)


def made(app: RenApp, mode: str) -> list[Any]:
    """The screens of ``mode`` (none before its screen is made)."""
    try:
        return app.get_screen_stack(mode)
    except KeyError:
        return []


def form(screen: ComposeScreen) -> dict[str, object]:
    """Every widget of the form with an id, and its value."""
    return {w.id: getattr(w, "value", None) for w in screen.query("#form *") if w.id}


async def test_compose_and_the_queue_made_behind_runs_are_what_opening_them_makes(ren_home: Path) -> None:
    canned_run(Store(ren_home), "done")
    app = prebuilding_app(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.loaded, "runs")
        stacks = lambda mode: made(app, mode)  # noqa: E731
        await until(pilot, lambda: stacks("compose") and stacks("compose")[0].loaded, "Compose made behind")
        assert stacks("queue") and isinstance(stacks("queue")[0], QueueScreen)
        behind = stacks("compose")[0]
        assert isinstance(app.screen, RunsScreen) and behind.built  # Runs stayed in front
        await pilot.press("2")
        assert app.screen is behind
        assert behind.query_one("#" + wid("run.name"), Input).value == "quickstart"

        await app.push_screen(ComposeScreen(app.backend.preset_config(app.backend.default_preset())))
        opened = app.screen
        await until(pilot, lambda: opened.loaded and opened._init_sources == behind._init_sources, "the pushed Compose")
        await pilot.pause(0.2)
        assert form(behind) == form(opened)  # the same fields, showing the same values
        await pilot.press("escape")

        steps = behind.query_one("#" + wid("train.max_steps"), Input)
        steps.focus()
        await pilot.press("end", "0")
        assert behind.raw["train"]["max_steps"] == 10000
        await pilot.press("escape", "3")
        assert app.screen is stacks("queue")[0]


async def test_compose_opened_while_it_is_made_behind_is_finished_at_once(ren_home: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose_module, "BUILD_PAUSE_S", 5.0)  # a batch of fields every 5 s: still building
    app = prebuilding_app(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: made(app, "compose"), "Compose started behind")
        screen = made(app, "compose")[0]
        assert isinstance(screen, ComposeScreen) and not screen.built
        await pilot.press("2")
        assert app.screen is screen
        await until(pilot, lambda: screen.built and screen.loaded, "the whole form")
        assert screen.query_one("#" + wid("run.name"), Input).value == "quickstart"
        assert screen.query_one("#" + wid("train.max_steps"), Input).value == "1000"


async def test_the_runs_table_fills_in_batches_with_the_widths_it_would_measure(
        ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_module, "FIRST_ROWS", 0)  # a screenful (the table's height), then 5 at a time
    monkeypatch.setattr(runs_module, "MORE_ROWS", 5)
    store = Store(ren_home)
    config = preset_config()
    for i in range(44):
        record = store.create_run(name=f"run {'x' * (i % 9)} {i}", stage="finetune", kind="two_tower", config=config,
                                  tags=(f"study:s{i % 3}",) * (i % 2))
        store.update_run(record.id, status="finished", device="cpu" + "u" * (i % 5))
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(140, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        table = screen.query_one("#runs", DataTable)
        await until(pilot, lambda: table.row_count, "the first rows")
        assert table.row_count < 44  # a batch at a time
        await until(pilot, lambda: table.row_count == 44, "every row")
        await pilot.pause(0.2)
        assert [k.value for k in table.rows] == [r.id for r in screen.view.apply(list(screen.records.values()))]
        for column in table.columns.values():  # as wide as DataTable measures the widest cell or header
            cells = [default_cell_formatter(value, wrap=False, height=1) for value in table.get_column(column.key)]
            widest = max(measure(app.console, renderable, 1) for renderable in [column.label, *cells])
            assert not column.auto_width and column.width == widest, column.key
        newest = screen.view.apply(list(screen.records.values()))[-1].id
        table.move_cursor(row=43)
        screen.action_reverse()  # a rebuild keeps the cursor's run, beyond the first batch
        await until(pilot, lambda: table.row_count == 44, "every row again")
        assert table.cursor_row == 0 and screen.current_id() == newest


async def test_the_collector_ren_tui_starts_without_is_on_again_once_start_up_is_over(
        ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ren-tui starts with the cyclic collector off (ren_tui.__main__); it comes back on, with start-up's heap
    frozen, even where the warm-up never runs (as here: no worker, so no screens made behind)."""
    monkeypatch.setattr(app_module, "FREEZE_HEAP_AT_LATEST_S", 0.3)
    gc.disable()
    try:
        app = RenApp(Backend(Store(ren_home), start_worker=False))
        async with app.run_test() as pilot:
            assert not gc.isenabled()
            await until(pilot, gc.isenabled, "the collector on again")
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0  # unfrozen when the app ended
    finally:
        gc.enable()
        gc.unfreeze()
