"""What the store holds and how it is shown (issue 15): a damaged index or record is named, never a
traceback, and the other runs stay listed."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from engine.store import Store
from tests.helpers.cli import REN, cli_streams
from tests.helpers.paths import REPO
from tests.helpers.training import tiny_preset


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


# --- permissions follow the umask ----------------------------------------------------------------------------


def _modes(root: Path, umask: int) -> list[str]:
    """Every path under ``root`` whose mode is not what a plain open (files) or mkdir (directories) gives."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        if path.stat().st_mode & 0o777 != expected:
            wrong.append(f"{path.relative_to(root)} {path.stat().st_mode & 0o777:o} (expected {expected:o})")
    return wrong


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_every_file_a_tiny_run_writes_follows_the_umask(umask: int, tmp_path: Path, ren_home: Path) -> None:
    """The weights, checkpoints and the decoded data cache too: writers that go through a temporary file
    (tempfile, safetensors) create 0600, which hid them from the other users of a shared store."""
    preset = tiny_preset(tmp_path / "p.toml", ren_home / "cache", max_steps=4, checkpoint_every=2)
    result = subprocess.run([*REN, "run", str(preset)], capture_output=True, text=True, timeout=600, cwd=REPO,
                            preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((ren_home / "runs").iterdir())
    assert (run_dir / "model.safetensors").exists() and list((run_dir / "checkpoints").glob("step_*/*.safetensors"))
    assert list((ren_home / "cache").glob("*.npz"))
    assert _modes(ren_home, umask) == []


# --- null metrics read correctly ------------------------------------------------------------------------------


async def test_the_monitor_charts_a_run_whose_metrics_hold_nulls(ren_home: Path) -> None:
    """The points a diverged run logged (null with a flag in the file) are left out of the curve; the chart
    neither breaks nor scales to them."""
    from ren_tui.app import RenApp
    from ren_tui.backend import Backend
    from ren_tui.screens.monitor import MonitorScreen
    from tests.tui_fake import canned_run

    store = Store(ren_home)
    run = canned_run(store, "diverged", steps=40, status="failed", eval_every=0)
    with store.metrics_writer(run.id) as writer:
        writer.log(41, loss=float("nan"))
        writer.log(42, loss=float("inf"))
    text = (store.run_dir(run.id) / "metrics" / "000000.json").read_text()
    assert '"loss":null' in text and "NaN" not in text and "Infinity" not in text
    app = RenApp(Backend(store, start_worker=False))
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_monitor(run.id)
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, MonitorScreen)
        xs, ys = app.screen.chart.series["loss"]
        assert xs[-2:] == [41, 42] and math.isnan(ys[-2]) and ys[-1] == math.inf
        plotted_xs, plotted_ys = app.screen.chart.plotted["loss"]
        assert plotted_xs[-1] == 40 and all(math.isfinite(y) for y in plotted_ys)


def test_show_prints_a_null_metric_as_nan(ren_home: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(ren_home)
    run = store.create_run(name="r", stage="finetune", kind="one_tower", config={})
    with store.metrics_writer(run.id) as writer:
        writer.log(1, loss=1.0, lr=0.1)
        writer.log(2, loss=float("nan"), lr=0.1)
    code, out, err = cli_streams(["show", run.id], monkeypatch, capsys)
    assert code == 0, err
    assert "last logged: step 2  loss nan  lr 0.1" in out


# --- versions -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_records_the_versions_it_ran_with_and_a_resumed_one_notes_a_change(
        ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each session's versions are kept when they differ from the last ones (a resume with the same
    software adds nothing); `ren show` prints the latest and what the earlier steps ran with."""
    import platform
    from importlib.metadata import version

    from engine.train import train
    from tests.helpers.training import start, tiny_finetune

    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache, max_steps=4, log_every=2, eval_every=100,
                                             checkpoint_every=2))
    train(cfg, store, run_id)
    (session,) = store.get_run(run_id).versions
    expected = {"python": platform.python_version(), "ren": version("ren"), "torch": version("torch"),
                "transformers": version("transformers"), "timm": version("timm"),
                "accelerate": version("accelerate")}
    assert {k: session[k] for k in expected} == expected and session["from_step"] == 0
    code, out, err = cli_streams(["show", run_id], monkeypatch, capsys)
    shown = " ".join(out.split())
    assert code == 0 and f"versions: python {expected['python']}, ren {expected['ren']}" in shown, out
    assert f"torch {expected['torch']}, transformers {expected['transformers']}" in shown

    store.update_run(run_id, versions=({**session, "torch": "2.0.0", "timm": "0.9.0"},))  # an older session
    train(cfg, store, run_id, resume=True)
    train(cfg, store, run_id, resume=True)  # the same versions again: nothing new to keep
    earlier, latest = store.get_run(run_id).versions
    assert earlier["torch"] == "2.0.0" and latest == {**session, "from_step": 4}
    code, out, err = cli_streams(["show", run_id], monkeypatch, capsys)
    shown = " ".join(out.split())
    assert f"torch {expected['torch']}" in shown and "(from step 4)" in shown
    assert "before step 4 it ran with torch 2.0.0, timm 0.9.0" in shown, out
