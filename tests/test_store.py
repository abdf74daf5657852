"""Tests of the results store: records, metrics, crash detection, atomicity, errors."""

from __future__ import annotations

import errno
import json
import math
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
from engine.store import RunRecord, Store, Unreadable, default_root

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


# -- standard JSON only ------------------------------------------------------------


def _strict(path: Path) -> object:
    """``path`` parsed as standard JSON: NaN and Infinity, which Python writes by default, are refused."""
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null_with_a_flag_and_read_back(store: Store) -> None:
    rec = _create(store)
    with store.metrics_writer(rec.id, segment_points=2) as writer:
        writer.log(1, loss=2.0, loss_mlm=1.0)
        writer.log(2, loss=float("nan"), loss_mlm=float("inf"), loss_itm=float("-inf"))
        writer.log(3, loss=1.5)
    on_disk = [p for name in _segments(store, rec.id)
               for p in _strict(store.run_dir(rec.id) / "metrics" / name)["points"]]
    assert on_disk[1]["loss"] is None and on_disk[1]["loss_mlm"] is None and on_disk[1]["loss_itm"] is None
    assert on_disk[1]["nonfinite"] == {"loss": "nan", "loss_mlm": "inf", "loss_itm": "-inf"}
    assert "nonfinite" not in on_disk[0] and "nonfinite" not in on_disk[2]
    points = store.read_metrics(rec.id)  # the values as logged
    assert math.isnan(points[1]["loss"]) and points[1]["loss_mlm"] == math.inf and points[1]["loss_itm"] == -math.inf
    assert "nonfinite" not in points[1]
    with store.metrics_writer(rec.id, segment_points=2) as writer:  # a resumed run rewrites the segments
        writer.rewind(2)
        writer.log(3, loss=float("nan"))
    for name in _segments(store, rec.id):
        _strict(store.run_dir(rec.id) / "metrics" / name)
    assert [math.isnan(v) for _, v in store.series(rec.id, "loss")] == [False, True, True]
    with pytest.raises(ValueError, match="nonfinite"):
        store.metrics_writer(rec.id).log(4, nonfinite=1.0)


def test_a_null_metric_without_a_flag_reads_as_nan(store: Store) -> None:
    rec = _create(store)
    (store.run_dir(rec.id) / "metrics").mkdir()
    (store.run_dir(rec.id) / "metrics" / "000000.json").write_text(
        '{"points": [{"step": 1, "time": 1.0, "loss": null}, {"step": 2, "time": 2.0, "loss": NaN}]}')
    assert [(s, math.isnan(v)) for s, v in store.series(rec.id, "loss")] == [(1, True), (2, True)]


def test_the_index_holds_standard_json_only(store: Store) -> None:
    rec = _create(store)
    with pytest.raises(StoreError, match=r"best_scores\.eval/acc is nan.*standard JSON"):
        store.update_run(rec.id, best_scores={"eval/acc": float("nan")})
    with pytest.raises(StoreError, match=r"config\.objectives\.mlm\.weight is inf"):
        store.create_run(name="x", stage="pretrain", kind="dual", config={"objectives": {"mlm": {"weight": math.inf}}})
    store.update_run(rec.id, loss_trace=(2.0, None, 1.0), best_scores={"eval/acc": 0.5})
    _strict(store.index_path)
    assert store.get_run(rec.id).loss_trace == (2.0, None, 1.0)
    assert [r.id for r in store.list_runs()] == [rec.id]  # the refused create left no record


def test_an_index_written_with_nan_by_an_older_ren_still_reads_and_heals_on_the_next_write(store: Store) -> None:
    rec = _create(store)
    other = _create(store, "other")
    text = store.index_path.read_text()
    doc = json.loads(text)
    for entry in doc["runs"].values():
        if entry["id"] == rec.id:
            entry.update(best_scores={"eval/acc": float("nan"), "eval/f1": 0.5}, loss_trace=[1.0, float("nan")],
                         compute={"pflops": float("inf")})
    store.index_path.write_text(json.dumps(doc))  # Python's default: NaN and Infinity literals
    assert "NaN" in store.index_path.read_text()
    read = store.get_run(rec.id)
    assert read.best_scores == {"eval/f1": 0.5} and read.loss_trace == (1.0, None)
    store.update_run(other.id, notes="a write of another run")
    _strict(store.index_path)
    assert store.get_run(rec.id).best_scores == {"eval/f1": 0.5}


