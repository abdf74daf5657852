"""Config values and preset files that `ren run` would refuse, `ren validate` refuses first (issue 15).

The ``BAD`` table holds values that passed `ren validate` and then misled `ren run` (``objectives.mlm.weight = inf``
trained to NaN and "finished"). Every case drives the real entry point in-process (as
tests/reliability/test_bad_inputs.py does) and asserts exit 2, no traceback, and a message naming the key; a sample
also goes through `ren run`, which must refuse before it creates a run. The preset-file cases cover how a preset is
read: symlink loops, a byte-order mark, an empty or odd ``extends``, files that are not regular files (a FIFO must not
hang the reader), deep nesting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PRESETS
from tests.reliability.test_bad_inputs import ONE_TOWER, _write, cli
from tests.test_cli import ren

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
    return _write(tmp / "p.toml", f'extends = "{bad.base}"\n{bad.body}')


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


RUN_SAMPLE = ("mlm-weight-inf", "set-nan-string")


@pytest.mark.parametrize("name", RUN_SAMPLE)
def test_run_refuses_before_creating_a_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], ren_home: Path) -> None:
    bad = {b.id: b for b in BAD}[name]
    code, err = cli(["run", str(_preset(tmp_path, bad)), *_sets(bad)], monkeypatch, capsys)
    _assert_refused(code, err, bad.key, bad.fragments)
    assert not (ren_home / "runs").exists() or not any((ren_home / "runs").iterdir())


# --- reading preset files -------------------------------------------------------------------------------------------


def test_symlink_loop_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """Was ``RuntimeError: Symlink loop`` from pathlib (exit 1)."""
    os.symlink(tmp_path / "b.toml", tmp_path / "a.toml")
    os.symlink(tmp_path / "a.toml", tmp_path / "b.toml")
    code, err = cli(["validate", str(tmp_path / "a.toml")], monkeypatch, capsys)
    _assert_refused(code, err, str(tmp_path / "a.toml"), ("symbolic link", "loop"))
    child = _write(tmp_path / "child.toml", 'extends = "a.toml"\n')
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
    base = _write(tmp_path / "base.toml", b"\xef\xbb\xbf" + ONE_TOWER.read_bytes())
    child = _write(tmp_path / "child.toml", b'\xef\xbb\xbfextends = "base.toml"\n[train]\nmax_steps = 3\n')
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
    path = _write(tmp_path / "p.toml", f"extends = {value}\n")
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    _assert_refused(code, err, f"{path}: ", tuple(f.format(tmp=tmp_path) for f in fragments))


def test_not_a_regular_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/null read as an empty preset ("missing required key 'model'"); now it is named as not a file."""
    code, err = cli(["validate", "/dev/null"], monkeypatch, capsys)
    _assert_refused(code, err, "/dev/null", ("is not a regular file",))
    child = _write(tmp_path / "child.toml", 'extends = "/dev/null"\n')
    code, err = cli(["validate", str(child)], monkeypatch, capsys)
    _assert_refused(code, err, f"{child}: extends = '/dev/null'", ("is not a regular file",))


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opening a FIFO blocks until something writes to it: `ren validate` hung. Through a real process with a
    timeout, so a hang fails the test instead of stalling the suite."""
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    child = _write(tmp_path / "child.toml", 'extends = "pipe.toml"\n')
    for args, where in ((["validate", str(fifo)], str(fifo)), (["run", str(child)], f"{child}: extends")):
        result = ren(*args, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        assert where in message and "is not a regular file" in message, message


def test_too_deeply_nested_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """tomllib recurses per nesting level: 2000 nested arrays were a RecursionError traceback."""
    path = _write(tmp_path / "deep.toml", "x = " + "[" * 2000 + "]" * 2000 + "\n")
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    _assert_refused(code, err, str(path), ("nested too deeply",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "p.toml", ONE_TOWER.read_text())
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
        _write(target, "")
        expected = (f"{target}: invalid preset", "missing required key 'model'")
    elif case == "directory":
        target = tmp_path
        expected = (f"Preset path {tmp_path} is a directory",)
    elif case == "extends-cycle":
        _write(target, 'extends = "q.toml"\n')
        _write(tmp_path / "q.toml", 'extends = "p.toml"\n')
        expected = ("Presets extend each other in a loop", str(target))
    else:
        _write(target, b'[run]\nname = "\xff"\n')
        expected = (f"{target} is not UTF-8 text",)
    code, err = cli(["validate", str(target)], monkeypatch, capsys)
    _assert_refused(code, err, expected[0], expected[1:])
