"""ren-tui reads the store live."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Static

from engine.store import Store
from ren_tui.app import make_app


async def test_runs_table_shows_store_and_refreshes(ren_home: Path) -> None:
    store = Store(ren_home)
    first = store.create_run(name="alpha", stage="finetune", kind="one_tower", config={}, max_steps=10)
    app = make_app(ren_home)
    async with app.run_test() as pilot:
        table = app.query_one("#runs", DataTable)
        assert table.row_count == 1
        assert table.get_cell(first.id, "name") == "alpha"
        store.update_run(first.id, step=7, best_scores={"eval/vqa_score": 0.91})
        second = store.create_run(name="beta", stage="pretrain", kind="two_tower", config={})
        await pilot.press("r")
        assert table.row_count == 2
        assert table.get_cell(first.id, "steps") == "7/10"
        assert "vqa_score 0.9100" in table.get_cell(first.id, "best")
        assert table.get_cell(second.id, "kind") == "two_tower"


async def test_empty_store_says_how_to_start(ren_home: Path) -> None:
    app = make_app(ren_home)
    async with app.run_test():
        detail = app.query_one("#detail", Static)
        assert "ren run presets/quickstart.toml" in str(detail.render())