# -- a damaged index ---------------------------------------------------------------


def _edit_index(store: Store, change) -> None:
    doc = json.loads(store.index_path.read_text())
    change(doc)
    store.index_path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("text", "says"), [
    ("[]", "it holds a JSON array, not ren's index of runs"),
    ('{"runs": []}', "its table 'runs' is a JSON array"),
    ('{"runs": {"1": "x"}}', "entry 1 of its table 'runs' is a JSON string, not a record"),
])
def test_an_index_that_is_not_tinydb_is_a_store_error_naming_the_file(store: Store, text: str, says: str) -> None:
    _create(store)
    store.index_path.write_text(text)
    for read in (store.list_runs, lambda: store.get_run("x"), lambda: _create(store), store.queued_runs):
        with pytest.raises(StoreError) as info:
            read()
        assert str(store.index_path) in str(info.value) and says in str(info.value)
    assert store.index_path.read_text() == text  # nothing was written over it


def test_a_broken_record_is_named_and_the_others_still_list(store: Store) -> None:
    good, missing, mistyped = _create(store, "good"), _create(store, "missing"), _create(store, "mistyped")
    store.enqueue(good.id)

    def damage(doc: dict) -> None:
        for entry in doc["runs"].values():
            if entry["id"] == missing.id:
                del entry["stage"], entry["kind"]
            elif entry["id"] == mistyped.id:
                entry.update(tags=5, status="queued", step="ten")
        doc["runs"]["99"] = {"name": "no id"}
    _edit_index(store, damage)

    assert [r.id for r in store.list_runs()] == [good.id]
    assert store.unreadable_runs() == [
        Unreadable(missing.id, "field 'stage' is missing; field 'kind' is missing"),
        Unreadable(mistyped.id, "field 'tags' is 5, not a list; field 'step' is 'ten', not a whole number"),
        Unreadable("#99", "field 'id' is missing; field 'stage' is missing; field 'kind' is missing; "
                          "field 'status' is missing"),
    ]
    with pytest.raises(StoreError) as info:
        store.get_run(missing.id)
    assert f"Run {missing.id} in {store.index_path} is unreadable: field 'stage' is missing" in str(info.value)
    assert [r.id for r in store.queued_runs()] == [good.id]  # the queue goes on without the broken one
    assert store.update_run(good.id, notes="still writable").notes == "still writable"


def test_tui_settings_are_one_small_file_per_user_outside_the_index(store: Store) -> None:
    """ren-tui keeps its view (marks, sort, filter, last screen) per user; saving never touches the run
    index, which the trainers lock every few seconds."""
    assert store.tui_settings("ada") == {}
    store.create_run(name="a", stage="finetune", kind="one_tower", config={})
    index_before = store.index_stamp()
    assert index_before is not None
    store.save_tui_settings("ada", {"screen": "queue", "marks": ["r1", "r2"], "sort": "name"})
    store.save_tui_settings("grace", {"screen": "runs"})
    assert store.tui_settings("ada") == {"screen": "queue", "marks": ["r1", "r2"], "sort": "name"}
    assert store.tui_settings("grace") == {"screen": "runs"}
    assert store.index_stamp() == index_before
    store.save_tui_settings("ada", {"screen": "runs"})  # replaced whole
    assert store.tui_settings("ada") == {"screen": "runs"}
    assert store.tui_settings_path("../x y").parent == store.root / "tui"
    assert sorted(p.name for p in (store.root / "tui").iterdir()) == ["ada.json", "grace.json"]  # no temp left
    store.tui_settings_path("ada").write_text("[]")
    with pytest.raises(StoreError, match="not TUI settings"):
        store.tui_settings("ada")
    with pytest.raises(StoreError, match="NaN"):
        store.save_tui_settings("ada", {"bad": float("nan")})
