"""Tests of the results store: records, metrics, crash detection, atomicity, errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from engine.errors import RunNotFound, StoreError
from engine.store import RunRecord, Store, default_root

REPO = Path(__file__).resolve().parents[1]

HOST = socket.gethostname()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _create(store: Store, name: str = "vit small", **kwargs: object) -> RunRecord:
    return store.create_run(name=name, stage="pretrain", kind="dual", config={"lr": 1e-4}, **kwargs)


def _segments(store: Store, run_id: str) -> list[str]:
    return sorted(p.name for p in (store.run_dir(run_id) / "metrics").glob("[0-9]*.json"))


def _spawn(code: str, *args: str, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=_env(), **kwargs)


# -- run records -------------------------------------------------------------------


def test_create_and_get(store: Store) -> None:
    rec = _create(store, "My ViT/Base!", tags=["a", "b"], notes="hi", max_steps=100)
    assert rec.status == "created"
    assert rec.tags == ("a", "b")
    date, clock, *slug, suffix = rec.id.split("-")
    assert len(date) == 8 and len(clock) == 6 and "-".join(slug) == "my-vit-base"
    assert len(suffix) == 4 and int(suffix, 16) >= 0
    assert store.run_dir(rec.id).is_dir()
    assert store.get_run(rec.id) == rec
    assert store.get_run(rec.id[:-2]) == rec  # unique prefix
    # Another Store on the same root (another process) sees the same record.
    assert Store(store.root).get_run(rec.id) == rec


def test_not_found_and_ambiguous_prefix(store: Store) -> None:
    a, b = _create(store, "same"), _create(store, "same")
    with pytest.raises(RunNotFound, match="nope.*ren runs"):
        store.get_run("nope")
    prefix = os.path.commonprefix([a.id, b.id])
    with pytest.raises(RunNotFound, match="matches 2 runs") as info:
        store.get_run(prefix)
    assert a.id in str(info.value) and b.id in str(info.value)
    with pytest.raises(RunNotFound):
        store.get_run("")


def test_update_and_unknown_field(store: Store) -> None:
    rec = _create(store)
    updated = store.update_run(rec.id, notes="better", step=7, best_scores={"acc": 0.5}, tags=["x"])
    assert (updated.notes, updated.step, updated.best_scores, updated.tags) == ("better", 7, {"acc": 0.5}, ("x",))
    assert store.get_run(rec.id) == updated
    with pytest.raises(ValueError, match="bogus"):
        store.update_run(rec.id, bogus=1)
    with pytest.raises(ValueError):
        store.update_run(rec.id, status="exploded")
    with pytest.raises(ValueError):
        store.update_run(rec.id, id="other")
    assert store.get_run(rec.id) == updated


def test_list_runs_newest_first(store: Store) -> None:
    ids = []
    for name in ("first", "second", "third"):
        ids.append(_create(store, name).id)
        time.sleep(0.01)
    assert [r.id for r in store.list_runs()] == ids[::-1]


def test_mark_running_ended_and_delete(store: Store) -> None:
    rec = _create(store)
    running = store.mark_running(rec.id, pid=os.getpid(), host=HOST, device="cpu")
    assert running.status == "running" and running.pid_started == psutil.Process().create_time()
    assert running.duration_s is not None and running.duration_s >= 0
    with pytest.raises(StoreError, match="still running"):
        store.delete_run(rec.id)
    with pytest.raises(ValueError):
        store.mark_ended(rec.id, "running")
    ended = store.mark_ended(rec.id, "failed", error="boom")
    assert (ended.status, ended.error) == ("failed", "boom")
    assert ended.duration_s == ended.ended_at - ended.started_at
    run_dir = store.run_dir(rec.id)
    store.delete_run(rec.id[:12])  # the only run, so a prefix is unique
    assert not run_dir.exists() and store.list_runs() == []
    with pytest.raises(RunNotFound):
        store.get_run(rec.id)


def test_train_time_counts_every_session_of_a_resumed_run(store: Store) -> None:
    """``train_s`` is the trainer's cumulative loop time; ``duration_s`` only the last session's span,
    since every resume restarts ``started_at``. A record without the trainer's figure falls back."""
    rec = _create(store)
    store.mark_running(rec.id, pid=os.getpid(), host=HOST, device="cpu")
    ended = store.mark_ended(rec.id, "cancelled")
    assert ended.train_s == ended.duration_s  # nothing recorded yet
    store.mark_running(rec.id, pid=os.getpid(), host=HOST, device="cpu")  # the resumed session
    store.update_run(rec.id, compute={"train_seconds": 95.5})
    resumed = store.mark_ended(rec.id, "finished")
    assert resumed.train_s == 95.5 and resumed.duration_s < 5


