"""Freeze: the layer groups as a tree, live counts, compact patterns written back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Static

from engine.freeze import select
from ren_tui.app import RenApp
from ren_tui.dialogs import Prompt
from ren_tui.screens.freeze import (
    FreezeScreen,
    GroupTree,
    by_part,
    compact_patterns,
    freeze_summary,
    frozen_prefix,
)
from tests.helpers.tui import GROUPS, FakeInspector, make_app
from tests.tui_fake import preset_config

NAMES = list(GROUPS)
TABLE = {name: {"total": total, "trainable": total} for name, total in GROUPS.items()}
VISION = [n for n in NAMES if n.startswith("vision.")]
ONE_TOWER = ["backbone.text_embeddings", "backbone.image_embeddings", "backbone.modality_type",
             "backbone.layers[0]", "backbone.layers[1]", "backbone.final", "pooler", "heads.mlm", "heads.itm"]


@pytest.mark.parametrize(("frozen", "patterns"), [
    (VISION, ["vision"]),
    (["text.layers[0]", "text.layers[1]"], ["text.layers[0:2]"]),
    (["text.layers[0]"], ["text.layers[0]"]),
    (["vision.layers[0]", "vision.layers[1]", "vision.layers[3]"], ["vision.layers[0:2]", "vision.layers[3]"]),
    (["text.embeddings", "vision.layers[1]", "vision.layers[2]", "pooler", "heads.task"],
     ["text.embeddings", "vision.layers[1:3]", "pooler", "heads"]),
    ([], []),
    (NAMES, ["text", "vision", "fusion", "pooler", "heads"]),
])
def test_compact_patterns_select_exactly_the_frozen_groups(frozen: list[str], patterns: list[str]) -> None:
    assert compact_patterns(NAMES, frozen) == patterns
    assert select(tuple(patterns), NAMES, "freeze.groups") == set(frozen)  # the engine's own matching


def test_frozen_prefix_needs_nothing_trainable_upstream() -> None:
    assert frozen_prefix(NAMES, {"vision.embeddings", "vision.layers[0]", "vision.layers[2]"}) \
        == {"vision.embeddings", "vision.layers[0]"}
    towers = {n for n in NAMES if n.startswith(("text", "vision"))}
    assert frozen_prefix(NAMES, towers | {"fusion.proj", "fusion.layers[1]"}) == towers | {"fusion.proj"}
    assert frozen_prefix(NAMES, {"fusion.proj"}) == set()
    assert frozen_prefix(ONE_TOWER, {"backbone.image_embeddings"}) == {"backbone.image_embeddings"}
    assert frozen_prefix(ONE_TOWER, {"backbone.image_embeddings", "backbone.layers[0]"}) \
        == {"backbone.image_embeddings"}  # the text embeddings still train under layers[0]


def test_freeze_summary_counts_and_estimates_the_saving() -> None:
    flops = {n: 1 for n in NAMES}
    flops["vision.layers[0]"] = 10
    vision = freeze_summary(TABLE, VISION, flops)  # a frozen prefix: 2 of 3 units saved
    assert vision.frozen == sum(GROUPS[n] for n in VISION)
    assert vision.trainable == sum(GROUPS.values()) - vision.frozen
    assert vision.saved_share == pytest.approx(2 * (len(VISION) - 1 + 10) / (3 * (len(NAMES) - 1 + 10)))
    middle = freeze_summary(TABLE, ["fusion.layers[1]"], flops)  # weight gradients only: 1 of 3 units
    assert middle.saved_share == pytest.approx(1 / (3 * (len(NAMES) - 1 + 10)))
    assert freeze_summary(TABLE, [], flops).saved_share == 0
    assert by_part(TABLE)["vision"] == {"total": vision.frozen, "trainable": vision.frozen}


def _side(screen: FreezeScreen) -> str:
    return str(screen.query_one("#freeze-counts", Static).render())


async def open_freeze(app: RenApp, pilot: Any, config: dict[str, Any], results: list) -> FreezeScreen:
    screen = FreezeScreen(config)
    await app.push_screen(screen, results.append)
    await app.workers.wait_for_complete()
    await pilot.pause()
    return screen


async def test_towers_and_ranges_toggle_and_dismiss_with_patterns(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    results: list = []
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_freeze(app, pilot, preset_config(), results)
        assert screen.frozen == set()
        await pilot.press("v")
        frozen = sum(GROUPS[n] for n in VISION)
        assert freeze_summary(screen.groups, screen.frozen).frozen == frozen
        assert f"frozen    {frozen:>14,}" in _side(screen)
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, Prompt)
        app.screen.query_one(Input).value = "text.layers[0:2]"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert screen.frozen == set(VISION) | {"text.layers[0]", "text.layers[1]"}
        await pilot.press("v")  # a frozen tower unfreezes
        assert screen.frozen == {"text.layers[0]", "text.layers[1]"}
        await pilot.press("a")
        await pilot.pause()
    assert results[0]["freeze"] == {"groups": ["text.layers[0:2]"], "unfreeze": []}
    assert {k: v for k, v in results[0].items() if k != "freeze"} == \
        {k: v for k, v in preset_config().items() if k != "freeze"}


async def test_tree_nodes_toggle_with_space_and_start_from_the_config(ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())
    results: list = []
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_freeze(app, pilot, preset_config(overrides=["freeze.groups=['vision']"]), results)
        assert screen.frozen == set(VISION)
        tree = screen.query_one(GroupTree)
        tree.move_cursor(tree.root.children[0])  # the text tower
        await pilot.press("space")
        assert screen.frozen == set(VISION) | {n for n in NAMES if n.startswith("text.")}
        assert str(tree.root.children[0].label).startswith("[x] text")
        await pilot.press("down", "enter")  # text.embeddings
        assert "text.embeddings" not in screen.frozen
        assert str(tree.root.children[0].label).startswith("[-] text")
        await pilot.press("r")
        await pilot.pause()
        app.screen.query_one(Input).value = "nothing[0:2]"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.screen is screen and "text.embeddings" not in screen.frozen  # a pattern error changes nothing
        await pilot.press("c")
        assert screen.frozen == set()
        await pilot.press("escape")
        await pilot.pause()
    assert results == [None]


def test_freeze_snapshot(snap_compare: Any, ren_home: Path) -> None:
    app = make_app(ren_home, FakeInspector())

    async def run_before(pilot: Any) -> None:
        await open_freeze(app, pilot, preset_config(), [])
        await pilot.press("v", "down", "down", "space")

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
