"""Reports: per-variant tables from stored runs, the files written, and `ren report`."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import config_from_dict, load_preset
from engine.report import (
    DASH,
    ReportTable,
    difference_interval,
    report_rows,
    report_series,
    t_quantile,
    write_report,
)
from engine.runs import create_run
from engine.store import RunRecord, Store
from tests.helpers.cli import HEAVY, modules_after, ren
from tests.helpers.reports import FT, PLANS, PRE, T0, record_finetune, record_pretrain

STUDY = "freeze-demo"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FREEZE = {"none": None, "vision": '["vision"]', "both": '["text", "vision"]'}


def _study_file(path: Path, name: str = STUDY) -> Path:
    path.write_text(
        f'[study]\nname = "{name}"\ndescription = "Which tower to freeze while pretraining."\n'
        f'pretrain = "{PRE}"\nbaseline = "none"\nseeds = [0, 1]\n\n'
        '[variants]\nnone = {}\nvision = { "freeze.groups" = ["vision"] }\n'
        'both = { "freeze.groups" = ["text", "vision"] }\n\n'
        f'[[finetune]]\nname = "easy-vqa"\npreset = "{FT}"\n'
    )
    return path


def _build_study(store: Store, file: Path) -> dict[tuple[str, int], tuple[RunRecord, RunRecord]]:
    """The 3-variant x 2-seed study with one finetune task, recorded as its runs would be."""
    runs = {}
    for (variant, seed), plan in PLANS.items():
        tag = {"name": STUDY, "variant": variant, "seed": seed, "file": str(file)}
        freeze = (f"freeze.groups={FREEZE[variant]}",) if FREEZE[variant] else ()
        pre = record_pretrain(store, f"{STUDY}/{variant}/s{seed}", seed, plan, overrides=freeze,
                              study={**tag, "stage": "pretrain", "task": None})
        ft = record_finetune(store, pre, seed, plan.score, study={**tag, "stage": "finetune", "task": "easy-vqa"})
        runs[variant, seed] = (pre, ft)
    return runs


@pytest.fixture
def study(ren_home: Path, tmp_path: Path) -> tuple[Store, Path, dict]:
    store = Store(ren_home)
    file = _study_file(tmp_path / "freeze-demo.toml")
    return store, file, _build_study(store, file)


def _row(table: ReportTable, variant: str):
    return next(row for row in table.rows if row.variant == variant)


def test_study_rows_mean_std_and_savings(study) -> None:
    store, file, runs = study
    from engine.study import load_study

    table = report_rows(store, load_study(file))
    assert [row.variant for row in table.rows] == ["none", "vision", "both"]
    assert table.baseline == "none" and table.tasks == ("easy-vqa",) and table.metrics == {"easy-vqa": "vqa_score"}
    none, vision, both = table.rows
    assert none.is_baseline and not vision.is_baseline
    score = none.scores["easy-vqa"]
    assert score.n == 2 and score.mean == pytest.approx(0.82) and score.std == pytest.approx(0.0282842712)
    assert vision.scores["easy-vqa"].std == pytest.approx(0.0070710678)
    assert both.scores["easy-vqa"].n == 1 and both.scores["easy-vqa"].std is None
    assert vision.score_delta["easy-vqa"] == pytest.approx(-0.035)
    assert both.score_delta["easy-vqa"] == pytest.approx(-0.12)
    # PFLOPs: 10 (baseline) -> 6 saves 40 %; "both" has compute for seed 0 only: 3 -> 70 %.
    assert vision.saved_pflops_pct == pytest.approx(40.0) and both.saved_pflops_pct == pytest.approx(70.0)
    assert both.pflops.n == 1
    # Train time: baseline (100 + 120) / 2 = 110 s; 66 s saves 40 %, 33 s saves 70 %.
    assert none.train_s.mean == pytest.approx(110.0)
    assert vision.saved_train_pct == pytest.approx(40.0) and both.saved_train_pct == pytest.approx(70.0)
    assert none.device_hours.mean == pytest.approx(0.055) and none.peak_memory_mb.mean == pytest.approx(1000.0)
    assert (vision.trainable, vision.total) == (600_000, 1_000_000)
    assert [s for s, _ in both.seed_scores["easy-vqa"]] == [0]
    assert any(runs["both", 1][0].id in n and "no compute record" in n for n in table.notes)
    running = f"is running (step 200/{load_preset(FT).train.max_steps})"
    assert any(runs["both", 1][1].id in n and running in n for n in table.notes)


def test_a_newer_run_of_a_slot_supersedes_the_older(study) -> None:
    """When the study file changed, `ren study run` queues a new run for the slot: it is the one reported."""
    store, file, runs = study
    tag = {"name": STUDY, "variant": "vision", "seed": 1, "stage": "pretrain", "task": None, "file": str(file)}
    newer = record_pretrain(store, f"{STUDY}/vision/s1", 1, PLANS["vision", 1], study=tag, status="running")
    vision = _row(report_rows(store, STUDY), "vision")
    assert [ref.id for ref in vision.pretrains] == [runs["vision", 0][0].id, newer.id]
    assert vision.pflops.n == 1 and vision.train_s.n == 1
    assert next(f for f in vision.finetunes if f.seed == 1).parent == runs["vision", 1][0].id  # what it started from
    notes = " ".join(report_rows(store, STUDY).notes)
    assert f"run {runs['vision', 1][0].id} was superseded by run {newer.id}" in notes


def test_markdown_table_content(study) -> None:
    store, _, _ = study
    table = report_rows(store, STUDY)  # by name: variants in the order their runs were created
    lines = table.markdown().splitlines()
    assert lines[0] == ("| variant | seeds | easy-vqa (vqa_score on val) | Δ easy-vqa [95% CI] | PFLOPs | "
                        "saved PFLOPs | device-h | train time | saved time | peak memory | trainable / total params |")
    assert lines[2] == ("| none (baseline) | 0, 1 | 0.8200 ± 0.0283 (n=2) | +0.0000 | 10 | 0.0% | 0.055 | 1m50s | "
                        "0.0% | 1000 MB | 1.00M / 1.00M |")
    # paired over seeds 0, 1: differences -0.02, -0.05; -0.035 +/- 12.7062 * 0.0212132 / sqrt(2)
    assert lines[3] == ("| vision | 0, 1 | 0.7850 ± 0.0071 (n=2) | -0.0350 [-0.2256, +0.1556] within noise | 6 | "
                        "40.0% | 0.033 | 1m06s | 40.0% | 700 MB | 600K / 1.00M |")
    assert lines[4] == ("| both | 0, 1 | 0.7000 (n=1) | -0.1200 (no CI) | 3 | 70.0% | 0.015 | 33s | 70.0% | 500 MB | "
                        "250K / 1.00M |")
    per_task = table.task_cells()
    assert per_task[0] == ["easy-vqa", "none", "vqa_score", "2", "0.8200 ± 0.0283", "seed 0: 0.8000, seed 1: 0.8400",
                           "+0.0000", DASH, "baseline"]
    assert per_task[1][7:] == ["[-0.2256, +0.1556] within noise (contains 0)", "paired t over seeds 0, 1 (n=2)"]
    assert per_task[2][7:] == [DASH, "no interval: seed 0 is the only seed both ran, and a paired interval needs 2"]


def test_missing_data_is_a_dash(ren_home: Path) -> None:
    """A running pretraining, one without compute and one without finetunes: dashes, and notes say why."""
    store = Store(ren_home)
    done = record_pretrain(store, "done", 0, PLANS["none", 0])
    record_finetune(store, done, 0, 0.8)
    running = record_pretrain(store, "going", 0, PLANS["vision", 0], status="running")
    old = record_pretrain(store, "old", 0, PLANS["both", 1])
    table = report_rows(store, [done.id, running.id, old.id])
    assert [row.variant for row in table.rows] == ["done", "going", "old"] and table.baseline == "done"
    cells = {row[0]: row for row in table.cells()}
    going, no_compute = cells["going"], cells["old"]
    # columns: variant, seeds, score, delta, PFLOPs, saved, device-h, train time, saved time, memory, params
    assert going[2:10] == [DASH] * 8
    assert no_compute[2] == DASH and no_compute[4] == DASH and no_compute[6] == DASH and no_compute[9] == DASH
    assert no_compute[7] == "33s" and no_compute[8] == "67.0%"  # without a compute record: the last session's
    assert going[10] == "600K / 1.00M"
    notes = " ".join(table.notes)
    steps = load_preset(PRE).train.max_steps
    assert f"pretraining {running.id} (seed 0) is running (step {steps}/{steps})" in notes
    assert f"pretraining {old.id} (seed 0) has no compute record" in notes
    assert f"pretraining {old.id} (seed 0) records no training time (train_seconds)" in notes
    assert "going has no easy_vqa finetune yet" in notes


def test_train_time_of_a_resumed_run_counts_every_session(ren_home: Path) -> None:
    """A resumed run's started_at is its last session's start: train time is the recorded train_seconds."""
    store = Store(ren_home)
    base = record_pretrain(store, "base", 0, PLANS["none", 0])  # 100 s in one session
    resumed = record_pretrain(store, "resumed", 0, PLANS["vision", 0])
    # three sessions trained 25 + 25 + 30 s; the last ran from start + 500 to start + 535
    compute = {**resumed.compute, "train_seconds": 80.0}
    store.update_run(resumed.id, compute=compute, started_at=resumed.started_at + 500,
                     ended_at=resumed.started_at + 535)
    table = report_rows(store, [base.id, resumed.id])
    row = _row(table, "resumed")
    cells = dict(zip(table.headers(), table.cells()[1]))
    print(f"resumed run: last session 35 s, trained 80 s in all -> train time {cells['train time']}, "
          f"saved {cells['saved time']} against the 100 s baseline")
    assert row.train_s.values == (80.0,) and row.saved_train_pct == pytest.approx(20.0)
    assert (cells["train time"], cells["saved time"]) == ("1m20s", "20.0%")


def test_runs_become_variants_by_name_with_their_finetunes(ren_home: Path) -> None:
    store = Store(ren_home)
    first = record_pretrain(store, "pre", 0, PLANS["none", 0])
    second = record_pretrain(store, "pre", 1, PLANS["vision", 0], overrides=('freeze.groups=["vision"]',))
    scores = [record_finetune(store, second, seed, score) for seed, score in ((0, 0.7), (1, 0.9))]
    record_finetune(store, first, 0, 0.6)
    # A listed finetune stands for its pretraining; the first listed is the baseline.
    table = report_rows(store, [scores[0].id, first.id])
    assert [row.variant for row in table.rows] == [f"pre@{second.id[-4:]}", f"pre@{first.id[-4:]}"]
    assert table.tasks == ("easy_vqa",) and table.baseline == table.rows[0].variant
    mine, other = table.rows
    assert mine.scores["easy_vqa"].mean == pytest.approx(0.8) and mine.scores["easy_vqa"].n == 2
    assert {ref.id for ref in mine.finetunes} == {s.id for s in scores}
    assert other.score_delta["easy_vqa"] == pytest.approx(-0.2)
    assert other.saved_pflops_pct == pytest.approx((6.0 - 10.0) / 6.0 * 100.0)


def test_a_finetune_from_scratch_is_its_own_variant(ren_home: Path) -> None:
    store = Store(ren_home)
    pre = record_pretrain(store, "pre", 0, PLANS["none", 0])
    record_finetune(store, pre, 0, 0.8)
    raw = load_preset(FT, ["run.name=scratch"]).to_dict()
    raw["train"]["init_from"] = None
    scratch = create_run(store, config_from_dict(raw), str(FT))
    store.update_run(scratch.id, status="finished", started_at=T0, ended_at=T0 + 10, final_scores={"vqa_score": 0.5})
    table = report_rows(store, [pre.id, scratch.id])
    row = _row(table, "scratch")
    assert row.pretrains == () and row.scores["easy_vqa"].mean == pytest.approx(0.5)
    assert row.score_delta["easy_vqa"] == pytest.approx(-0.3)
    # no compute record: its last session's time only; no savings against a pretraining baseline
    assert table.cells()[1][4:10] == [DASH, DASH, DASH, "10s", DASH, DASH]
    assert "scratch has no pretraining run; its compute, train time and parameter columns are its finetunes'" \
        in " ".join(table.notes)


def _scratch(store: Store, seed: int, train_seconds: float) -> RunRecord:
    """A finished finetune from no run of the store (hub weights or scratch), with its compute record."""
    raw = load_preset(FT, ["run.name=scratch", f"run.seed={seed}"]).to_dict()
    raw["train"]["init_from"] = None
    record = create_run(store, config_from_dict(raw), str(FT))
    compute = {"pflops": 2.0 + seed, "device_hours": train_seconds / 3600, "peak_memory_mb": 300.0,
               "train_seconds": train_seconds, "processes": 1}
    return store.update_run(record.id, status="finished", started_at=T0, ended_at=T0 + 999, compute=compute,
                            final_scores={"vqa_score": 0.5 + seed / 10}, params={"total": 1_000_000,
                            "trainable": 600_000, "frozen": 400_000, "groups": {}})


def test_finetune_only_variants_show_their_own_compute(ren_home: Path) -> None:
    store = Store(ren_home)
    pre = record_pretrain(store, "pre", 0, PLANS["none", 0])
    record_finetune(store, pre, 0, 0.8)
    runs = [_scratch(store, 0, 40.0), _scratch(store, 1, 60.0)]
    alone = report_rows(store, [r.id for r in runs])
    cells = dict(zip(alone.headers(), alone.cells()[0]))
    print({k: cells[k] for k in ("seeds", "PFLOPs", "train time", "peak memory", "trainable / total params")})
    assert [row.variant for row in alone.rows] == ["scratch"] and alone.rows[0].compute_stage == "finetune"
    assert (cells["seeds"], cells["PFLOPs"], cells["saved PFLOPs"], cells["train time"], cells["saved time"]) \
        == ("0, 1", "2.5", "0.0%", "50s", "0.0%")
    assert (cells["peak memory"], cells["trainable / total params"]) == ("300 MB", "600K / 1.00M")
    mixed = _row(report_rows(store, [pre.id, *(r.id for r in runs)]), "scratch")
    assert mixed.pflops.mean == pytest.approx(2.5) and mixed.saved_pflops_pct is None  # not like with like


def test_listed_seeds_of_one_config_pool_into_one_variant(ren_home: Path) -> None:
    """`ren report RUN RUN ...`: runs differing only in run.seed are one variant with several seeds."""
    store = Store(ren_home)
    seeds = [record_pretrain(store, "pre", seed, PLANS["none", seed]) for seed in (0, 1)]
    for pre, score in zip(seeds, (0.80, 0.84)):
        record_finetune(store, pre, _seed_of(pre), score)
    other = record_pretrain(store, "pre", 0, PLANS["vision", 0], overrides=('freeze.groups=["vision"]',))
    record_finetune(store, other, 0, 0.78)
    table = report_rows(store, [seeds[0].id, seeds[1].id, other.id])
    print([(row.variant, row.seeds, row.scores["easy_vqa"].values) for row in table.rows])
    assert [row.variant for row in table.rows] == [f"pre@{seeds[0].id[-4:]}", f"pre@{other.id[-4:]}"]
    pooled = table.rows[0]
    assert pooled.seeds == (0, 1) and pooled.scores["easy_vqa"].mean == pytest.approx(0.82)
    assert pooled.scores["easy_vqa"].n == 2 and pooled.train_s.mean == pytest.approx(110.0)
    assert len(report_rows(store, [seeds[0].id, seeds[0].id]).rows) == 1  # the same run twice is one run


def _seed_of(record: RunRecord) -> int:
    return record.config["run"]["seed"]


def test_latex_table_escapes_names(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    odd = record_pretrain(store, "pre_50%&#1", 0, PLANS["none", 0])
    record_finetune(store, odd, 0, 0.8)
    record_finetune(store, odd, 1, 0.9)
    table = report_rows(store, [odd.id])
    tex = table.latex()
    assert tex.startswith(r"\begin{tabular}{lrrrrrrr}" + "\n\\toprule\n")
    assert r"\midrule" in tex and tex.endswith("\\bottomrule\n\\end{tabular}\n")
    assert (r"Variant & easy\_vqa (vqa\_score on val) & $\Delta$ easy\_vqa [95\% CI] & PFLOPs & Saved PFLOPs & "
            r"Train time & Saved time") in tex
    assert (r"pre\_50\%\&\#1 (baseline) & 0.8500 $\pm$ 0.0707 (n=2) & +0.0000 & 10 & 0.0\% & 1m40s & 0.0\% & "
            r"1.00M / 1.00M \\") in tex


def test_series_and_files(study, tmp_path: Path) -> None:
    store, _, runs = study
    table = report_rows(store, STUDY)
    series = report_series(store, table)
    assert len(series.loss) == 6 and {c.variant for c in series.loss} == {"none", "vision", "both"}
    first = next(c for c in series.loss if c.run_id == runs["none", 0][0].id)
    assert first.points[0] == (100.0, pytest.approx(6.0 - 0.5 - 1.0))
    # Eval score against pretraining PFLOPs + the finetune's own PFLOPs at the eval steps (200, 400);
    # "both" seed 1 has neither pretraining compute nor a finished finetune: no curve.
    curves = {c.run_id: c.points for c in series.score_compute["easy-vqa"]}
    assert len(curves) == 5
    assert curves[runs["vision", 1][1].id] == (
        (pytest.approx(6.5), pytest.approx(0.74)), (pytest.approx(7.0), pytest.approx(0.79)))

    paths = write_report(table, series, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["loss.png", "report.md", "score_vs_compute.png", "table.tex"]
    for png in ("loss.png", "score_vs_compute.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith(f"# Study {STUDY}\n")
    assert table.markdown() in md and "## Per task" in md and "## Missing data" in md
    assert "![loss](loss.png)" in md and "![score_vs_compute](score_vs_compute.png)" in md
    assert (tmp_path / "out" / "table.tex").read_text() == table.latex()


def test_figures_without_data_are_skipped(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    pre = record_pretrain(store, "lonely", 0, PLANS["both", 1])
    table = report_rows(store, [pre.id])
    paths = write_report(table, report_series(store, table), tmp_path)
    assert sorted(p.name for p in paths) == ["loss.png", "report.md", "table.tex"]
    assert "score_vs_compute.png is not drawn" in (tmp_path / "report.md").read_text()


def test_ren_report_study_by_file_name_and_runs(study, ren_home: Path, tmp_path: Path) -> None:
    _, file, runs = study
    by_file = ren("report", str(file), "--out", str(tmp_path / "a"))
    assert by_file.returncode == 0, by_file.stderr
    assert "0.8200 ± 0.0283 (n=2)" in by_file.stdout and "40.0%" in by_file.stdout
    assert f"wrote {tmp_path / 'a' / 'report.md'}" in " ".join(by_file.stdout.split())
    assert (tmp_path / "a" / "score_vs_compute.png").read_bytes().startswith(PNG_MAGIC)
    assert "variant vision: freeze.groups = ['vision']" in (tmp_path / "a" / "report.md").read_text()

    by_name = ren("report", STUDY)
    assert by_name.returncode == 0, by_name.stderr
    assert (ren_home / "reports" / STUDY / "report.md").is_file()
    assert (ren_home / "reports" / STUDY / "table.tex").is_file()

    ids = [runs["vision", 0][0].id, runs["none", 0][0].id[:-1]]  # a unique prefix
    by_ids = ren("report", *ids, "--out", str(tmp_path / "b"))
    assert by_ids.returncode == 0, by_ids.stderr
    md = (tmp_path / "b" / "report.md").read_text()
    assert md.startswith(f"# Runs {STUDY}/vision/s0, {STUDY}/none/s0\n")
    assert f"| {STUDY}/vision/s0 (baseline) | 0 | 0.7800 (n=1) |" in md


def test_ren_report_errors_exit_2(ren_home: Path, tmp_path: Path) -> None:
    empty = ren("report", str(_study_file(tmp_path / "empty.toml", "empty-study")))
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert "Study 'empty-study' has no runs in the store" in " ".join(empty.stderr.split())
    unknown = ren("report", "no-such-thing")
    assert unknown.returncode == 2
    assert "'no-such-thing' is neither a study file, the name of a study" in " ".join(unknown.stderr.split())
    store = Store(ren_home)
    pre = record_pretrain(store, "real", 0, PLANS["none", 0])
    several = ren("report", pre.id, "nope")
    assert several.returncode == 2 and "No run with id 'nope'" in several.stderr
    missing = ren("report", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2 and "missing.toml" in missing.stderr
    for result in (empty, unknown, several, missing):
        assert "Traceback" not in result.stderr


def test_report_modules_import_neither_torch_nor_matplotlib() -> None:
    """The TUI imports engine.report: torch stays out, and matplotlib comes only when drawing."""
    mods = modules_after("import engine.report, engine.cli.report")
    assert "engine.study" in mods
    assert not [m for m in (*HEAVY, "matplotlib", "textual") if m in mods]


def test_t_quantiles_match_the_tables() -> None:
    """t_{0.975, df} from printed tables; df = 1.6842 (Welch) from mpmath's regularised betainc, solved."""
    table = {1: 12.7062047, 2: 4.3026527, 4: 2.7764451, 10: 2.2281389, 30: 2.0422725, 1.6842105263: 5.1762316}
    got = {df: t_quantile(0.975, df) for df in table}
    print({df: round(q, 7) for df, q in got.items()})
    assert all(got[df] == pytest.approx(q, abs=1e-6) for df, q in table.items())


