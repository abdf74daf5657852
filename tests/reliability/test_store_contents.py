"""What the store holds and how it is shown (issue 15): a damaged index or record is named, never a
traceback, and the other runs stay listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.store import Store
from tests.reliability.test_bad_inputs import cli_streams


def _damage(store: Store, run_id: str, **changes: object) -> None:
    """Rewrite one record of index.json by hand: ``None`` deletes the field."""
    doc = json.loads(store.index_path.read_text())
    for entry in doc["runs"].values():
        if entry["id"] == run_id:
            for key, value in changes.items():
                if value is None:
                    del entry[key]
                else:
                    entry[key] = value
    store.index_path.write_text(json.dumps(doc))


def test_runs_lists_the_others_and_shows_a_broken_record_as_unreadable(
        ren_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(ren_home)
    good = store.create_run(name="good", stage="finetune", kind="one_tower", config={})
    broken = store.create_run(name="broken", stage="finetune", kind="one_tower", config={})
    _damage(store, broken.id, status=None, tags="not a list")
    code, out, err = cli_streams(["runs"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert good.id in out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert any(line.startswith(broken.id) and "unreadable" in line for line in lines), out
    text = " ".join(out.split())
    assert f"{broken.id}: field 'status' is missing; field 'tags' is 'not a list', not a list" in text, out
    assert str(store.index_path) in text

    code, out, err = cli_streams(["show", broken.id], monkeypatch, capsys)
    message = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err
    assert f"Run {broken.id} in {store.index_path} is unreadable: field 'status' is missing" in message
    code, out, err = cli_streams(["show", good.id], monkeypatch, capsys)
    assert code == 0 and good.id in out, err


@pytest.mark.parametrize("command", [["runs"], ["show", "x"], ["queue", "ls"]])
def test_an_index_holding_an_array_exits_2_naming_the_file(
        command: list[str], ren_home: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    Store(ren_home).create_run(name="r", stage="finetune", kind="one_tower", config={})
    (ren_home / "index.json").write_text("[]")
    code, out, err = cli_streams(command, monkeypatch, capsys)
    message = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err
    assert f"Cannot read {ren_home / 'index.json'}: it holds a JSON array" in message
