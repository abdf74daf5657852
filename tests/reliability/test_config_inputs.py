"""Config values that `ren run` would refuse, `ren validate` refuses first (issue 15).

Each bad value below passed `ren validate` and then crashed or misled `ren run` (a traceback after the run was
created, a run that trained to NaN, an MLP of zero units, a segfault) or was already refused and is kept here as the
rule's table. Every case drives the real entry point in-process (as tests/reliability/test_bad_inputs.py does) and
asserts exit 2, no traceback, and a message naming the key. A sample also goes through `ren run`, which must refuse
before it creates a run. The preset-file cases cover how a preset is read: symlink loops, a byte-order mark, an empty
or odd ``extends``, files that are not regular files (a FIFO must not hang the reader).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.cli import cli, ren
from tests.helpers.paths import PRESETS
from tests.helpers.presets import ONE_TOWER, write_file

PRETRAIN = PRESETS / "easyvqa_pretrain.toml"  # two towers (manual text tower), MLM + ITM + ITC


@dataclass(frozen=True)
class Bad:
    """A bad value: ``body`` is TOML added to the preset ``base`` extends (``overrides`` go to --set); the message
    must name ``key`` and hold every fragment."""

    id: str
    body: str
    key: str
    fragments: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    base: Path = ONE_TOWER
    at_load: bool = True  # refused as the preset is loaded, naming its file (not when the model is built)


def _two_tower(body: str, key: str, *fragments: str, id: str) -> Bad:
    return Bad(id, body, key, fragments, base=PRETRAIN)


BAD = [
    # --- the optimizer: torch.optim.AdamW raised ValueError after the run was created ------------------------------
    Bad("betas-above-1", "[optim]\nbetas = [1.5, 0.999]\n", "optim.betas", ("[1.5, 0.999]", "[0, 1)")),
    Bad("betas-negative", "[optim]\nbetas = [0.9, -0.1]\n", "optim.betas", ("[0, 1)",)),
    Bad("betas-one", "[optim]\nbetas = [0.9, 1.0]\n", "optim.betas", ("[0, 1)",)),
    Bad("lr-zero", "[optim]\nlr = 0.0\n", "optim.lr", ("out of range",)),
    Bad("eps-zero", "[optim]\neps = 0.0\n", "optim.eps", ("out of range",)),
    Bad("weight-decay-negative", "[optim]\nweight_decay = -0.1\n", "optim.weight_decay", ("out of range",)),
    Bad("warmup-ratio-one", "[optim]\nwarmup_ratio = 1.0\n", "optim.warmup_ratio", ("out of range",)),
    Bad("warmup-ratio-negative", "[optim]\nwarmup_ratio = -0.1\n", "optim.warmup_ratio", ("out of range",)),
    Bad("grad-clip-zero", "[optim]\ngrad_clip = 0.0\n", "optim.grad_clip", ("out of range",)),
    # --- seeds: numpy refuses seeds of 2**32 and above -------------------------------------------------------------
    Bad("seed-2-32", "[run]\nseed = 4294967296\n", "run.seed", ("4294967295",)),
    Bad("seed-negative", "[run]\nseed = -1\n", "run.seed", ("out of range",)),
    # --- steps and batches ----------------------------------------------------------------------------------------
    Bad("micro-not-dividing", "[train]\nmicro_batch_size = 3\n", "train.micro_batch_size",
        ("does not divide train.batch_size = 8",)),
    Bad("micro-above-batch", "[train]\nmicro_batch_size = 16\n", "train.micro_batch_size",
        ("does not divide train.batch_size = 8",)),
    Bad("micro-zero", "[train]\nmicro_batch_size = 0\n", "train.micro_batch_size", ("out of range",)),
    Bad("max-steps-zero", "[train]\nmax_steps = 0\n", "train.max_steps", ("out of range",)),
    Bad("batch-negative", "[train]\nbatch_size = -4\n", "train.batch_size", ("out of range",)),
    Bad("eval-every-zero", "[train]\neval_every = 0\n", "train.eval_every", ("out of range",)),
    Bad("log-every-zero", "[train]\nlog_every = 0\n", "train.log_every", ("out of range",)),
    Bad("checkpoint-every-zero", "[train]\ncheckpoint_every = 0\n", "train.checkpoint_every", ("out of range",)),
    Bad("keep-checkpoints-zero", "[train]\nkeep_checkpoints = 0\n", "train.keep_checkpoints", ("out of range",)),
    # 100000 threads: the process died of a segfault (rc 139) mapping numpy's shared objects
    Bad("cpu-threads-huge", "[train]\ncpu_threads = 100000\n", "train.cpu_threads", ("out of range",)),
    Bad("eval-max-samples-zero", "[data]\neval_max_samples = 0\n", "data.eval_max_samples", ("out of range",)),
    # --- the architecture -----------------------------------------------------------------------------------------
    Bad("heads-not-dividing", "[model.backbone]\nheads = 3\n", "model.backbone", ("divisible by heads (3)",)),
    Bad("image-not-multiple-of-patch", "[model.backbone]\nimage_size = 60\n", "model.backbone",
        ("multiple of patch_size (8)",)),
    # int(64 x 0.01) = 0: every MLP of the backbone had no units, and the run "finished"
    Bad("mlp-of-no-units", "[model.backbone]\nmlp_ratio = 0.01\n", "model.backbone.mlp_ratio",
        ("hidden_size x mlp_ratio", "64 x 0.01")),
    Bad("dropout-one", "[model.backbone]\ndropout = 1.0\n", "model.backbone.dropout", ("out of range",)),
    Bad("attention-dropout-negative", "[model.backbone]\nattention_dropout = -0.5\n",
        "model.backbone.attention_dropout", ("out of range",)),
    # texts longer than the position table crash the embedding lookup mid-run (IndexError) when one comes up
    Bad("text-beyond-positions-one-tower", "[data]\nmax_text_len = 100\n", "data.max_text_len",
        ("model.backbone.max_text_positions = 64",)),
    # the checkpoint says it is a vision model, so its text embedding is fresh: caught when validate builds it
    Bad("text-beyond-positions-vision-checkpoint", '[model.backbone]\nsource = "random"\n'
        'name = "facebook/deit-tiny-patch16-224"\n[data]\nmax_text_len = 100\n', "data.max_text_len",
        ("model.backbone.max_text_positions = 64",), at_load=False),
    _two_tower("[data]\nmax_text_len = 40\n", "data.max_text_len", "model.text.max_positions = 32",
               id="text-beyond-positions-two-tower"),
    _two_tower("[model.fusion]\nmlp_ratio = 0.001\n", "model.fusion.mlp_ratio", "hidden_size x mlp_ratio",
               id="fusion-mlp-of-no-units"),
    _two_tower("[model.fusion]\ndropout = 1.5\n", "model.fusion.dropout", "out of range", id="fusion-dropout"),
    # --- objectives and the task ----------------------------------------------------------------------------------
    _two_tower("[objectives.mlm]\nmask_prob = 0.0\n", "objectives.mlm.mask_prob", "out of range", id="mask-prob-0"),
    _two_tower("[objectives.mlm]\nmask_prob = 1.0\n", "objectives.mlm.mask_prob", "out of range", id="mask-prob-1"),
    _two_tower("[objectives.itm]\nnegative_ratio = 1.0\n", "objectives.itm.negative_ratio", "out of range",
               id="negative-ratio-1"),
    _two_tower("[objectives.itc]\ntemperature = 0.0\n", "objectives.itc.temperature", "out of range",
               id="temperature-0"),
    _two_tower("[objectives.mlm]\nweight = -1.0\n", "objectives.mlm.weight", "out of range", id="weight-negative"),
    # every weight 0: the loss is 0 and nothing learns, yet the run "finished"
    _two_tower("[objectives.mlm]\nweight = 0.0\n[objectives.itm]\nweight = 0.0\n[objectives.itc]\nweight = 0.0\n",
               "objectives", "weight 0", id="all-weights-zero"),
    Bad("head-hidden-mult-zero", "[task]\nhead_hidden_mult = 0.0\n", "task.head_hidden_mult", ("out of range",)),
    # --- non-finite values: TOML's inf and nan literals, and the same through --set ----------------------------------
    _two_tower("[objectives.mlm]\nweight = inf\n", "objectives.mlm.weight", "inf is not a finite number",
               id="mlm-weight-inf"),
    _two_tower("[objectives.itc]\nweight = nan\n", "objectives.itc.weight", "nan is not a finite number",
               id="itc-weight-nan"),
    Bad("lr-nan", "[optim]\nlr = nan\n", "optim.lr", ("nan is not a finite number",)),
    Bad("grad-clip-inf", "[optim]\ngrad_clip = +inf\n", "optim.grad_clip", ("inf is not a finite number",)),
    Bad("betas-nan", "[optim]\nbetas = [nan, 0.999]\n", "optim.betas[0]", ("nan is not a finite number",)),
    Bad("dropout-nan", "[model.backbone]\ndropout = nan\n", "model.backbone.dropout", ("not a finite number",)),
    Bad("head-mult-inf", "[task]\nhead_hidden_mult = inf\n", "task.head_hidden_mult", ("not a finite number",)),
    Bad("set-inf", "", "objectives.mlm.weight", ("inf is not a finite number",), ("objectives.mlm.weight=inf",),
        base=PRETRAIN),
    Bad("set-minus-inf", "", "optim.eps", ("not a finite number",), ("optim.eps=-inf",)),
    Bad("set-nan", "", "optim.grad_clip", ("nan is not a finite number",), ("optim.grad_clip=nan",)),
    # not TOML (TOML spells them in lower case), so taken as strings, which pydantic would read as floats
    Bad("set-nan-string", "", "optim.lr", ("'NaN' is not a finite number",), ("optim.lr=NaN",)),
    Bad("set-infinity-string", "", "optim.weight_decay", ("'Infinity' is not a finite number",),
        ("optim.weight_decay=Infinity",)),
]


def _preset(tmp: Path, bad: Bad) -> Path:
    return write_file(tmp / "p.toml", f'extends = "{bad.base}"\n{bad.body}')


def _sets(bad: Bad) -> list[str]:
    return [arg for item in bad.overrides for arg in ("--set", item)]


def _assert_refused(code: int, err: str, key: str, fragments: tuple[str, ...]) -> str:
    message = " ".join(err.split())
    assert "Traceback" not in err, err
    assert code == 2, err
    for fragment in (key, *fragments):
        assert " ".join(fragment.split()) in message, message
    return message


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_validate_refuses_naming_the_key(bad: Bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(["validate", str(_preset(tmp_path, bad)), *_sets(bad)], monkeypatch, capsys)
    message = _assert_refused(code, err, bad.key, bad.fragments)
    assert not bad.at_load or str(tmp_path / "p.toml") in message, message  # and the file


RUN_SAMPLE = ("betas-above-1", "seed-2-32", "micro-not-dividing", "mlm-weight-inf", "cpu-threads-huge",
              "mlp-of-no-units", "set-nan-string")


@pytest.mark.parametrize("name", RUN_SAMPLE)
def test_run_refuses_before_creating_a_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], ren_home: Path) -> None:
    bad = {b.id: b for b in BAD}[name]
    code, err = cli(["run", str(_preset(tmp_path, bad)), *_sets(bad)], monkeypatch, capsys)
    _assert_refused(code, err, bad.key, bad.fragments)
    assert not (ren_home / "runs").exists() or not any((ren_home / "runs").iterdir())


def test_batch_per_process_is_checked_for_the_processes_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ren_home: Path) -> None:
    """train.batch_size = 8 over 3 processes cannot be split evenly: `ren validate --gpus 3` says so, and
    `ren run --gpus 3` refuses before creating a run (it started `accelerate launch` for a run that then failed)."""
    path = write_file(tmp_path / "p.toml", f'extends = "{ONE_TOWER}"\n')
    fragments = ("train.batch_size = 8", "3 processes")
    code, err = cli(["validate", str(path), "--gpus", "3"], monkeypatch, capsys)
    _assert_refused(code, err, "train.batch_size", fragments)
    code, err = cli(["run", str(path), "--gpus", "3"], monkeypatch, capsys)
    _assert_refused(code, err, "train.batch_size", fragments)
    assert not (ren_home / "runs").exists() or not any((ren_home / "runs").iterdir())
    code, err = cli(["validate", str(path), "--gpus", "3", "--set", "train.micro_batch_size=2"], monkeypatch, capsys)
    _assert_refused(code, err, "train.micro_batch_size = 2", ("x 3 processes",))
    code, err = cli(["validate", str(path), "--gpus", "4"], monkeypatch, capsys)
    assert code == 0, err


# --- reading preset files -------------------------------------------------------------------------------------------


def test_symlink_loop_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """Was ``RuntimeError: Symlink loop`` from pathlib (exit 1)."""
    os.symlink(tmp_path / "b.toml", tmp_path / "a.toml")
    os.symlink(tmp_path / "a.toml", tmp_path / "b.toml")
    code, err = cli(["validate", str(tmp_path / "a.toml")], monkeypatch, capsys)
    _assert_refused(code, err, str(tmp_path / "a.toml"), ("symbolic link", "loop"))
    child = write_file(tmp_path / "child.toml", 'extends = "a.toml"\n')
    code, err = cli(["validate", str(child)], monkeypatch, capsys)
    _assert_refused(code, err, f"{child}: extends = 'a.toml'", ("symbolic link", "loop"))


def test_byte_order_mark_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Windows editors write a UTF-8 BOM; it was "Invalid statement (at line 1, column 1)"."""
    from engine.config import load_preset

    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + ONE_TOWER.read_bytes())
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 0, err
    assert load_preset(path) == load_preset(ONE_TOWER)
    base = write_file(tmp_path / "base.toml", b"\xef\xbb\xbf" + ONE_TOWER.read_bytes())
    child = write_file(tmp_path / "child.toml", b'\xef\xbb\xbfextends = "base.toml"\n[train]\nmax_steps = 3\n')
    assert load_preset(child).train.max_steps == 3 and load_preset(child).model == load_preset(base).model


