"""The Compare screen (curves, scores, config diff, export) and its pure table functions."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from engine.display import markdown_table
from engine.store import RunRecord, Store
from ren_tui.app import RenApp
from ren_tui.backend import Backend
from ren_tui.export import (
    MISSING,
    config_diff,
    export_stem,
    flatten,
    format_count,
    format_value,
    score_rows,
    to_csv,
    to_latex,
)
from ren_tui.screens.compare import CompareScreen
from ren_tui.widgets.chart import Chart

from .tui_fake import canned_run, preset_config


def three_runs(store: Store) -> list[RunRecord]:
    return [
        canned_run(store, "alpha", steps=300, seed=0, keys=("loss", "loss_itm")),
        canned_run(store, "beta", steps=300, seed=1, keys=("loss", "loss_itm"),
                   config=preset_config(overrides=["optim.lr=1e-3"])),
        canned_run(store, "gamma", steps=200, seed=2, keys=("loss",), eval_every=40,
                   config=preset_config(overrides=["optim.lr=5e-4", "train.batch_size=32"])),
    ]


async def open_compare(app: RenApp, pilot: Pilot, runs: list[RunRecord], export_dir: Path) -> CompareScreen:
    await pilot.pause()
    screen = CompareScreen([r.id for r in runs], export_dir=export_dir)
    await app.push_screen(screen)
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
    return screen


def diff_rows(screen: CompareScreen) -> dict[str, list[str]]:
    table = screen.query_one("#diff", DataTable)
    return {str(key.value): [str(cell) for cell in table.get_row(key)] for key in table.rows}


async def test_compare_curves_scores_diff_and_export(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = three_runs(store)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(app, pilot, runs, tmp_path / "exports")
        chart = screen.query_one(Chart)
        assert screen.metrics == ["loss", "lr", "samples_per_s", "eval/vqa_score", "loss_itm"]  # shared ones first
        assert list(chart.series) == ["alpha", "beta", "gamma"] and chart.chart_title == "loss"
        assert len(chart.series["gamma"][0]) == 200
        await pilot.press("m", "m", "m")
        assert chart.chart_title == "eval/vqa_score" and len(chart.series["gamma"][0]) == 5

        scores = screen.query_one("#scores", DataTable)
        assert [str(c.label) for c in scores.columns.values()] == [
            "run", "stage/kind", "steps", "best val/vqa_score", "final val/vqa_score", "trainable params", "train time",
            "samples seen"]
        gamma = scores.get_row(runs[2].id)
        assert gamma[:3] == ["gamma", "finetune/two_tower", "200/200"]
        assert gamma[3] == f"{runs[2].best_scores['eval/vqa_score']:.4f}"
        assert gamma[5:] == ["600K", "1m39s", "6.40K"]  # 200 steps x batch 32

        assert diff_rows(screen) == {"optim.lr": ["optim.lr", "0.0002", "0.001", "0.0005"],
                                     "train.batch_size": ["train.batch_size", "64", "=", "32"]}
        await pilot.press("b")  # beta as the baseline
        assert diff_rows(screen) == {"optim.lr": ["optim.lr", "0.001", "0.0002", "0.0005"],
                                     "train.batch_size": ["train.batch_size", "64", "=", "32"]}
        assert "baseline beta" in str(screen.query_one("#controls", Static).render())

        await pilot.press("e")
        await pilot.pause()
        stem = export_stem(r.id for r in runs)
        markdown = (tmp_path / "exports" / f"{stem}.md").read_text()
        assert app.clipboard == markdown
        lines = markdown.splitlines()
        assert lines[0].startswith("| run | stage/kind | steps | best val/vqa_score |") and lines[1].startswith("|---|")
        for run, line in zip(runs, lines[2:5], strict=True):  # then the config keys that differ (test_tui_export)
            assert line.startswith(f"| {run.name} | finetune/two_tower |")
            assert f"| {run.best_scores['eval/vqa_score']:.4f} |" in line
        rows = list(csv.reader(io.StringIO((tmp_path / "exports" / f"{stem}.csv").read_text())))
        assert rows[0][:2] == ["run id", "run"] and [r[1] for r in rows[1:]] == ["alpha", "beta", "gamma"]
        assert float(rows[1][6]) == runs[0].best_scores["eval/vqa_score"]  # values (ren_tui.export.raw_score_rows)
        latex = (tmp_path / "exports" / f"{stem}.tex").read_text()
        assert r"best val/vqa\_score" in latex and r"finetune/two\_tower" in latex and "vqa_score" not in latex


async def test_compare_with_identical_configs_says_so(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = [canned_run(store, "same", seed=0), canned_run(store, "same", seed=1)]
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_compare(app, pilot, runs, tmp_path)
        table = screen.query_one("#diff", DataTable)
        assert table.row_count == 0 and table.border_title == "config: every run matches the baseline"
        assert list(screen.query_one(Chart).series) == [f"same ({runs[0].id[-4:]})", f"same ({runs[1].id[-4:]})"]


def test_score_rows_formats_scores_params_and_compute(ren_home: Path) -> None:
    store = Store(ren_home)
    done = canned_run(store, "done", steps=200)
    queued = store.create_run(name="queued", stage="pretrain", kind="one_tower", config={"train": {}}, max_steps=10)
    headers, rows = score_rows([done, queued])
    assert headers == ["run", "stage/kind", "steps", "best val/vqa_score", "final val/vqa_score", "trainable params",
                       "train time", "samples seen"]
    best, final = done.best_scores["eval/vqa_score"], done.final_scores["vqa_score"]
    assert rows[0] == ["done", "finetune/two_tower", "200/200", f"{best:.4f}", f"{final:.4f}", "600K", "1m39s",
                       "12.8K"]
    assert rows[1] == ["queued", "pretrain/one_tower", "0/10", "-", "-", "-", "-", "-"]


def test_markdown_latex_and_csv() -> None:
    headers, rows = ["run", "best"], [["a|b", "0.5000"], ["c_d & 50% #1", "-"]]
    assert markdown_table(headers, rows) == "| run | best |\n|---|---|\n| a\\|b | 0.5000 |\n| c_d & 50% #1 | - |\n"
    latex = to_latex(headers, rows)
    assert latex.splitlines() == [r"\begin{tabular}{ll}", r"\hline", r"run & best \\", r"\hline",
                                  r"a|b & 0.5000 \\", r"c\_d \& 50\% \#1 & - \\", r"\hline", r"\end{tabular}"]
    assert "$" not in to_latex(["x"], [["$5 {a} ~ ^ \\"]]).replace(r"\$", "")
    tricky = [["with, comma", 'a "quote"'], ["new\nline", ""]]
    assert list(csv.reader(io.StringIO(to_csv(headers, tricky)))) == [headers, *tricky]


def test_config_diff_flattens_and_reports_missing_keys() -> None:
    base = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "train": {"steps": 10, "init_from": None}, "freeze": {}}
    other = {"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "train": {"steps": 10}, "freeze": {}, "extra": {"k": 1}}
    assert flatten(base) == {"optim.lr": 1e-4, "optim.betas": [0.9, 0.999], "train.steps": 10,
                             "train.init_from": None, "freeze": {}}
    assert config_diff(base, other) == [("optim.lr", 1e-4, 1e-3), ("optim.betas", [0.9, 0.999], [0.9, 0.99]),
                                        ("train.init_from", None, MISSING), ("extra.k", MISSING, 1)]
    assert config_diff(base, base) == []
    assert [format_value(v) for v in (MISSING, None, "adamw", [0.9, 0.99], 1e-3)] == [
        "(unset)", "null", "adamw", "[0.9, 0.99]", "0.001"]


def test_format_count_and_export_stem() -> None:
    assert [format_count(n) for n in (None, 999, 1_000, 12_800, 600_000, 86_000_000, 1.2e9)] == [
        "-", "999", "1.00K", "12.8K", "600K", "86.0M", "1.20B"]
    assert export_stem(["b", "a"]) == export_stem(["a", "b"]) != export_stem(["a", "c"])
    assert export_stem(["a"]).startswith("compare-")


def test_compare_snapshot(snap_compare, ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = three_runs(store)
    app = RenApp(Backend(store, start_worker=False))

    async def run_before(pilot: Pilot) -> None:
        app.sub_title = "test store"
        await open_compare(app, pilot, runs, tmp_path)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
async def test_compare_fits_small_and_large_terminals(ren_home: Path, tmp_path: Path, size: tuple[int, int]) -> None:
    store = Store(ren_home)
    runs = three_runs(store)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=size) as pilot:
        screen = await open_compare(app, pilot, runs, tmp_path)
        chart, scores = screen.query_one(Chart), screen.query_one("#scores", DataTable)
        assert chart.size.height >= 8 and scores.region.bottom <= size[1]
        assert screen.query_one("#diff", DataTable).region.height >= 2


async def test_compare_of_an_unknown_run_says_so(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = [canned_run(store, "known")]
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = CompareScreen([runs[0].id, "nosuchrun"], export_dir=tmp_path / "exports")
        await app.push_screen(screen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "nosuchrun" in str(screen.query_one("#controls", Static).render())
        await pilot.press("e")
        assert not (tmp_path / "exports").exists()


async def test_variants_view_shows_the_report_table_with_compute_savings(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    base, frozen = (canned_run(store, name, steps=100, stage="pretrain") for name in ("full", "frozen"))
    store.update_run(base.id, compute={"pflops": 2.0, "device_hours": 0.5})
    store.update_run(frozen.id, compute={"pflops": 1.5, "device_hours": 0.4})
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(160, 40)) as pilot:
        screen = await open_compare(app, pilot, [base, frozen], tmp_path / "exports")
        await pilot.press("v")
        await pilot.pause()
        table = screen.query_one("#scores", DataTable)
        headers = [str(c.label) for c in table.columns.values()]
        assert headers[0] == "variant" and "PFLOPs" in headers and "saved PFLOPs" in headers
        row = dict(zip(headers, table.get_row("frozen")))
        assert row["PFLOPs"].startswith("1.5") and row["saved PFLOPs"].startswith("25")  # 1.5 of 2.0
        assert str(table.get_row("full (baseline)" if "full (baseline)" in table.rows else "full")[0]).startswith(
            "full")
        assert table.border_title.startswith("variants")
        await pilot.press("e")
        await pilot.pause()
        markdown = (tmp_path / "exports" / f"{export_stem([base.id, frozen.id])}.md").read_text()
        assert markdown.splitlines()[0].startswith("| variant |")
        await pilot.press("v")
        await pilot.pause()
        assert [str(c.label) for c in table.columns.values()][0] == "run"


async def test_variants_view_shows_the_difference_interval_of_the_report(ren_home: Path, tmp_path: Path) -> None:
    """Seeds of one config pool into a variant, and Δ carries its paired 95% CI, as in report.md."""
    from tests.helpers.reports import PLANS, record_finetune, record_pretrain

    store = Store(ren_home)
    runs = []
    for name, freeze, scores in (("base", (), (0.80, 0.84)), ("frozen", ('freeze.groups=["vision"]',), (0.78, 0.79))):
        for seed, score in enumerate(scores):
            runs.append(record_pretrain(store, name, seed, PLANS["none", seed], overrides=freeze))
            record_finetune(store, runs[-1], seed, score)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(200, 40)) as pilot:
        screen = await open_compare(app, pilot, runs, tmp_path / "exports")
        await pilot.press("v")
        await pilot.pause()
        table = screen.query_one("#scores", DataTable)
        headers = [str(c.label) for c in table.columns.values()]
        row = dict(zip(headers, map(str, table.get_row("frozen"))))
        print(row["Δ easy_vqa [95% CI]"])
        assert row["seeds"] == "0, 1" and row["Δ easy_vqa [95% CI]"] == "-0.0350 [-0.2256, +0.1556] within noise"


async def test_compare_picks_any_metric_a_run_logged_and_zooms_like_the_monitor(ren_home: Path,
                                                                               tmp_path: Path) -> None:
    store = Store(ren_home)
    runs = three_runs(store)
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_compare(app, pilot, runs, tmp_path)
        chart = screen.query_one(Chart)
        assert "loss_itm" in screen.metrics  # alpha and beta logged it, gamma did not
        for _ in range(len(screen.metrics)):
            if chart.chart_title.startswith("loss_itm"):
                break
            await pilot.press("m")
        assert chart.chart_title.startswith("loss_itm") and list(chart.series) == ["alpha", "beta"]
        assert "gamma" in chart.chart_title  # named as the run without it
        await pilot.press("M")  # back one
        assert not chart.chart_title.startswith("loss_itm")
        while chart.chart_title != "loss":
            await pilot.press("m")

        await pilot.press("x")  # samples seen: step x each run's own batch size
        await settle(app, pilot)
        assert chart.xlabel == "samples seen"
        assert chart.series["gamma"][0][-1] == 200 * 32 and chart.series["alpha"][0][-1] == 300 * 64
        await pilot.press("x")
        await settle(app, pilot)
        assert chart.xlabel.startswith("wall time") and chart.series["alpha"][0][0] == 0.0
        await pilot.press("x", "x")
        await settle(app, pilot)
        assert chart.xlabel == "step"

        await pilot.press("z")
        await pilot.pause()
        app.screen.query_one(Input).value = "50-150"
        await pilot.press("enter")
        await pilot.pause()
        assert chart.x_range == (50.0, 150.0)
        assert all(50 <= x <= 150 for xs, _ in chart.plotted.values() for x in xs)
        await pilot.press("right_square_bracket")
        assert chart.x_range == (100.0, 200.0)
        assert "zoom 100-200" in str(screen.query_one("#controls", Static).render())
        await pilot.press("0")
        assert chart.x_range is None


async def settle(app: RenApp, pilot: Pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
