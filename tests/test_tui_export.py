"""Compare's export (``e``): the score table as values in CSV and JSON (numbers equal to the store's, units in
the column names, run ids), the config keys that differ from the baseline, and where the files are when
the clipboard cannot be reached."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from engine.store import RunRecord, Store
from ren_tui.app import RenApp
from ren_tui.backend import Backend
from ren_tui.export import OSC52_LIMIT, clipboard_problem, export_stem, flatten, samples_seen
from ren_tui.screens.compare import CompareScreen

from .tui_fake import canned_run, preset_config


def runs_with_compute(store: Store) -> list[RunRecord]:
    runs = [canned_run(store, "alpha", steps=300, seed=0),
            canned_run(store, "beta", steps=300, seed=1, config=preset_config(overrides=["optim.lr=1e-3"])),
            canned_run(store, "gamma", steps=200, seed=2, eval_every=40,
                       config=preset_config(overrides=["optim.lr=5e-4", "train.batch_size=32",
                                                       'freeze.groups=["vision"]']))]
    for i, run in enumerate(runs):
        store.update_run(run.id, compute={"pflops": 1.25 + i, "train_seconds": 209.5 + 10 * i})
    return [store.get_run(r.id) for r in runs]


async def export(app: RenApp, pilot, runs: list[RunRecord], directory: Path, *, baseline_presses: int = 0,
                 view: bool = False) -> str:
    await pilot.pause()
    await app.push_screen(CompareScreen([r.id for r in runs], export_dir=directory))
    await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.press(*"b" * baseline_presses, *"v" * view, "e")
    await pilot.pause()
    return export_stem(r.id for r in runs)


def number(cell: str) -> float:
    return float(cell)


async def test_csv_and_json_hold_the_stores_numbers_with_run_ids(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = runs_with_compute(store)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(120, 40)) as pilot:
        stem = await export(app, pilot, runs, tmp_path)
    by_id = {r.id: store.get_run(r.id) for r in runs}

    table = list(csv.DictReader(io.StringIO((tmp_path / f"{stem}.csv").read_text())))
    assert [row["run id"] for row in table] == [r.id for r in runs]
    for row in table:
        record = by_id[row["run id"]]
        assert row["run"] == record.name
        assert int(row["steps"]) == record.step and int(row["max steps"]) == record.max_steps
        assert number(row["best val/vqa_score"]) == record.best_scores["eval/vqa_score"]
        assert number(row["final val/vqa_score"]) == record.final_scores["vqa_score"]
        assert int(row["trainable params"]) == record.params["trainable"]
        assert number(row["train time (s)"]) == record.compute["train_seconds"]
        assert int(row["samples seen"]) == samples_seen(record)
        assert number(row["training compute (PFLOP)"]) == record.compute["pflops"]

    document = json.loads((tmp_path / f"{stem}.json").read_text())
    assert document["view"] == "runs" and document["baseline"] == {"id": runs[0].id, "name": "alpha"}
    assert [row["run id"] for row in document["rows"]] == [r.id for r in runs]
    for row in document["rows"]:
        record = by_id[row["run id"]]
        assert row["best val/vqa_score"] == record.best_scores["eval/vqa_score"]
        assert row["trainable params"] == record.params["trainable"] and isinstance(row["trainable params"], int)
        assert row["train time (s)"] == record.compute["train_seconds"]
        assert row["training compute (PFLOP)"] == record.compute["pflops"]


async def test_the_config_diff_is_exported_with_values(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = runs_with_compute(store)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(120, 40)) as pilot:
        stem = await export(app, pilot, runs, tmp_path, baseline_presses=1)  # beta as the baseline
    flat = {r.id: flatten(r.config) for r in runs}
    beta = runs[1]
    differing = [k for k in flat[beta.id] if any(flat[r.id].get(k) != flat[beta.id][k] for r in runs)]
    assert set(differing) == {"optim.lr", "train.batch_size", "freeze.groups"}

    document = json.loads((tmp_path / f"{stem}.json").read_text())
    assert document["baseline"]["id"] == beta.id
    entries = {entry["key"]: entry for entry in document["config_diff"]}
    assert set(entries) == set(differing)
    for key, entry in entries.items():
        assert list(entry["values"])[0] == beta.id and entry["unset"] == []
        assert entry["values"] == {r.id: flat[r.id][key] for r in runs}  # the values, typed as in the config

    table = list(csv.reader(io.StringIO((tmp_path / f"{stem}-config.csv").read_text())))
    assert table[0] == ["config key", beta.id, runs[0].id, runs[2].id]
    rows = {row[0]: row[1:] for row in table[1:]}
    assert [number(v) for v in rows["optim.lr"]] == [flat[r.id]["optim.lr"] for r in (beta, runs[0], runs[2])]
    assert [json.loads(v) for v in rows["freeze.groups"]] == [flat[r.id]["freeze.groups"]
                                                              for r in (beta, runs[0], runs[2])]

    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| config key | beta (baseline) | alpha | gamma |" in markdown
    assert app.clipboard == markdown


async def test_the_variants_view_exports_its_values(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    base, frozen = (canned_run(store, name, steps=100, stage="pretrain") for name in ("full", "frozen"))
    store.update_run(base.id, compute={"pflops": 2.0, "device_hours": 0.5, "train_seconds": 100.0})
    store.update_run(frozen.id, compute={"pflops": 1.5, "device_hours": 0.4, "train_seconds": 80.0})
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(160, 40)) as pilot:
        stem = await export(app, pilot, [base, frozen], tmp_path, view=True)
    document = json.loads((tmp_path / f"{stem}.json").read_text())
    assert document["view"] == "variants"
    rows = {row["variant"]: row for row in document["rows"]}
    assert rows["frozen"]["PFLOP (mean)"] == 1.5 and rows["full"]["PFLOP (mean)"] == 2.0
    assert rows["frozen"]["saved PFLOP (%)"] == pytest.approx((2.0 - 1.5) / 2.0 * 100)
    assert rows["frozen"]["pretraining run ids"] == [frozen.id] and rows["full"]["baseline"] is True
    table = list(csv.DictReader(io.StringIO((tmp_path / f"{stem}.csv").read_text())))
    assert number(table[1]["train time (s, mean)"]) == 80.0 and json.loads(table[1]["pretraining run ids"]) == [
        frozen.id]


@pytest.mark.parametrize(("env", "size", "says"), [
    ({"TERM": "xterm-256color"}, 100, None),
    ({"TERM": "screen", "TMUX": "/tmp/tmux-0/default,1,0"}, 100, "set-clipboard on"),
    ({"TERM": "screen", "STY": "1.pts-0"}, 100, "GNU screen"),
    ({"TERM_PROGRAM": "Apple_Terminal"}, 100, "macOS Terminal"),
    ({"TERM": "linux"}, 100, "no clipboard"),
    ({"TERM": "xterm-256color"}, OSC52_LIMIT + 1, "too long"),
])
def test_when_the_clipboard_cannot_be_reached(env: dict, size: int, says: str | None) -> None:
    problem = clipboard_problem(env, size)
    assert (problem is None) if says is None else (says in (problem or ""))


async def test_the_notice_says_where_the_file_is_when_the_copy_cannot_arrive(
        ren_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    store = Store(ren_home)
    runs = runs_with_compute(store)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(120, 40)) as pilot:
        stem = await export(app, pilot, runs, tmp_path)
        notices = [n.message for n in app._notifications]
    markdown = tmp_path / f"{stem}.md"
    assert any("may not be on your clipboard" in m and f"It is in {markdown}." in m for m in notices), notices
