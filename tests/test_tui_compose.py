"""Compose: a run config built from a preset or a stored run, with live feedback from
the model inspector, saved as a preset, queued, and frozen through Freeze."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

from textual.widgets import Input, Select, Static

from engine.config import config_from_dict, load_preset
from engine.display import format_seconds
from engine.dotted import get_in
from engine.store import Store
from ren_tui.app import RenApp
from ren_tui.dialogs import Prompt
from ren_tui.screens.compose import (
    ComposeScreen,
    field_for_error,
    field_shown,
    parse_value,
    schema_field,
    value_type,
    wid,
)
from ren_tui.screens.freeze import FreezeScreen
from tests.helpers.tui import GROUPS, FakeInspector, make_app
from tests.tui_fake import PRESETS, canned_run, preset_config


class SlowInspector(FakeInspector):
    """A helper that is still importing torch: it starts, and answers, once ``ready`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = threading.Event()
        self.ready = threading.Event()

    def start(self) -> str | None:
        self.starting.set()
        self.ready.wait(30)
        return None

    def inspect(self, config: dict[str, Any]) -> dict[str, Any]:
        self.ready.wait(30)
        return super().inspect(config)



async def settle(app: RenApp, pilot: Any, screen: ComposeScreen, timeout: float = 90.0) -> dict[str, Any]:
    """Wait for the whole form (it is mounted a batch at a time) and the inspector's answer to the config as it
    stands now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        await app.workers.wait_for_complete()
        await pilot.pause()
        if screen.built and screen.answer is not None and screen._answered_generation == screen.generation:
            return screen.answer
    raise AssertionError("no answer from the inspector")


def summary(screen: ComposeScreen) -> str:
    return str(screen.query_one("#summary", Static).render())


# --- pure helpers ------------------------------------------------------------------


def test_widgets_follow_the_schema_types() -> None:
    assert value_type(schema_field("train.mixed_precision").annotation) == ("choice", ("no", "bf16", "fp16"), False)
    assert value_type(schema_field("model.fusion.layers").annotation) == ("int", (), False)
    assert value_type(schema_field("optim.lr").annotation) == ("float", (), False)
    assert value_type(schema_field("model.backbone.image_size").annotation) == ("int", (), False)
    assert value_type(schema_field("data.eval_max_samples").annotation) == ("int", (), True)
    assert parse_value(" 3 ", "int", False) == 3
    assert parse_value("2e-4", "float", False) == 2e-4
    assert parse_value("3.5", "int", False) == "3.5"  # left for the validation to name
    assert parse_value("", "int", True) is None and parse_value("", "int", False) == ""


def test_fields_follow_the_tower_source_and_kind() -> None:
    raw = preset_config()
    assert field_shown("model.text.hidden_size", raw) and not field_shown("model.text.name", raw)
    assert field_shown("model.vision.name", raw) and not field_shown("model.vision.patch_size", raw)
    assert not field_shown("objectives.itm.weight", {"objectives": {"mlm": {}}})
    assert field_shown("objectives.mlm.weight", {"objectives": {"mlm": {}}})
    assert not field_shown("objectives.itc", {"model": {"kind": "one_tower"}})
    assert not field_shown("objectives.mlm", {"model": {"kind": "dual_encoder"}})


def test_tower_fields_agree_with_the_engine_on_manual_only_keys() -> None:
    """engine.config's MANUAL_ONLY_KEYS are the keys its validation refuses for a pretrained tower
    (probed key by key); switching a tower to pretrained in Compose drops all of them, and the
    fields the form still shows are ones the engine accepts there."""
    from pydantic import ValidationError

    from engine.config import MANUAL_ONLY_KEYS, MANUAL_USE_KEYS, TOWERS
    from ren_tui.screens.compose import SECTIONS

    form = [key.split(".") for _, _, keys in SECTIONS for key in keys]
    for tower, schema in TOWERS.items():
        refused = set()
        for key, field in schema.model_fields.items():
            if key in ("source", "name", "dropout"):
                continue
            try:  # dropout given: an unset one is read from the checkpoint's config
                schema(source="pretrained", name="org/model", dropout=0.0, **{key: field.get_default()})
            except ValidationError as exc:
                assert "only appl" in str(exc), exc
                refused.add(key)
        assert refused == set(MANUAL_ONLY_KEYS[tower]) and refused <= set(MANUAL_USE_KEYS[tower])

        manual = {key: field.get_default() for key, field in schema.model_fields.items() if key != "name"}
        kind = "one_tower" if tower == "backbone" else "two_tower"
        screen = ComposeScreen()
        screen.raw = {"model": {"kind": kind, tower: dict(manual)}}
        screen._set_source(tower, "pretrained")
        table = screen.raw["model"][tower]
        assert table["source"] == "pretrained" and table["name"]
        assert not refused & set(table)
        schema(**{**table, "dropout": 0.0})  # what is left validates
        shown = {k[2] for k in form if k[:2] == ["model", tower] and field_shown(".".join(k), screen.raw)}
        assert shown and not shown & refused, tower


def test_errors_find_their_field() -> None:
    shown = ["model.text.hidden_size", "model.text.heads", "objectives.mlm", "train.max_steps"]
    assert field_for_error("train.max_steps", "", shown) == "train.max_steps"
    assert field_for_error("model.text", "hidden_size (30) must be divisible by heads (4)", shown) \
        == "model.text.hidden_size"
    assert field_for_error("model.text", "source = 'random' needs 'name'", shown) == "model.text.hidden_size"
    assert field_for_error("objectives.mlm.mask_prob", "", shown) == "objectives.mlm"
    assert field_for_error("train.log_every", "", shown) is None
    assert field_for_error(None, "", shown) is None


# --- the screen ---------------------------------------------------------------------


async def test_live_parameter_count_through_the_real_inspector(ren_home: Path) -> None:
    app = make_app(ren_home)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("2")
            screen = app.screen
            assert isinstance(screen, ComposeScreen)
            assert "starting model inspector" in str(screen.query_one("#inspect-state", Static).render())
            first = await settle(app, pilot, screen)
            assert first["ok"] and screen.raw["run"]["name"] == "quickstart"
            layer = first["params"]["groups"]["fusion.layers[0]"]["total"]
            assert f"{first['params']['total']:>14,}" in summary(screen)
            layers = screen.query_one("#" + wid("model.fusion.layers"), Input)
            layers.focus()
            await pilot.press("end", "backspace", "3")
            assert screen.raw["model"]["fusion"]["layers"] == 3
            second = await settle(app, pilot, screen)
            assert second["ok"] and second["params"]["total"] == first["params"]["total"] + layer
            assert f"{second['params']['total']:>14,}" in summary(screen)
            assert second["flops_per_sample"]["forward"] > first["flops_per_sample"]["forward"]
    finally:
        app.backend.close_inspector()


async def test_the_inspector_starts_with_the_app_and_compose_never_waits_for_it(ren_home: Path) -> None:
    """The helper starts when the app does (it imports torch: seconds), so Compose's first answer does not
    pay for it; until it is ready, Compose shows its form and takes edits, and the counts fill in after."""
    inspector = SlowInspector()
    app = make_app(ren_home, inspector)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            assert await asyncio.to_thread(inspector.starting.wait, 5), "the inspector did not start with the app"
            await pilot.press("2")
            screen = app.screen
            assert isinstance(screen, ComposeScreen)
            deadline = time.monotonic() + 10
            while not (screen.loaded and screen.built) and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert screen.query_one("#" + wid("run.name"), Input).value == "quickstart"
            assert "starting model inspector" in str(screen.query_one("#inspect-state", Static).render())
            steps = screen.query_one("#" + wid("train.max_steps"), Input)
            steps.focus()
            await pilot.press("end", "0")
            assert screen.raw["train"]["max_steps"] == 10000
            assert not inspector.ready.is_set() and screen.answer is None
            inspector.ready.set()
            answer = await settle(app, pilot, screen)
            assert answer["ok"] and answer["config"]["train"]["max_steps"] == 10000
            assert "✓ valid" in str(screen.query_one("#inspect-state", Static).render())
            assert f"{answer['params']['total']:>14,}" in summary(screen)
    finally:
        inspector.ready.set()


async def test_invalid_value_is_shown_next_to_its_field(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    async with app.run_test(size=(100, 30)) as pilot:
        await app.push_screen(ComposeScreen(preset_config()))
        screen = app.screen
        await settle(app, pilot, screen)
        steps = screen.query_one("#" + wid("train.max_steps"), Input)
        steps.focus()
        steps.value = ""
        await pilot.press("0")
        answer = await settle(app, pilot, screen)
        assert answer["key"] == "train.max_steps"
        error = screen.query_one("#err-" + wid("train.max_steps"), Static)
        assert error.display and "train.max_steps = 0 is out of range" in str(error.render())
        assert "invalid" in str(screen.query_one("#inspect-state", Static).render())
        await pilot.press("backspace", "5")
        assert (await settle(app, pilot, screen))["ok"]
        assert not error.display


async def test_error_without_a_field_goes_to_the_status_line(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    async with app.run_test(size=(100, 30)) as pilot:
        await app.push_screen(ComposeScreen(preset_config()))
        screen = app.screen
        await settle(app, pilot, screen)
        screen.query_one("#" + wid("model.kind"), Select).value = "dual_encoder"
        answer = await settle(app, pilot, screen)
        assert answer["key"] is None  # a finetuned dual encoder: the whole config is wrong
        assert "task 'vqa' needs fusion" in str(screen.query_one("#status", Static).render())
        assert not any(w.display for w in screen.query(".field-error"))
        assert screen.query_one("#section-projection").display and not screen.query_one("#section-fusion").display


async def test_kind_source_and_stage_reshape_the_config(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    async with app.run_test(size=(100, 30)) as pilot:
        await app.push_screen(ComposeScreen(preset_config()))
        screen = app.screen
        await settle(app, pilot, screen)
        screen.query_one("#" + wid("model.text.source"), Select).value = "pretrained"
        await pilot.pause()
        text = screen.raw["model"]["text"]
        assert text["source"] == "pretrained" and text["name"] == "bert-base-uncased" and "hidden_size" not in text
        assert screen.query_one("#row-" + wid("model.text.name")).display
        assert not screen.query_one("#row-" + wid("model.text.hidden_size")).display
        screen.query_one("#" + wid("model.text.name") + "-pick", Select).value = "__custom__"
        await pilot.pause()
        assert screen.query_one("#row-" + wid("model.text.name") + "-custom").display
        await pilot.press(*"/models/bert")
        assert screen.raw["model"]["text"]["name"] == "/models/bert"
        screen.query_one("#" + wid("stage"), Select).value = "pretrain"
        await pilot.pause()
        screen.query_one("#" + wid("model.kind"), Select).value = "one_tower"
        await pilot.pause()
        assert screen.raw["model"] == {"kind": "one_tower"}
        assert screen.raw["objectives"] == {"mlm": {}, "itm": {}} and "task" not in screen.raw
        assert screen.query_one("#section-backbone").display and not screen.query_one("#section-text").display
        assert not screen.query_one("#row-" + wid("objectives.itc")).display
        assert (await settle(app, pilot, screen))["ok"]


async def test_save_writes_a_preset_that_loads_back_equal(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    async with app.run_test(size=(100, 30)) as pilot:
        await app.push_screen(ComposeScreen(app.backend.preset_config(PRESETS / "quickstart.toml")))
        screen = app.screen
        await settle(app, pilot, screen)
        screen.query_one("#" + wid("optim.lr"), Input).value = "3e-4"
        await settle(app, pilot, screen)
        await pilot.press("ctrl+s")
        await pilot.pause()
        prompt = app.screen
        assert isinstance(prompt, Prompt)
        path = Path(prompt.query_one(Input).value)
        assert path == ren_home / "presets" / "quickstart.toml"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert load_preset(path) == config_from_dict(screen.raw)
        assert load_preset(path).optim.lr == 3e-4
        options = [str(value) for _, value in screen.query_one("#preset", Select)._options]
        assert str(path) in options  # the new user preset is offered


async def test_queue_puts_the_run_in_the_store(ren_home: Path) -> None:
    Store(ren_home).update_queue_settings(cpu_slots=2)  # two processes need two CPU slots (more are refused)
    app = make_app(ren_home, FakeInspector())
    async with app.run_test(size=(100, 30)) as pilot:
        await app.push_screen(ComposeScreen(app.backend.preset_config(PRESETS / "quickstart.toml")))
        screen = app.screen
        await settle(app, pilot, screen)
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert isinstance(app.screen, Prompt)
        app.screen.query_one(Input).value = "2"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
    runs = {r.name: r for r in Store(ren_home).list_runs()}
    assert runs["quickstart"].status == "queued" and runs["quickstart"].gpus == 2
    assert runs["quickstart"].config["train"]["init_from"] == f"run:{runs['easyvqa-pretrain'].id}"
    assert runs["easyvqa-pretrain"].status == "queued"  # the pretraining it starts from goes first


async def test_clone_edit_and_freeze_round_trip(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    config = preset_config()
    async with app.run_test(size=(100, 30)) as pilot:
        app.clone_to_compose(config)
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ComposeScreen) and screen.raw == config
        await settle(app, pilot, screen)
        screen.set_focus(None)
        await pilot.press("f")
        await pilot.pause()
        assert isinstance(app.screen, FreezeScreen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("v", "a")
        await pilot.pause()
        assert app.screen is screen and screen.raw["freeze"]["groups"] == ["vision"]
        assert str(screen.query_one("#" + wid("freeze.groups"), Static).render()).startswith("vision")
        answer = await settle(app, pilot, screen)
        assert answer["params"]["frozen"] == sum(t for n, t in GROUPS.items() if n.startswith("vision"))
        assert "❄" in summary(screen)
        await pilot.press("escape")
        assert app.screen is not screen


def test_compose_snapshot(snap_compare: Any, ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())

    async def run_before(pilot: Any) -> None:
        await app.push_screen(ComposeScreen(preset_config()))
        await settle(app, pilot, app.screen)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)



# --- the fields of issue 17: seed, dropout, warmup, weight decay, intervals, init_from ------------------------

NEW_FIELDS = ("run.seed", "model.text.dropout", "model.vision.dropout", "model.fusion.dropout",
              "optim.warmup_ratio", "optim.weight_decay", "train.log_every", "train.eval_every",
              "train.checkpoint_every")


async def open_compose(app: RenApp, pilot: Any, config: dict[str, Any]) -> ComposeScreen:
    await app.push_screen(ComposeScreen(config))
    screen = app.screen
    assert isinstance(screen, ComposeScreen)
    await settle(app, pilot, screen)
    return screen


async def test_seed_dropout_schedule_and_intervals_are_fields(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    config = app.backend.preset_config(PRESETS / "quickstart.toml")
    async with app.run_test(size=(100, 40)) as pilot:
        screen = await open_compose(app, pilot, config)
        for key in NEW_FIELDS:  # each shows the preset's value
            assert screen.query_one("#" + wid(key), Input).value == str(get_in(config, key)), key
        edits = {"run.seed": ("7", 7), "model.text.dropout": ("0.2", 0.2), "model.fusion.dropout": ("0.05", 0.05),
                 "optim.warmup_ratio": ("0.2", 0.2), "optim.weight_decay": ("0.1", 0.1),
                 "train.log_every": ("10", 10), "train.eval_every": ("100", 100),
                 "train.checkpoint_every": ("200", 200)}
        for key, (typed, _) in edits.items():
            screen.query_one("#" + wid(key), Input).value = typed
        answer = await settle(app, pilot, screen)
        assert answer["ok"]
        for key, (_, value) in edits.items():
            assert get_in(screen.raw, key) == value and get_in(answer["config"], key) == value, key

        screen.query_one("#" + wid("model.vision.dropout"), Input).value = ""  # unset: the tower's own
        answer = await settle(app, pilot, screen)
        assert answer["ok"] and get_in(screen.raw, "model.vision.dropout") is None

        warmup = screen.query_one("#" + wid("optim.warmup_ratio"), Input)
        warmup.value = "1.5"
        answer = await settle(app, pilot, screen)
        assert not answer["ok"] and answer["key"] == "optim.warmup_ratio"
        error = screen.query_one("#err-" + wid("optim.warmup_ratio"), Static)
        assert error.display and "optim.warmup_ratio" in str(error.render())

        screen.query_one("#" + wid("stage"), Select).value = "pretrain"  # pretraining evaluates no task
        await pilot.pause()
        assert not screen.query_one("#row-" + wid("train.eval_every")).display
        assert screen.query_one("#row-" + wid("train.log_every")).display


async def test_init_from_is_picked_from_finished_runs_and_presets(ren_home: Path) -> None:
    store = Store(ren_home)
    done = canned_run(store, "pretrained-here", stage="pretrain")
    other = canned_run(store, "other-shape", config=preset_config(overrides=["model.fusion.hidden_size=64"]))
    canned_run(store, "still-running", status="running")
    app = make_app(ren_home, FakeInspector())
    config = app.backend.preset_config(PRESETS / "quickstart.toml")
    async with app.run_test(size=(100, 40)) as pilot:
        screen = await open_compose(app, pilot, config)
        pick = screen.query_one("#" + wid("train.init_from") + "-pick", Select)
        values = [value for _, value in pick._options]
        assert f"run:{done.id}" in values and f"run:{other.id}" in values
        assert not any(v.endswith(r.id) for r in store.list_runs() if r.status != "finished" for v in values)
        assert pick.value == config["train"]["init_from"] == f"preset:{PRESETS / 'easyvqa_pretrain.toml'}"
        assert not screen.query_one("#row-" + wid("train.init_from") + "-custom").display

        pick.value = f"run:{done.id}"
        answer = await settle(app, pilot, screen)
        assert answer["ok"] and screen.raw["train"]["init_from"] == f"run:{done.id}"

        pick.value = f"run:{other.id}"  # another architecture: said next to the field
        answer = await settle(app, pilot, screen)
        assert not answer["ok"] and answer["key"] == "train.init_from"
        error = screen.query_one("#err-" + wid("train.init_from"), Static)
        assert error.display and "another architecture" in str(error.render())

        pick.value = ""  # fresh weights
        answer = await settle(app, pilot, screen)
        assert answer["ok"] and screen.raw["train"].get("init_from") is None and not error.display

        pick.value = "__custom__"
        await pilot.pause()
        typed = screen.query_one("#" + wid("train.init_from"), Input)
        assert typed.has_focus and screen.query_one("#row-" + wid("train.init_from") + "-custom").display
        await pilot.press(*"/no/ckpt")
        answer = await settle(app, pilot, screen)
        assert screen.raw["train"]["init_from"] == "/no/ckpt"
        assert not answer["ok"] and answer["key"] == "train.init_from" and "does not exist" in answer["error"]


# --- the run's total compute and time --------------------------------------------------------------------


async def test_compose_times_the_run_by_this_machines_finished_runs(ren_home: Path) -> None:
    store = Store(ren_home)
    app = make_app(ren_home, FakeInspector())
    config = preset_config()
    async with app.run_test(size=(100, 50)) as pilot:
        screen = await open_compose(app, pilot, config)
        text = summary(screen)
        assert "Run total (estimate)" in text and "  time        -" in text
        assert "no finished run on this machine" in text

        flops = screen.answer["flops_per_sample"]
        done = canned_run(store, "timed", steps=1000)
        store.update_run(done.id, host=socket.gethostname(), compute={
            "device": "cpu: test", "processes": 1, "pflops": 2.0, "train_seconds": 400.0,
            "flops_per_sample": {"train": flops["train"]}})
        await app.push_screen(ComposeScreen(config))
        screen = app.screen
        await settle(app, pilot, screen)
        deadline = time.monotonic() + 10
        while "time        ≈" not in summary(screen) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        text = summary(screen)
        rate = 2.0e15 / 400.0
        work = flops["train"] * config["train"]["batch_size"] * config["train"]["max_steps"]
        assert f"  time        ≈ {format_seconds(work / rate)}" in text
        flat = " ".join(line.strip() for line in text.splitlines())
        assert "from 1 finished run of this size on this machine" in flat


def test_compose_training_snapshot(snap_compare: Any, ren_home: Path) -> None:
    """The Training and Intervals sections (init_from picked from the presets) and the side panel's run
    total, timed by a finished run of this size on this machine."""
    store = Store(ren_home)
    done = canned_run(store, "timed", steps=1000)
    per_sample = 30 * sum(GROUPS.values())  # FakeInspector's training FLOPs per sample
    store.update_run(done.id, host=socket.gethostname(), compute={
        "device": "cpu: test", "processes": 1, "pflops": 1.5, "train_seconds": 600.0,
        "flops_per_sample": {"train": per_sample}})
    app = make_app(ren_home, FakeInspector())

    async def run_before(pilot: Any) -> None:
        await app.push_screen(ComposeScreen(app.backend.preset_config(PRESETS / "quickstart.toml")))
        screen = app.screen
        await settle(app, pilot, screen)
        deadline = time.monotonic() + 10
        while "time        ≈" not in summary(screen) and time.monotonic() < deadline:
            await pilot.pause(0.05)
        screen.query_one("#section-training").scroll_visible(top=True, animate=False)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
