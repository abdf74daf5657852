"""Placement on a fake 4-GPU inventory, and the queue's records in the store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.errors import StoreError
from engine.jobs.gpus import GPU
from engine.jobs.scheduler import plan
from engine.store import QueueSettings, RunRecord, Store


def gpu(index: int, used_mb: int = 0) -> GPU:
    return GPU(index=index, uuid=f"GPU-{index:04d}", name="fake", pci_bus_id=f"0000:{index:02x}:00.0",
               memory_total_mb=80_000, memory_used_mb=used_mb)


FOUR = [gpu(0), gpu(1, used_mb=30_000), gpu(2), gpu(3)]  # GPU 1 is taken by someone else's process


def rec(run_id: str, gpus: int = 1, after: tuple[str, ...] = (), status: str = "queued",
        devices: tuple[int, ...] = ()) -> RunRecord:
    return RunRecord(id=run_id, name=run_id, stage="pretrain", kind="one_tower", status=status, gpus=gpus,
                     after=after, devices=devices)


def placed(result) -> dict[str, tuple[int, ...]]:
    return {p.run_id: p.devices for p in result.start}


def test_first_come_first_served_on_free_gpus() -> None:
    queue = [rec("a", 1), rec("b", 2), rec("c", 4), rec("d", 1)]
    result = plan(queue, [], FOUR, QueueSettings(), {})
    assert placed(result) == {"a": (0,), "b": (2, 3)}
    assert result.waiting["c"] == "needs 4 free GPU(s), 0 free"
    assert result.waiting["d"] == "behind c"  # no overtaking: the 4-GPU run is not starved


def test_the_big_run_starts_once_everything_is_free() -> None:
    queue = [rec("c", 4), rec("d", 1)]
    running = [rec("a", 1, status="running", devices=(0,))]
    assert placed(plan(queue, running, [gpu(i) for i in range(4)], QueueSettings(), {})) == {}
    assert placed(plan(queue, [], [gpu(i) for i in range(4)], QueueSettings(), {})) == {"c": (0, 1, 2, 3)}


def test_foreign_memory_threshold_is_configurable() -> None:
    queue = [rec("a", 4)]
    assert placed(plan(queue, [], FOUR, QueueSettings(foreign_memory_mb=None), {})) == {"a": (0, 1, 2, 3)}
    assert placed(plan(queue, [], FOUR, QueueSettings(foreign_memory_mb=40_000), {})) == {"a": (0, 1, 2, 3)}
    assert placed(plan(queue, [], FOUR, QueueSettings(), {})) == {}


def test_runs_already_placed_hold_their_gpus() -> None:
    running = [rec("x", 2, status="running", devices=(0, 2))]
    result = plan([rec("a", 1), rec("b", 1)], running, FOUR, QueueSettings(), {})
    assert placed(result) == {"a": (3,)}
    assert result.waiting["b"] == "needs 1 free GPU(s), 0 free"


def test_runs_per_gpu_and_allow_list() -> None:
    settings = QueueSettings(runs_per_gpu=2, allow_gpus=(2, 3))
    queue = [rec(name) for name in "abcde"]
    result = plan(queue, [], FOUR, settings, {})
    assert sorted(placed(result).values()) == [(2,), (2,), (3,), (3,)]
    assert list(placed(result)) == ["a", "b", "c", "d"]
    assert result.waiting["e"].startswith("needs 1 free GPU")
    too_big = plan([rec("big", 3), rec("a")], [], FOUR, settings, {})
    assert "the queue may use 2" in too_big.waiting["big"]
    assert placed(too_big) == {"a": (2,)}  # a run that can never fit does not stall the queue


def test_dependencies_step_aside_and_dead_ones_doom() -> None:
    queue = [rec("ft", after=("pre",)), rec("other"), rec("ft2", after=("gone",))]
    result = plan(queue, [], FOUR, QueueSettings(), {"pre": "running", "gone": "failed"})
    assert placed(result) == {"other": (0,)}
    assert result.waiting["ft"] == "waiting for pre"
    assert "gone (failed)" in result.doomed["ft2"]
    assert placed(plan(queue[:1], [], FOUR, QueueSettings(), {"pre": "finished"})) == {"ft": (0,)}


def test_paused_queue_starts_nothing() -> None:
    result = plan([rec("a")], [], FOUR, QueueSettings(paused=True), {})
    assert result.start == [] and result.waiting["a"] == "the queue is paused"


def test_cpu_machine_uses_slots() -> None:
    queue = [rec("a"), rec("b", gpus=2), rec("c")]
    result = plan(queue, [], [], QueueSettings(cpu_slots=2), {})
    assert placed(result) == {"a": ()}
    assert result.waiting["b"] == "needs 2 CPU slot(s), 1 free"
    one_slot = plan(queue, [rec("x", status="running")], [], QueueSettings(), {})
    assert one_slot.start == [] and one_slot.waiting["a"] == "needs 1 CPU slot(s), 0 free"


# --- the queue in the store ---------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def make(store: Store, name: str) -> RunRecord:
    return store.create_run(name=name, stage="pretrain", kind="one_tower", config={})


def test_enqueue_order_and_move(store: Store) -> None:
    a, b, c = (make(store, n) for n in "abc")
    for r in (a, b, c):
        store.enqueue(r.id)
    assert [r.name for r in store.queued_runs()] == ["a", "b", "c"]
    assert [r.name for r in store.move_in_queue(c.id, 1)] == ["c", "a", "b"]
    assert [r.name for r in store.move_in_queue(c.id, 99)] == ["a", "b", "c"]
    store.mark_ended(b.id, "cancelled")
    assert [r.name for r in store.move_in_queue(a.id, 2)] == ["c", "a"]
    with pytest.raises(StoreError, match="cancelled, not queued"):
        store.move_in_queue(b.id, 1)


def test_enqueue_checks_status_and_dependencies(store: Store) -> None:
    a, b = make(store, "a"), make(store, "b")
    queued = store.enqueue(b.id, gpus=2, after=[a.id[:-2]])  # a unique prefix is resolved
    assert queued.after == (a.id,) and queued.gpus == 2 and queued.status == "queued"
    with pytest.raises(StoreError, match="is queued"):
        store.enqueue(b.id)
    with pytest.raises(StoreError, match="wait for itself"):
        store.enqueue(a.id, after=[a.id])
    store.mark_ended(b.id, "failed", error="boom")
    again = store.enqueue(b.id, resume=True)
    assert again.status == "queued" and again.resume and again.error is None
    assert Store(store.root).get_run(b.id) == again  # survives a reopen, tuples included


def test_settings_persist_and_validate(store: Store) -> None:
    assert store.queue_settings() == QueueSettings()
    store.update_queue_settings(cpu_slots=3, allow_gpus=(1, 2))
    assert Store(store.root).queue_settings() == dataclasses.replace(QueueSettings(), cpu_slots=3, allow_gpus=(1, 2))
    with pytest.raises(ValueError, match="cpu_slots must be at least 1"):
        store.update_queue_settings(cpu_slots=0)
    with pytest.raises(ValueError, match="Unknown queue setting"):
        store.update_queue_settings(slots=2)
    assert store.queue_settings().cpu_slots == 3  # a refused change leaves the settings alone
