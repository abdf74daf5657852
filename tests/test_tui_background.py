"""What ren-tui does behind the screen in front to be quick (issue 17; the timings are bench/tui_startup.py's):
Compose and the Queue made behind Runs after start-up, and the Runs table filled a batch of rows at a time.
These tests check that the result is the same as doing it all at once."""

from __future__ import annotations

import asyncio
import copy
import gc
import time
from pathlib import Path
from typing import Any

import pytest
from textual.render import measure
from textual.widgets import DataTable, Input, Select
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


def prebuilding_app(ren_home: Path, prebuild: bool = True) -> RenApp:
    """The app on a fake inspector, making Compose and the Queue behind Runs after start-up (``prebuild``)."""
    backend = Backend(Store(ren_home), start_worker=False)
    backend.inspector = FakeInspector()
    return RenApp(backend, prebuild=prebuild)


async def typing_in_compose(app: RenApp, pilot: Any, ready: Any) -> tuple[ComposeScreen, Input]:
    """Compose opened with 2 (made then, in front), once ``ready(screen)``; its run name field focused, the
    cursor at its end."""
    await pilot.press("2")
    screen = app.screen
    assert isinstance(screen, ComposeScreen)
    await until(pilot, lambda: ready(screen), "Compose")
    name = screen.query_one("#" + wid("run.name"), Input)
    name.focus()
    name.action_end()
    return screen, name


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
        await until(pilot, lambda: stacks("compose") and stacks("compose")[0].loaded and stacks("compose")[0].built,
                    "Compose made behind")
        assert stacks("queue") and isinstance(stacks("queue")[0], QueueScreen)
        behind = stacks("compose")[0]
        assert isinstance(app.screen, RunsScreen) and behind.built  # Runs stayed in front
        await pilot.press("2")
        assert app.screen is behind
        assert behind.query_one("#" + wid("run.name"), Input).value == "quickstart"

        await app.push_screen(ComposeScreen(app.backend.preset_config(app.backend.default_preset())))
        opened = app.screen
        await until(pilot, lambda: opened.loaded and opened.built and opened._init_sources == behind._init_sources,
                    "the pushed Compose")
        await pilot.pause(0.2)
        assert form(behind) == form(opened)  # the same fields, showing the same values
        await pilot.press("escape")

        steps = behind.query_one("#" + wid("train.max_steps"), Input)
        steps.focus()
        await pilot.press("end", "0")
        assert behind.raw["train"]["max_steps"] == 10000
        await pilot.press("escape", "3")
        assert app.screen is stacks("queue")[0]


