"""Preset files that `ren validate` and `ren run` read (issue 15): symlink loops, a byte-order mark, an empty or
odd ``extends``, files that are not regular files (a FIFO must not hang the reader), deep nesting. Each case
drives the real entry point in-process (as tests/reliability/test_bad_inputs.py does) and asserts exit 2, no
traceback, and a message naming the file (and the key ``extends`` where it is at fault).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.test_bad_inputs import ONE_TOWER, _write, cli
from tests.test_cli import ren


def _assert_refused(code: int, err: str, key: str, fragments: tuple[str, ...]) -> str:
    message = " ".join(err.split())
    assert "Traceback" not in err, err
    assert code == 2, err
    for fragment in (key, *fragments):
        assert " ".join(fragment.split()) in message, message
    return message


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
