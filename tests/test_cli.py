"""The `ren` command line: exit codes, messages, and import hygiene."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.store import Store
from tests.helpers.cli import HEAVY, modules_after, ren
from tests.helpers.paths import PRESETS, REPO

BAD = REPO / "tests" / "fixtures" / "bad"


def test_help_imports_no_torch() -> None:
    mods = modules_after(
        "import sys; sys.argv = ['ren', '--help']\n"
        "from engine.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert "typer" in mods
    assert not [m for m in HEAVY if m in mods]


def test_tui_import_imports_no_torch() -> None:
    """Every module of ren_tui, every screen included, keeps torch and friends out."""
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "ren_tui").rglob("*.py")
    )
    assert {"ren_tui.screens.monitor", "ren_tui.screens.compose", "ren_tui.inspector"} <= set(modules)
    mods = modules_after("import " + ", ".join(modules))
    assert "textual" in mods
    assert not [m for m in HEAVY if m in mods]


def test_tui_start_up_leaves_the_help_screens_markdown_parser_and_the_picture_library_unloaded() -> None:
    """markdown-it (about a quarter of ren-tui's own import time) loads when help first opens; textual-image
    (a tenth of a second more, numpy's import) when the examples view first shows a picture, not when its
    module or the Runs screen's is imported."""
    mods = modules_after("import ren_tui.app")
    assert "ren_tui.screens.runs" in mods or "ren_tui.backend" in mods
    assert not [m for m in mods if m.startswith(("markdown_it", "textual_image"))]
    mods = modules_after("import ren_tui.app, ren_tui.screens.runs, ren_tui.screens.monitor, ren_tui.screens.examples")
    assert "ren_tui.widgets.picture" in mods and not [m for m in mods if m.startswith("textual_image")]


def test_engine_never_imports_textual() -> None:
    mods = modules_after("import engine.train, engine.cli.commands, engine.store")
    assert "torch" in mods
    assert "textual" not in mods


def test_validate_prints_config_and_parameters() -> None:
    result = ren("validate", str(PRESETS / "quickstart.toml"))
    assert result.returncode == 0, result.stderr
    assert "valid (finetune, two_tower)" in result.stdout
    assert "text.layers[*]" in result.stdout and "vision.layers[*]" in result.stdout
    assert "trainable" in result.stdout


def test_validate_json_counts_frozen_parameters() -> None:
    plain = json.loads(ren("validate", str(PRESETS / "quickstart.toml"), "--json").stdout)
    frozen = json.loads(ren("validate", str(PRESETS / "quickstart.toml"), "--json",
                            "--set", "freeze.groups=['text.layers[0:2]']").stdout)
    assert plain["params"]["frozen"] == 0
    layer = plain["params"]["groups"]["text.layers[0]"]["total"]
    assert frozen["params"]["frozen"] == 2 * layer
    assert frozen["params"]["total"] == plain["params"]["total"]
    assert frozen["config"]["freeze"]["groups"] == ["text.layers[0:2]"]


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("unknown_key.toml", "unknown key 'model.backbone.hiden_size' — did you mean 'model.backbone.hidden_size'?"),
        ("syntax.toml", "is not valid TOML"),
        ("wrong_type.toml", "train.batch_size = 'sixty-four' has the wrong type"),
        ("out_of_range.toml", "optim.lr = 50.0 is out of range"),
        ("kind_mismatch.toml", "does not apply to kind 'one_tower'"),
        ("no_stage.toml", "either pretrains ([objectives]) or finetunes ([task])"),
        ("bad_freeze.toml", "pattern 'vison.layers[0:2]' matches no layer group"),
        ("missing_parent.toml", "does_not_exist.toml"),
        ("no_such_file.toml", "Preset file not found"),
    ],
)
def test_bad_presets_exit_2_with_a_clear_message(fixture: str, expected: str) -> None:
    result = ren("validate", str(BAD / fixture))
    assert result.returncode == 2, (result.stdout, result.stderr)
    message = " ".join(result.stderr.split())
    assert " ".join(expected.split()) in message
    assert "Traceback" not in result.stderr


def test_syntax_error_reports_line_and_column() -> None:
    result = ren("validate", str(BAD / "syntax.toml"))
    assert "line 4" in result.stderr and "column" in result.stderr


def test_run_with_bad_override_exits_2_before_training(ren_home: Path) -> None:
    result = ren("run", str(PRESETS / "quickstart.toml"), "--set", "train.max_stepz=3")
    assert result.returncode == 2
    assert "did you mean 'train.max_steps'" in result.stderr
    assert not (ren_home / "index.json").exists() or "quickstart" not in (ren_home / "index.json").read_text()


def test_unknown_run_exits_2() -> None:
    result = ren("show", "nope")
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr


def test_runs_on_empty_store() -> None:
    result = ren("runs")
    assert result.returncode == 0
    assert "no runs yet" in result.stdout