def test_difference_intervals_against_hand_computed_values() -> None:
    base = [(0, 0.80), (1, 0.84), (2, 0.82)]
    # paired: differences -0.02, -0.05, -0.02: mean -0.03, sd sqrt(0.0003), se 0.01; t_{0.975,2} = 4.3026527
    noise = difference_interval([(0, 0.78), (1, 0.79), (2, 0.80)], base)
    # differences -0.10, -0.09, -0.11: mean -0.10, sd 0.01, se 0.01 / sqrt(3)
    real = difference_interval([(0, 0.70), (1, 0.75), (2, 0.71)], base)
    # Welch, no seed in common: var 0.0008 / 2 + 0.0004 / 3, df 1.6842105, t = 5.1762316: -0.10 +/- 0.1195399
    welch = difference_interval([(5, 0.70), (6, 0.74)], base)
    one = difference_interval([(0, 0.70), (7, 0.75)], base)
    print(f"paired within noise {noise}\npaired real {real}\nWelch {welch}\none shared seed {one}")
    assert (noise.low, noise.high) == (pytest.approx(-0.03 - 0.043026527), pytest.approx(-0.03 + 0.043026527))
    assert noise.within_noise and noise.how == "paired t over seeds 0, 1, 2 (n=3)"
    half = 4.3026527 * 0.01 / 3 ** 0.5
    assert (real.low, real.high) == (pytest.approx(-0.10 - half), pytest.approx(-0.10 + half))
    assert real.within_noise is False
    assert (welch.low, welch.high) == (pytest.approx(-0.2195399, abs=1e-7), pytest.approx(0.0195399, abs=1e-7))
    assert welch.how == "Welch (n=2 and 3, df=1.7)" and welch.within_noise
    assert one.low is None and one.within_noise is None and "seed 0 is the only seed both ran" in one.how