async def test_compose_opened_while_it_is_made_behind_takes_keys_at_once_and_fills_in(
        ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened before its form is whole, Compose is in front at once, its made fields take keys, and the rest
    of the form comes a batch at a time, each field showing the preset as it is made; what was typed stays."""
    monkeypatch.setattr(compose_module, "BUILD_PAUSE_S", 1.0)  # slow enough to act in between, even under load
    app = prebuilding_app(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: made(app, "compose"), "Compose started behind")
        screen = made(app, "compose")[0]
        assert isinstance(screen, ComposeScreen) and not screen.built
        await pilot.press("2")
        assert app.screen is screen
        shown = lambda: (name := screen._made("#" + wid("run.name"))) and name.value == "quickstart"  # noqa: E731
        await until(pilot, lambda: screen.loaded and shown(), "the preset in the name field")
        assert not screen.built and screen._made("#" + wid("train.max_steps")) is None  # still coming
        name = screen.query_one("#" + wid("run.name"), Input)
        name.focus()
        await pilot.press("end", "2")
        assert screen.raw["run"]["name"] == "quickstart2"
        monkeypatch.setattr(compose_module, "BUILD_PAUSE_S", 0.02)  # the rest quickly
        await until(pilot, lambda: screen.built, "the whole form")
        assert screen.query_one("#" + wid("train.max_steps"), Input).value == "1000"
        assert name.value == "quickstart2" and screen.raw["run"]["name"] == "quickstart2"


async def test_compose_opened_first_shows_its_top_fields_with_the_screen(ren_home: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened in front (here the last screen of a previous session), the top FRONT_ROWS fields come with the
    screen, the rest in batches; the preset fills every one of them."""
    monkeypatch.setattr(compose_module, "BUILD_PAUSE_S", 0.3)
    earlier = Backend(Store(ren_home), start_worker=False)
    earlier.remember_tui_settings({"screen": "compose"})
    earlier.flush_tui_settings()
    app = prebuilding_app(ren_home, prebuild=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        assert isinstance(screen, ComposeScreen)
        fields = [key for key in screen._keys_by_id.values() if screen._made("#row-" + wid(key))]
        assert len(set(fields)) >= compose_module.FRONT_ROWS - 1 and not screen.built
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


async def test_compose_keeps_what_is_typed_and_takes_configs_while_its_form_is_mounted(
        ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the batches of fields are being mounted, keys typed into a made field stay in it and in the
    config (a batch shows the config in its own fields only, not in one being typed in), and a config
    arriving at any moment, even while a batch is half mounted, is shown without error in every field."""
    monkeypatch.setattr(compose_module, "BUILD_PAUSE_S", 0.03)
    monkeypatch.setattr(compose_module, "BUILD_ROWS", 2)  # many batches: many moments to land in
    app = prebuilding_app(ren_home, prebuild=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen, name = await typing_in_compose(app, pilot, lambda screen: screen.loaded)
        typed, deadline = 0, time.monotonic() + 60
        while not screen.built:  # (the pilot's press waits for the screen to be idle: the whole build)
            assert time.monotonic() < deadline, "the form was never whole"
            name.insert_text_at_cursor("x")  # as a typed key does; its Changed event comes next
            typed += 1
            await asyncio.sleep(0.005)
            config = copy.deepcopy(screen.raw)  # a new config, as a preset picked: it names what was typed
            config["run"]["name"], config["train"]["max_steps"] = name.value, 1000 + typed
            screen._set_config(config)
            await asyncio.sleep(0.005)
        assert typed >= 5  # the form was still being made while this went on
        await pilot.pause(0.2)
        assert name.value == "quickstart" + "x" * typed == screen.raw["run"]["name"]
        assert screen.query_one("#" + wid("train.max_steps"), Input).value == str(1000 + typed)


async def test_a_key_typed_as_the_weights_from_picks_arrive_stays(ren_home: Path) -> None:
    """The picks of train.init_from (finished runs, presets) come from a worker at any moment; showing them
    touches that field only, so a key typed into another field just before (its change not handled yet)
    is not put back to the config's older value."""
    app = prebuilding_app(ren_home, prebuild=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen, name = await typing_in_compose(app, pilot, lambda screen: screen.loaded and screen.built)
        await app.workers.wait_for_complete()
        name.insert_text_at_cursor("x")  # its Changed event is not handled yet...
        sources = [*screen._init_sources, ("run abc: earlier (finished)", "run:abc")]
        screen._init_sources_listed(sources, screen._runs)  # ...when the picks arrive
        # the name's change is handled once the loop gets to it (later under load): wait for it, then the
        # field must still hold what was typed
        await until(pilot, lambda: screen.raw["run"]["name"] != "quickstart", "the typed name in the config", 10)
        assert name.value == "quickstartx" == screen.raw["run"]["name"]


@pytest.mark.parametrize("select_id", [wid("train.init_from") + "-pick", wid("model.kind")])
async def test_a_list_announcing_the_value_it_has_does_not_redo_the_form(ren_home: Path, select_id: str) -> None:
    """A list just made posts a change with the value it shows (the config's): that changes nothing, so the
    form is not shown again, which would put a field being typed in back to the config's older value (a
    weights-from pick on fresh weights; the architecture, a key that reshapes the config)."""
    app = prebuilding_app(ren_home, prebuild=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen, name = await typing_in_compose(app, pilot, lambda screen: screen.loaded and screen.built)
        await app.workers.wait_for_complete()
        select = screen.query_one("#" + select_id, Select)
        name.insert_text_at_cursor("x")  # its Changed event is not handled yet...
        screen._select_changed(Select.Changed(select, select.value))  # ...when the list's announcement is
        # the name's change is handled once the loop gets to it (later under load): wait for it, then the
        # field must still hold what was typed
        await until(pilot, lambda: screen.raw["run"]["name"] != "quickstart", "the typed name in the config", 10)
        assert name.value == "quickstartx" == screen.raw["run"]["name"]