def test_default_root_and_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REN_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "ren"
    monkeypatch.setenv("REN_HOME", str(tmp_path / "home"))
    assert Store(read_only=True).root == tmp_path / "home"

    ro = Store(tmp_path / "missing", read_only=True)
    assert ro.list_runs() == []
    with pytest.raises(RunNotFound):
        ro.get_run("x")
    with pytest.raises(StoreError, match="read-only"):
        _create(ro)
    assert not (tmp_path / "missing").exists()

    rec = _create(Store(tmp_path / "rw"))
    ro = Store(tmp_path / "rw", read_only=True)
    assert ro.get_run(rec.id) == rec
    with pytest.raises(StoreError, match="read-only"):
        ro.metrics_writer(rec.id)
    with pytest.raises(StoreError, match="read-only"):
        ro.update_run(rec.id, notes="x")


def test_concurrent_creates_from_processes(store: Store) -> None:
    code = """
        import sys
        from engine.store import Store
        s = Store(sys.argv[1])
        for i in range(15):
            r = s.create_run(name=sys.argv[2], stage="finetune", kind="k", config={})
            s.update_run(r.id, step=i)
    """
    procs = [_spawn(code, str(store.root), f"p{n}") for n in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    runs = store.list_runs()
    assert len(runs) == 30 and len({r.id for r in runs}) == 30
    assert sorted(r.step for r in runs) == sorted(list(range(15)) * 2)


# -- crash detection -----------------------------------------------------------------


def test_crash_detection(store: Store) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = _create(store)
    store.mark_running(rec.id, pid=dead.pid, host=HOST, device="cpu")
    assert store.get_run(rec.id).status == "crashed"
    assert store.list_runs()[0].status == "crashed"
    raw = json.loads(store.index_path.read_text())
    assert [d["status"] for d in raw["runs"].values()] == ["running"]  # reading wrote nothing

    store.update_run(rec.id, host="elsewhere")  # cannot check another host's pids
    assert store.get_run(rec.id).status == "running"

    store.mark_running(rec.id, pid=os.getpid(), host=HOST, device="cpu")
    assert store.get_run(rec.id).status == "running"
    store.update_run(rec.id, pid_started=psutil.Process().create_time() - 100)  # pid reuse
    assert store.get_run(rec.id).status == "crashed"


# -- metrics -------------------------------------------------------------------------


def test_writer_buffers_until_flush(store: Store) -> None:
    rec = _create(store)
    with store.metrics_writer(rec.id, flush_every_s=60) as writer:
        for step in range(5):
            writer.log(step, loss=1.0 / (step + 1))
        assert _segments(store, rec.id) == [] and store.read_metrics(rec.id) == []
        writer.flush()
        points = store.read_metrics(rec.id)
        assert [p["step"] for p in points] == list(range(5))
        assert points[1]["loss"] == 0.5 and abs(points[0]["time"] - time.time()) < 60
        writer.log(5, loss=0.1)
    assert len(store.read_metrics(rec.id)) == 6  # context exit flushed


def test_writer_flushes_after_interval(store: Store) -> None:
    rec = _create(store)
    with store.metrics_writer(rec.id, flush_every_s=0.2) as writer:
        writer.log(0, loss=1.0)
        assert store.read_metrics(rec.id) == []
        time.sleep(0.25)
        writer.log(1, loss=0.5)
        assert [p["step"] for p in store.read_metrics(rec.id)] == [0, 1]
        with pytest.raises(ValueError, match="time"):
            writer.log(2, time=1.0)


def test_segment_rollover_and_series(store: Store) -> None:
    rec = _create(store)
    with store.metrics_writer(rec.id, segment_points=10, flush_every_s=60) as writer:
        for step in range(35):
            writer.log(step, loss=float(step), **({"acc": step / 100} if step % 10 == 0 else {}))
    assert _segments(store, rec.id) == ["000000.json", "000001.json", "000002.json", "000003.json"]
    assert [p["step"] for p in store.read_metrics(rec.id)] == list(range(35))
    assert store.series(rec.id, "acc") == [(0, 0.0), (10, 0.1), (20, 0.2), (30, 0.3)]
    assert store.series(rec.id, "loss")[-1] == (34, 34.0)


def test_reopened_writer_appends(store: Store) -> None:
    rec = _create(store)
    for start in (0, 7, 14):  # resumed run: each writer continues after the last
        with store.metrics_writer(rec.id, segment_points=10) as writer:
            for step in range(start, start + 7):
                writer.log(step, loss=1.0)
    assert [p["step"] for p in store.read_metrics(rec.id)] == list(range(21))
    assert _segments(store, rec.id) == ["000000.json", "000001.json", "000002.json"]


def test_second_writer_refused(store: Store) -> None:
    rec = _create(store)
    first = store.metrics_writer(rec.id)
    with pytest.raises(StoreError, match="already has a metrics writer"):
        store.metrics_writer(rec.id)
    first.close()
    with pytest.raises(ValueError, match="closed"):
        first.log(0, loss=1.0)
    store.metrics_writer(rec.id).close()


def test_concurrent_reads_and_sigkill(store: Store, tmp_path: Path) -> None:
    rec = _create(store)
    progress = tmp_path / "progress.txt"
    code = """
        import sys
        from engine.store import Store
        writer = Store(sys.argv[1]).metrics_writer(sys.argv[2], flush_every_s=60, segment_points=50)
        with open(sys.argv[3], "w") as progress:
            step = 0
            while True:
                for _ in range(3):
                    writer.log(step, loss=1.0 / (step + 1))
                    step += 1
                writer.flush()
                progress.write(f"{step}\\n")
                progress.flush()
    """
    proc = _spawn(code, str(store.root), rec.id, str(progress))
    try:
        deadline = time.monotonic() + 30
        while not (progress.exists() and progress.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(StoreError, match="already has a metrics writer"):
            store.metrics_writer(rec.id)  # held by the other process
        seen, reads, end = 0, 0, time.monotonic() + 2.0
        while time.monotonic() < end:
            steps = [p["step"] for p in store.read_metrics(rec.id)]
            assert steps == list(range(len(steps))) and len(steps) >= seen
            seen, reads = len(steps), reads + 1
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reads > 10 and seen > 50  # the reader saw several segments land
    lines = progress.read_text().split("\n")[:-1]  # drop a partly written last line
    flushed = int(lines[-1])
    for segment in (store.run_dir(rec.id) / "metrics").glob("[0-9]*.json"):
        json.loads(segment.read_text())
    steps = [p["step"] for p in store.read_metrics(rec.id)]
    assert steps == list(range(len(steps))) and len(steps) >= max(flushed, seen)

    with store.metrics_writer(rec.id, segment_points=50) as writer:  # lock died with it
        assert list((store.run_dir(rec.id) / "metrics").glob(".*.tmp")) == []
        writer.log(len(steps), loss=0.0)
    assert [p["step"] for p in store.read_metrics(rec.id)] == list(range(len(steps) + 1))


# -- write errors ------------------------------------------------------------------


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_index_write_error_keeps_old_file(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _create(store, notes="old")
    before = store.index_path.read_bytes()
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(StoreError, match=r"index\.json.*No space left on device"):
        store.update_run(rec.id, notes="new")
    monkeypatch.undo()
    assert store.index_path.read_bytes() == before
    assert store.get_run(rec.id).notes == "old"
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []


def test_metrics_write_error_keeps_points_buffered(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _create(store)
    with store.metrics_writer(rec.id, flush_every_s=60) as writer:
        writer.log(0, loss=1.0)
        writer.flush()
        writer.log(1, loss=0.5)
        monkeypatch.setattr(os, "replace", _no_space)
        with pytest.raises(StoreError, match=r"000000\.json.*No space left"):
            writer.flush()
        monkeypatch.undo()
        assert [p["step"] for p in store.read_metrics(rec.id)] == [0]
    assert [p["step"] for p in store.read_metrics(rec.id)] == [0, 1]


# -- import cost -------------------------------------------------------------------


def test_import_does_not_load_heavy_modules() -> None:
    code = (
        "import sys, engine.store; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'timm', 'textual'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_rewind_drops_points_after_a_step_across_segments(store: Store) -> None:
    record = store.create_run(name="r", stage="finetune", kind="one_tower", config={})
    with store.metrics_writer(record.id, segment_points=4) as writer:
        for step in range(1, 12):
            writer.log(step, loss=float(step))
    with store.metrics_writer(record.id, segment_points=4) as writer:
        writer.rewind(5)
        assert [p["step"] for p in store.read_metrics(record.id)] == [1, 2, 3, 4, 5]
        writer.log(6, loss=-6.0)
    steps = [(p["step"], p["loss"]) for p in store.read_metrics(record.id)]
    assert steps == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, -6.0)]


def test_list_runs_sees_every_write_and_checks_liveness_each_time(store: Store) -> None:
    reader = Store(store.root)
    record = store.create_run(name="a", stage="pretrain", kind="one_tower", config={})
    assert [r.step for r in reader.list_runs()] == [0]
    store.update_run(record.id, step=5)  # another Store object, as another process
    assert [r.step for r in reader.list_runs()] == [5]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    store.mark_running(record.id, pid=child.pid, host=socket.gethostname(), device="cpu")
    assert reader.list_runs()[0].status == "running"
    child.kill()
    child.wait()
    assert reader.list_runs()[0].status == "crashed"  # the index did not change; the process did
