"""Write errors: a full disk and a read-only store make `ren run` fail with a clear
message (exit code 2, no traceback) and leave the store readable.

A full disk is produced two ways: the kernel's file-size limit (RLIMIT_FSIZE set in
the child, so a write past the limit fails with EFBIG, "File too large"), and, for
the metrics, ``os.replace`` patched in the child to fail with ENOSPC once a segment
holds a late step. A read-only store is made with ``chmod`` or, as root (whom file
modes do not stop), with a read-only bind mount in a private mount namespace.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.store import Store
from engine.train import CHECKPOINTS, FINAL_WEIGHTS, latest_checkpoint
from tests.helpers.cli import REN
from tests.helpers.paths import REPO
from tests.helpers.training import tiny_preset

# Fails the replace of a metrics segment with ENOSPC once the segment holds a step after 6.
FULL_AFTER_STEP_6 = """
import errno, json, os
_replace = os.replace
def _replace_or_full(src, dst, *args, **kwargs):
    if os.sep + "metrics" + os.sep in os.fspath(dst):
        with open(src, encoding="utf-8") as fh:
            if max(p["step"] for p in json.load(fh)["points"]) > 6:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
    return _replace(src, dst, *args, **kwargs)
os.replace = _replace_or_full
"""


def _ren(*args: str, prelude: str = "", preexec: Callable[[], None] | None = None,
         wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", prelude + "from engine.cli import main; main()", *args]
    return subprocess.run([*(wrap or []), *command], capture_output=True, text=True, timeout=600, cwd=REPO,
                          preexec_fn=preexec)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child: a write past ``limit`` bytes fails with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _message(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return " ".join(result.stderr.split())


def _other_run(store: Store) -> str:
    """A finished run with metrics, made before the fault: it must read the same afterwards."""
    record = store.create_run(name="bystander", stage="finetune", kind="one_tower", config={"run": {"name": "b"}})
    with store.metrics_writer(record.id) as writer:
        for step in range(1, 51):
            writer.log(step, loss=1.0 / step)
    store.mark_ended(record.id, "finished")
    return record.id


def _assert_readable(store: Store, other: str) -> None:
    """The index parses, the bystander run and its metrics read, no temp file is left, and
    `ren runs` (a separate process) lists the runs."""
    assert store.get_run(other).status == "finished"
    assert [s for s, _ in store.series(other, "loss")] == list(range(1, 51))
    for record in store.list_runs():
        store.read_metrics(record.id)
    assert not [p for p in store.root.rglob("*.tmp")], list(store.root.rglob("*.tmp"))
    listing = subprocess.run([*REN, "runs"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert listing.returncode == 0, listing.stderr
    assert other in listing.stdout


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_fails_clearly_and_the_run_resumes_later(
        tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    other = _other_run(store)
    preset = tiny_preset(tmp_path / "full.toml", data_cache, max_steps=8, checkpoint_every=4)
    result = _ren("run", str(preset), preexec=_file_size_limit(64 * 1024))
    message = _message(result)
    run = next(r for r in store.list_runs() if r.id != other)
    assert f"Cannot save the checkpoint of step 4 in {store.run_dir(run.id) / CHECKPOINTS}" in message
    assert "File too large" in message and "there is no earlier one" in message
    assert f"ren run --resume {run.id}" in message
    assert run.status == "failed" and "Cannot save the checkpoint of step 4" in run.error
    assert [s for s, _ in store.series(run.id, "loss")] == [1, 2, 3, 4]  # flushed before the save was tried
    assert latest_checkpoint(store.run_dir(run.id)) is None
    _assert_readable(store, other)

    resumed = _ren("run", "--resume", run.id)  # with the space back, the advice in the message works
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store.get_run(run.id).status == "finished"
    assert [s for s, _ in store.series(run.id, "loss")] == list(range(1, 9))
    assert (store.run_dir(run.id) / FINAL_WEIGHTS).exists()


@pytest.mark.slow
def test_disk_full_for_the_metrics_fails_clearly_and_keeps_the_checkpoint(
        tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    other = _other_run(store)
    preset = tiny_preset(tmp_path / "enospc.toml", data_cache, max_steps=12, checkpoint_every=4)
    message = _message(_ren("run", str(preset), prelude=FULL_AFTER_STEP_6))
    run = next(r for r in store.list_runs() if r.id != other)
    segment = store.run_dir(run.id) / "metrics" / "000000.json"
    assert f"Cannot write {segment}: No space left on device; its previous contents are unchanged." in message
    assert run.status == "failed" and "No space left on device" in run.error
    steps = [s for s, _ in store.series(run.id, "loss")]
    assert steps == list(range(1, len(steps) + 1)) and 4 <= len(steps) <= 6
    assert latest_checkpoint(store.run_dir(run.id)).name == "step_00000004"
    _assert_readable(store, other)


def test_disk_full_when_recording_a_new_run(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    other = _other_run(store)
    index = ren_home / "index.json"
    before = index.read_bytes()
    preset = tiny_preset(tmp_path / "index.toml", data_cache)
    message = _message(_ren("run", str(preset), preexec=_file_size_limit(len(before) + 64)))
    assert f"Cannot write {index}: File too large; its previous contents are unchanged." in message
    assert index.read_bytes() == before
    assert sorted(p.name for p in (ren_home / "runs").iterdir()) == [other]  # no orphan run directory
    _assert_readable(store, other)


def _read_only_wrapper(root: Path) -> list[str] | None:
    """As root: a command prefix that runs the child with ``root`` bind-mounted read-only
    in a private mount namespace; None where the machine does not allow it."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root)]
    try:
        probe = subprocess.run([*wrap, "sh", "-c", 'touch "$0/.probe"', str(root)], capture_output=True, timeout=30)
    except FileNotFoundError:
        return None
    ok = probe.returncode != 0 and b"Read-only file system" in probe.stderr
    return wrap if ok else None


def test_read_only_store_refuses_a_run_clearly_and_still_reads(tmp_path: Path, ren_home: Path,
                                                              data_cache: Path) -> None:
    store = Store(ren_home)
    other = _other_run(store)
    preset = tiny_preset(tmp_path / "ro.toml", data_cache)
    wrap: list[str] | None = None
    modes: dict[Path, int] = {}
    if os.geteuid() == 0:  # file modes do not stop root
        wrap = _read_only_wrapper(ren_home)
        if wrap is None:
            pytest.skip("running as root, and this machine allows no read-only bind mount (unshare/mount)")
        reason = "Read-only file system"
    else:
        for path in [ren_home, *ren_home.rglob("*")]:
            modes[path] = path.stat().st_mode
            path.chmod(modes[path] & ~0o222)
        reason = "Permission denied"
    try:
        message = _message(_ren("run", str(preset), wrap=wrap))
        assert f"Cannot lock {ren_home / 'index.lock'}: {reason}." in message
        listing = _ren("runs", wrap=wrap)  # the read-only store still lists and shows its runs
        assert listing.returncode == 0 and other in listing.stdout, listing.stderr
        shown = _ren("show", other, wrap=wrap)
        assert shown.returncode == 0 and "bystander" in shown.stdout, shown.stderr
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert [r.id for r in store.list_runs()] == [other]
    _assert_readable(store, other)