def test_report_files_give_the_interval_and_say_which_differences_are_noise(ren_home: Path, tmp_path: Path) -> None:
    """Three seeds of a baseline and two variants, listed as run ids: pooled, paired, written out."""
    store = Store(ren_home)
    variants = {"base": (None, (0.80, 0.84, 0.82)), "frozen": ('["vision"]', (0.70, 0.75, 0.71)),
                "same": ('["text"]', (0.78, 0.79, 0.80))}
    ids = []
    for name, (groups, scores) in variants.items():
        freeze = (f"freeze.groups={groups}",) if groups else ()
        for seed, score in enumerate(scores):
            pre = record_pretrain(store, name, seed, PLANS["none", seed % 2], overrides=freeze)
            record_finetune(store, pre, seed, score)
            ids.append(pre.id)
    table = report_rows(store, ids)
    write_report(table, report_series(store, table), tmp_path / "out")
    markdown, tex = (tmp_path / "out" / "report.md").read_text(), (tmp_path / "out" / "table.tex").read_text()
    section = markdown.split("## Differences to the baseline\n")[1].split("##")[0]
    print(section)
    assert "paired t interval on the per-seed differences" in markdown
    assert ("- easy_vqa, frozen − base: Δ -0.1000, 95% CI [-0.1248, -0.0752] (paired t over seeds 0, 1, 2 (n=3)): "
            "the interval excludes 0.") in section
    assert ("- easy_vqa, same − base: Δ -0.0300, 95% CI [-0.0730, +0.0130] (paired t over seeds 0, 1, 2 (n=3)): "
            "within noise (the interval contains 0).") in section
    assert r"frozen & 0.7200 $\pm$ 0.0265 (n=3) & -0.1000 [-0.1248, -0.0752] & " in tex
    assert r"same & 0.7900 $\pm$ 0.0100 (n=3) & -0.0300 [-0.0730, +0.0130] within noise & " in tex