def test_a_failed_distributed_run_exits_1_whatever_accelerate_returned(ren_home: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate exits 1 for a failed process; a launcher killed by a signal gave -9, which the shell read as
    247. Either way `ren run --gpus N` reports a failed run: 1."""
    from engine.cli import commands

    monkeypatch.setattr(commands.subprocess, "call", lambda cmd: -9)
    with pytest.raises(SystemExit) as exited:
        commands.run(REPO / "tests" / "fixtures" / "one_tower.toml", [], resume=None, name="ddp", gpus=2)
    assert exited.value.code == 1
    (record,) = Store(ren_home).list_runs()
    assert record.status == "failed" and "exited with code -9" in record.error


def test_unreachable_hub_model_is_a_clear_error(tmp_path: Path) -> None:
    preset = tmp_path / "hub.toml"
    preset.write_text(
        'extends = "%s"\n[model.text]\nsource = "pretrained"\nname = "prajjwal1/bert-tiny"\n'
        "hidden_size = 128\n" % (PRESETS / "quickstart.toml")
    )
    # hidden_size is not allowed with a pretrained tower: the config error comes first
    first = ren("validate", str(preset))
    assert first.returncode == 2 and "only applies when source" in first.stderr
    preset.write_text(
        '[model]\nkind = "one_tower"\n[model.backbone]\nsource = "pretrained"\n'
        'name = "prajjwal1/bert-tiny"\n[task]\nname = "vqa"\n'
    )
    result = ren("validate", str(preset), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "prajjwal1/bert-tiny" in message
    assert "the Hugging Face hub cannot be reached from this machine" in message
    assert 'model.backbone.name = "/models/bert-tiny"' in message
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_trains_the_named_pretraining_then_finetunes(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    """`ren run` end to end through the real entry point: pretraining named by
    init_from = "preset:..." runs first, then the finetuning, both stored."""
    common = f'extends = "{PRESETS / "base" / "easyvqa_two_tower.toml"}"\n[data]\ncache_dir = "{data_cache}"\n'
    (tmp_path / "pre.toml").write_text(
        common + '[run]\nname = "pre"\n[objectives.mlm]\n[objectives.itm]\n[train]\nmax_steps = 3\nbatch_size = 8\n'
    )
    (tmp_path / "ft.toml").write_text(
        common + '[run]\nname = "ft"\n[task]\nloss = "ce"\n'
        '[train]\nmax_steps = 3\nbatch_size = 8\ninit_from = "preset:pre.toml"\n'
    )
    first = ren("run", str(tmp_path / "ft.toml"), timeout=300)
    assert first.returncode == 0, first.stderr
    assert "init_from: training" in first.stdout and first.stdout.count("finished") == 2
    closing = [line for line in first.stdout.splitlines() if line.startswith("finished")][-1]
    assert re.search(r"  val/vqa_score \d\.\d{4}  test/vqa_score \d\.\d{4}$", closing), closing  # named by split
    listing = ren("runs").stdout
    assert "pre" in listing and "ft" in listing and listing.count("finished") == 2

    second = ren("run", str(tmp_path / "ft.toml"), timeout=300)
    assert second.returncode == 0, second.stderr
    assert "init_from: reusing finished run" in second.stdout
    ft_id = re.search(r"run (\S+) \(finetune, two_tower\)", first.stdout).group(1)
    shown = ren("show", ft_id)
    assert shown.returncode == 0
    assert 'init_from = "run:' in shown.stdout and "vqa_score" in shown.stdout


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path, ren_home: Path,
                                                                 data_cache: Path) -> None:
    """`--gpus 2` trains one run in two processes (gloo on a CPU machine): only the main
    process writes, evaluation gathers both halves, and the logged loss (averaged over
    the processes) follows the single-process run with the same global batch."""
    preset = tmp_path / "ddp.toml"
    preset.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
        f'[data]\ncache_dir = "{data_cache}"\neval_max_samples = 64\n'
        "[train]\nmax_steps = 8\nbatch_size = 8\nlog_every = 2\neval_every = 4\ncpu_threads = 1\n"
    )
    result = ren("run", str(preset), "--gpus", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--num_processes 2" in " ".join(result.stdout.split())
    single = ren("run", str(preset), timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    from engine.store import Store

    store = Store(ren_home)
    one, two = store.list_runs()  # newest first
    assert two.device.startswith("2x cpu") and not one.device.startswith("2x")
    assert two.status == "finished" and two.step == 8
    assert [s for s, _ in store.series(two.id, "eval/vqa_score")] == [4, 8]
    assert two.final_scores["eval_samples"] == 3892  # the val split, gathered from both processes, no duplicates
    loss_two, loss_one = store.series(two.id, "loss"), store.series(one.id, "loss")
    assert [s for s, _ in loss_two] == [s for s, _ in loss_one] == [2, 4, 6, 8]
    worst = max(abs(a - b) / max(abs(b), 1.0) for (_, a), (_, b) in zip(loss_two, loss_one))
    print(f"2 processes vs 1: largest relative loss difference {worst:.2e}")
    assert worst <= 1e-4, (loss_two, loss_one)


def test_a_run_out_of_cuda_memory_says_what_to_change_without_a_traceback(
        tmp_path: Path, ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # what torch raises when a batch does not fit on the GPU, raised here by the trainer's step on a CPU
    # (tests/gpu/test_gpu.py makes a real one on a GPU)
    import torch

    import engine.train
    from tests.helpers.cli import cli
    from tests.helpers.training import tiny_preset

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.train, "_finetune_step", out_of_memory)
    code, err = cli(["run", str(tiny_preset(tmp_path / "p.toml", data_cache))], monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert "error: run " in text and "failed: CUDA out of memory on cpu" in text
    assert "train.batch_size 16 (micro batch 16 per process)" in text and "train.micro_batch_size" in text
    record = Store(ren_home).list_runs()[0]
    assert record.status == "failed" and record.error.startswith("CUDA out of memory on cpu")