@pytest.mark.parametrize("value, fragments", [
    ('""', ("extends = ''", "names no file")),
    ('"  "', ("extends = '  '", "names no file")),
    ('"sub"', ("extends = 'sub'", "{tmp}/sub is a directory")),
    ('"\\u0000"', ("extends = '\\x00'", "is not a file name")),
    ("[]", ("'extends' must be a file name string, got []",)),
])
def test_bad_extends_names_the_key_and_the_file(value: str, fragments: tuple[str, ...], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``extends = ""`` was "Preset path . is a directory", naming neither the key nor the file."""
    (tmp_path / "sub").mkdir()
    path = write_file(tmp_path / "p.toml", f"extends = {value}\n")
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    _assert_refused(code, err, f"{path}: ", tuple(f.format(tmp=tmp_path) for f in fragments))


def test_not_a_regular_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/null read as an empty preset ("missing required key 'model'"); now it is named as not a file."""
    code, err = cli(["validate", "/dev/null"], monkeypatch, capsys)
    _assert_refused(code, err, "/dev/null", ("is not a regular file",))
    child = write_file(tmp_path / "child.toml", 'extends = "/dev/null"\n')
    code, err = cli(["validate", str(child)], monkeypatch, capsys)
    _assert_refused(code, err, f"{child}: extends = '/dev/null'", ("is not a regular file",))


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opening a FIFO blocks until something writes to it: `ren validate` hung. Through a real process with a
    timeout, so a hang fails the test instead of stalling the suite."""
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    child = write_file(tmp_path / "child.toml", 'extends = "pipe.toml"\n')
    for args, where in ((["validate", str(fifo)], str(fifo)), (["run", str(child)], f"{child}: extends")):
        result = ren(*args, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        assert where in message and "is not a regular file" in message, message


def test_too_deeply_nested_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """tomllib recurses per nesting level: 2000 nested arrays were a RecursionError traceback."""
    path = write_file(tmp_path / "deep.toml", "x = " + "[" * 2000 + "]" * 2000 + "\n")
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    _assert_refused(code, err, str(path), ("nested too deeply",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write_file(tmp_path / "p.toml", ONE_TOWER.read_text())
    path.chmod(0)
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    _assert_refused(code, err, str(path), ("Cannot read",))


@pytest.mark.parametrize("case", ["missing", "dangling-symlink", "empty", "directory", "extends-cycle", "not-utf8"])
def test_other_preset_file_edge_cases_stay_named(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The cases that already gave a named exit 2 keep doing so after the reader changed."""
    target = tmp_path / "p.toml"
    expected: tuple[str, ...]
    if case == "missing":
        expected = (f"Preset file not found: {target}",)
    elif case == "dangling-symlink":
        os.symlink(tmp_path / "gone.toml", target)
        expected = (f"Preset file not found: {target}",)
    elif case == "empty":
        write_file(target, "")
        expected = (f"{target}: invalid preset", "missing required key 'model'")
    elif case == "directory":
        target = tmp_path
        expected = (f"Preset path {tmp_path} is a directory",)
    elif case == "extends-cycle":
        write_file(target, 'extends = "q.toml"\n')
        write_file(tmp_path / "q.toml", 'extends = "p.toml"\n')
        expected = ("Presets extend each other in a loop", str(target))
    else:
        write_file(target, b'[run]\nname = "\xff"\n')
        expected = (f"{target} is not UTF-8 text",)
    code, err = cli(["validate", str(target)], monkeypatch, capsys)
    _assert_refused(code, err, expected[0], expected[1:])