def _keep_breakdown(store: Store, finetune: RunRecord, scores: dict[str, float], split: str | None = None) -> None:
    """What `ren eval task` keeps of a finetune's split: its score per category (no examples)."""
    from engine.display import eval_split_of
    from engine.predictions import CategoryScore, SplitPredictions, keep_predictions

    split = split or eval_split_of(finetune)
    rows = tuple(CategoryScore(category, 10, score, round(10 * (1 - score))) for category, score in scores.items())
    keep_predictions(store, finetune.id, SplitPredictions(
        finetune.id, "vqa", "easy_vqa", split, "vqa_score", scores["all"], 30, "question type", rows, (), 0.0), {})


def test_the_per_category_table_pools_seeds_per_variant(study, tmp_path: Path) -> None:
    """Each variant's per-category scores come from the predictions its finetunes kept on their eval split;
    a finetune without them is named in the notes, and `ren report` prints the table (and --json gives it)."""
    store, file, runs = study
    values = {("none", 0): (0.9, 0.6, 0.8), ("none", 1): (0.7, 0.4, 0.6), ("vision", 0): (0.5, 0.5, 0.5)}
    for (variant, seed), (colour, shape, total) in values.items():
        _keep_breakdown(store, runs[variant, seed][1], {"colour": colour, "shape": shape, "all": total})
    _keep_breakdown(store, runs["vision", 1][1], {"colour": 0.0, "all": 0.0}, split="test")  # not its eval split

    table = report_rows(store, STUDY)
    assert [(r.task, r.kind, r.category) for r in table.breakdown] == [
        ("easy-vqa", "question type", "colour"), ("easy-vqa", "question type", "shape"),
        ("easy-vqa", "question type", "all")]
    colour = table.breakdown[0]
    assert colour.scores["none"].values == (0.9, 0.7) and colour.scores["vision"].values == (0.5,)
    assert "both" not in colour.scores
    assert table.breakdown_headers() == ["task", "category", "none", "vision", "both"]
    assert table.breakdown_cells()[0] == ["easy-vqa", "colour (question type)", "0.8000 ± 0.1414 (n=2)",
                                          "0.5000 (n=1)", DASH]
    assert table.breakdown_cells()[2][:2] == ["easy-vqa", "all"]
    assert any(note.startswith("2 finished easy-vqa finetune(s) have no per-category scores on their eval split")
               for note in table.notes)  # both's seed 0 (its seed 1 is still running), vision's seed 1 (test only)

    out = tmp_path / "r"
    result = ren("report", str(file), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Per category" in result.stdout and "0.8000 ± 0.1414 (n=2)" in result.stdout
    md = (out / "report.md").read_text()
    assert "## Per category" in md and "| easy-vqa | shape (question type) | 0.5000 ± 0.1414 (n=2) |" in md

    from tests.helpers.cli import ren_json

    doc = ren_json("report", str(file), "--out", str(out), "--json")
    first = doc["breakdown"][0]
    assert (first["task"], first["kind"], first["category"]) == ("easy-vqa", "question type", "colour")
    assert first["scores"]["none"]["values"] == [0.9, 0.7] and set(first["scores"]) == {"none", "vision"}
