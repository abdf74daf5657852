"""The Queue screen: GPUs, worker state and the queue's runs, and the keys that change the queue."""

from __future__ import annotations

import itertools
import socket
import subprocess
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

import engine.store
from engine.jobs import api as Q
from engine.jobs.gpus import GPU
from engine.store import RunRecord, Store, process_start_time
from ren_tui.app import RenApp
from ren_tui.backend import Backend
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.screens.queue import QueueScreen
from tests.helpers.paths import REPO

PRESET = REPO / "tests" / "fixtures" / "one_tower.toml"
GIB = 1024
FAKE_GPUS = [
    GPU(0, "GPU-0", "NVIDIA H100 80GB HBM3", "00000000:18:00.0", 80 * GIB, 40 * GIB, (), 87),
    GPU(1, "GPU-1", "NVIDIA H100 80GB HBM3", "00000000:2A:00.0", 80 * GIB, 0, (), 0),
    GPU(2, "GPU-2", "NVIDIA H100 80GB HBM3", "00000000:3A:00.0", 80 * GIB, 512, (), None),
    GPU(3, "GPU-3", "NVIDIA H100 80GB HBM3", "00000000:5D:00.0", 80 * GIB, 76 * GIB, (777,), 100),
]


class QueueApp(RenApp):
    """The app opening on the Queue screen (mode "queue", key 3) rather than Runs."""

    DEFAULT_MODE = "queue"


def make_app(home: Path, gpus: list[GPU]) -> QueueApp:
    return QueueApp(Backend(Store(home), start_worker=False, inventory=lambda: gpus))


def queue(store: Store, name: str, gpus: int = 1) -> RunRecord:
    return Q.add(store, PRESET, name=name, gpus=gpus, start_worker=False)[-1]


def mark_running(store: Store, run_id: str, devices: tuple[int, ...], pid: int = 4242,
                 host: str = "gpu-box") -> RunRecord:
    """A run the worker started (another host, so the store does not check its pid)."""
    return store.update_run(run_id, status="running", runner_pid=pid, host=host, devices=devices, step=4)


def save_checkpoint(store: Store, run_id: str, step: int) -> None:
    """A complete checkpoint at ``step``, laid out as engine.train writes one (its state file, no tensors)."""
    checkpoint = store.run_dir(run_id) / "checkpoints" / f"step_{step:08d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(f'{{"step": {step}}}')
    (checkpoint.parent / "latest").write_text(checkpoint.name)


def order(store: Store) -> list[str]:
    return [r.name for r in store.queued_runs()]


async def settle(app: RenApp, pilot: Pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


def table(app: RenApp, name: str) -> DataTable:
    return app.screen.query_one(f"#{name}", DataTable)


def text(app: RenApp, widget_id: str) -> str:
    return str(app.screen.query_one(f"#{widget_id}", Static).render())


def cursor_run(app: RenApp, name: str) -> str:
    t = table(app, name)
    return t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value


def notices(app: RenApp, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(app, "notify", lambda message, **kw: seen.append((message, kw.get("severity", "information"))))
    return seen


async def test_gpu_panel_shows_memory_utilisation_and_holders(ren_home: Path) -> None:
    store = Store(ren_home)
    held = mark_running(store, queue(store, "big-pretrain").id, devices=(0,))
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, QueueScreen)
        lines = text(app, "gpus").splitlines()
        assert len(lines) == 4
        assert "H100 80GB HBM3" in lines[0] and "40.0/80 GiB" in lines[0] and "87%" in lines[0]
        assert "← big-pretrain" in lines[0]
        assert "free" in lines[1] and "0.0/80 GiB" in lines[1]
        assert " - " in lines[2] and "free" in lines[2]  # no utilisation from NVML
        assert "busy: other processes" in lines[3] and "100%" in lines[3]
        running = table(app, "running")
        assert running.get_cell(held.id, "on") == "gpu 0"
        assert running.get_cell(held.id, "steps") == "4/10"
        assert running.get_cell(held.id, "pid") == "starting"  # 4242 is its runner: no trainer pid yet
        assert "no worker: it starts when you queue a run" in text(app, "state")


async def test_without_gpus_the_panel_shows_cpu_slots(ren_home: Path) -> None:
    store = Store(ren_home)
    first, second = queue(store, "first"), queue(store, "second")
    app = make_app(ren_home, [])
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert text(app, "gpus") == "no GPU: CPU — 1 slot(s), 0 in use"
        mark_running(store, first.id, devices=())
        app.screen.refresh_queue()
        await settle(app, pilot)
        assert text(app, "gpus") == "no GPU: CPU — 1 slot(s), 1 in use"
        assert table(app, "running").row_count == 1
        assert table(app, "queued").get_cell(second.id, "waits") == "needs 1 CPU slot(s), 0 free"


async def test_queued_runs_in_order_with_why_they_wait(ren_home: Path) -> None:
    store = Store(ren_home)
    mark_running(store, queue(store, "holder").id, devices=(0,))
    a, b, c = queue(store, "a"), queue(store, "b", gpus=2), queue(store, "c")
    huge = queue(store, "huge", gpus=8)
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(app, pilot)
        queued = table(app, "queued")
        assert [queued.get_cell(r.id, "#") for r in (a, b, c, huge)] == ["1", "2", "3", "4"]
        assert queued.get_cell(a.id, "waits") == "no worker is running (`ren worker`)"
        assert queued.get_cell(b.id, "waits") == "needs 2 free GPU(s), 1 free"
        assert queued.get_cell(c.id, "waits") == f"behind {b.id}"
        assert queued.get_cell(huge.id, "waits").startswith("needs 8 GPUs; the queue may use 4")
        assert text(app, "queued-title") == "Queued (4)"


async def test_reorder_keys_change_the_queue_order(ren_home: Path) -> None:
    store = Store(ren_home)
    runs = [queue(store, name) for name in ("a", "b", "c", "d")]
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("down")
        assert cursor_run(app, "queued") == runs[1].id
        await pilot.press("K")
        await settle(app, pilot)
        assert order(store) == ["b", "a", "c", "d"]
        assert cursor_run(app, "queued") == runs[1].id  # the cursor follows the run
        await pilot.press("K")  # already first: nothing moves
        await settle(app, pilot)
        assert order(store) == ["b", "a", "c", "d"]
        await pilot.press("shift+down", "J")
        await settle(app, pilot)
        assert order(store) == ["a", "c", "b", "d"]
        await pilot.press("shift+up")
        await settle(app, pilot)
        assert order(store) == ["a", "b", "c", "d"]
        await pilot.press("down", "down", "down", "t")
        await settle(app, pilot)
        assert order(store) == ["d", "a", "b", "c"]
        assert cursor_run(app, "queued") == runs[3].id
        assert table(app, "queued").get_cell(runs[3].id, "#") == "1"


async def test_reordering_needs_the_queued_table(ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    queue(store, "a")
    queue(store, "b")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await settle(app, pilot)
        table(app, "recent").focus()
        await pilot.press("t")
        await settle(app, pilot)
        assert order(store) == ["a", "b"]
        assert seen and seen[-1][1] == "warning" and "Queued table" in seen[-1][0]


async def test_x_cancels_a_queued_run(ren_home: Path) -> None:
    store = Store(ren_home)
    first, second = queue(store, "a"), queue(store, "b")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("x")
        await settle(app, pilot)
        assert store.get_run(first.id).status == "cancelled"
        assert store.get_run(second.id).status == "queued"
        assert [k.value for k in table(app, "queued").rows] == [second.id]
        assert table(app, "recent").get_cell(first.id, "status") == "cancelled"


async def test_x_on_a_running_run_asks_before_stopping_it(ren_home: Path) -> None:
    store = Store(ren_home)
    run = queue(store, "long")
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a runner leading its own process group
    try:
        store.update_run(run.id, status="running", runner_pid=proc.pid, runner_started=process_start_time(proc.pid),
                         host=socket.gethostname(), devices=(0,))
        app = make_app(ren_home, FAKE_GPUS)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(app, pilot)
            table(app, "running").focus()
            await pilot.press("x")
            await pilot.pause()
            assert isinstance(app.screen, Confirm)
            await pilot.press("n")
            await settle(app, pilot)
            assert isinstance(app.screen, QueueScreen)
            assert store.get_run(run.id).cancel_requested_at is None and proc.poll() is None
            await pilot.press("x")
            await pilot.pause()
            await pilot.press("y")
            await settle(app, pilot)
            assert store.get_run(run.id).cancel_requested_at is not None
            assert proc.wait(timeout=10) == -15  # SIGTERM to the run's process group
    finally:
        proc.kill()
        proc.wait()


async def test_p_pauses_and_resumes_the_queue(ren_home: Path) -> None:
    store = Store(ren_home)
    queued = queue(store, "a")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert text(app, "state").startswith("queue active")
        await pilot.press("p")
        await settle(app, pilot)
        assert store.queue_settings().paused
        assert text(app, "state").startswith("queue paused")
        assert table(app, "queued").get_cell(queued.id, "waits") == "the queue is paused"
        await pilot.press("p")
        await settle(app, pilot)
        assert not store.queue_settings().paused
        assert text(app, "state").startswith("queue active")


async def test_g_changes_the_gpu_count_of_a_queued_run(ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    run = queue(store, "a")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await settle(app, pilot)
        await pilot.press("g")
        await pilot.pause()
        assert isinstance(app.screen, Prompt)
        assert app.screen.query_one(Input).value == "1"
        await pilot.press("backspace", "2", "enter")
        await settle(app, pilot)
        assert store.get_run(run.id).gpus == 2
        assert table(app, "queued").get_cell(run.id, "gpus") == "2"
        await pilot.press("g", "backspace", "0", "enter")
        await settle(app, pilot)
        assert store.get_run(run.id).gpus == 2
        assert seen[-1] == ("a run needs at least one GPU (or CPU process).", "error")
        await pilot.press("g", "backspace", "x", "enter")
        await settle(app, pilot)
        assert seen[-1] == ("'x' is not a whole number of GPUs.", "error")
        await pilot.press("g", "escape")
        await settle(app, pilot)
        assert isinstance(app.screen, QueueScreen) and store.get_run(run.id).gpus == 2


async def test_R_queues_a_failed_run_again(ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    failed = queue(store, "oom")
    save_checkpoint(store, failed.id, 8)
    store.mark_ended(failed.id, "failed", error="CUDA out of memory on cuda:0\nmore detail")
    finished = queue(store, "done")
    store.mark_ended(finished.id, "finished")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await settle(app, pilot)
        recent = table(app, "recent")
        assert [k.value for k in recent.rows] == [finished.id, failed.id]  # newest first
        assert recent.get_cell(failed.id, "error") == "CUDA out of memory on cuda:0"
        recent.focus()
        await pilot.press("R")  # a finished run cannot be retried
        await settle(app, pilot)
        assert seen[-1][1] == "error" and "only failed, cancelled or crashed runs" in seen[-1][0]
        await pilot.press("down")
        assert text(app, "about").splitlines() == [f"{failed.id} failed · CUDA out of memory on cuda:0", "more detail"]
        await pilot.press("R")
        await settle(app, pilot)
        record = store.get_run(failed.id)
        assert record.status == "queued" and record.resume
        assert seen[-1][0] == f"queued {failed.id} again; it resumes from step 8, its last checkpoint"
        assert table(app, "queued").get_cell(failed.id, "waits").startswith("resumes from step 8 · ")
        assert [k.value for k in recent.rows] == [finished.id]


async def test_enter_opens_the_monitor_of_the_selected_run(ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    queue(store, "a")
    second = queue(store, "b")
    app = make_app(ren_home, FAKE_GPUS)
    opened: list[str] = []
    monkeypatch.setattr(app, "open_monitor", opened.append)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("down", "enter")
        assert opened == [second.id]


async def test_live_refresh_keeps_the_cursor_on_the_same_run(ren_home: Path) -> None:
    store = Store(ren_home)
    runs = [queue(store, name) for name in ("a", "b", "c")]
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("down", "down")
        assert cursor_run(app, "queued") == runs[2].id
        newcomer = queue(store, "urgent")
        Q.move(store, newcomer.id, 1)
        store.mark_ended(runs[0].id, "cancelled")
        await pilot.pause(1.3)  # one tick of the 1 s refresh
        await settle(app, pilot)
        assert [k.value for k in table(app, "queued").rows] == [newcomer.id, runs[1].id, runs[2].id]
        assert cursor_run(app, "queued") == runs[2].id


def test_queue_snapshot(snap_compare, ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = itertools.count(1)
    monkeypatch.setattr(engine.store, "_new_run_id", lambda name, created_at: f"r{next(counter):02d}-{name}")
    store = Store(ren_home)
    mark_running(store, queue(store, "pretrain-deit").id, devices=(0,))
    for name, gpus in (("finetune-a", 1), ("finetune-b", 2), ("finetune-c", 1)):
        queue(store, name, gpus)
    store.mark_ended(queue(store, "oom-run").id, "failed", error="CUDA out of memory on cuda:0 with batch 256")
    store.mark_ended(queue(store, "stopped").id, "cancelled", error="cancelled while queued")
    app = make_app(ren_home, FAKE_GPUS)

    async def run_before(pilot: Pilot) -> None:
        app.sub_title = "test store"
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


# --- navigation (issue 17) ---------------------------------------------------------


async def test_home_and_end_go_to_the_first_and_last_queued_run(ren_home: Path) -> None:
    store = Store(ren_home)
    runs = [queue(store, f"q{i}") for i in range(12)]
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        await pilot.press("end")
        assert cursor_run(app, "queued") == runs[-1].id
        await pilot.press("home")
        assert cursor_run(app, "queued") == runs[0].id


async def test_enter_opens_the_running_run_when_nothing_is_queued(ren_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With one run running and none queued, the keyboard starts on the Running panel, so enter opens it
    (it used to start on the empty Queued panel and say "No run selected")."""
    store = Store(ren_home)
    running = mark_running(store, queue(store, "training").id, devices=(0,))
    app = make_app(ren_home, FAKE_GPUS)
    opened: list[str] = []
    monkeypatch.setattr(app, "open_monitor", opened.append)
    async with app.run_test(size=(120, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await settle(app, pilot)
        await pilot.press("enter")
        assert opened == [running.id] and seen == []


async def test_tab_goes_through_the_panels_top_to_bottom(ren_home: Path) -> None:
    """Tab: Running, Queued, Recently ended, and round again; shift+tab the other way. The keyboard starts
    on the Queued panel when runs wait there, and follows a run that leaves it empty."""
    store = Store(ren_home)
    mark_running(store, queue(store, "training").id, devices=(0,))
    waiting = queue(store, "waiting")
    store.mark_ended(queue(store, "broken").id, "failed", error="boom")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        seen = [app.focused.id]
        for _ in range(3):
            await pilot.press("tab")
            seen.append(app.focused.id)
        assert seen == ["queued", "recent", "running", "queued"]
        await pilot.press("shift+tab", "shift+tab")
        assert app.focused.id == "recent"
        await pilot.press("tab", "tab")  # back on Queued; its only run starts
        mark_running(store, waiting.id, devices=(1,))
        app.screen.refresh_queue()
        await settle(app, pilot)
        assert app.focused.id == "running"


async def test_R_on_a_run_cancelled_while_queued_says_it_starts_over(ren_home: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A run cancelled before it started saved no checkpoint: R queues it again and says it starts over (it
    used to claim it "resumes from its checkpoint"); the Queued panel says so too."""
    store = Store(ren_home)
    run = queue(store, "never-started")
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await settle(app, pilot)
        await pilot.press("x")  # cancelled while queued
        await settle(app, pilot)
        assert app.focused.id == "recent" and cursor_run(app, "recent") == run.id
        await pilot.press("R")
        await settle(app, pilot)
        assert store.get_run(run.id).status == "queued"
        assert seen[-1] == (f"queued {run.id} again; it saved no checkpoint, so it starts over from step 0",
                            "information")
        assert "resumes" not in table(app, "queued").get_cell(run.id, "waits")
        assert table(app, "queued").get_cell(run.id, "waits").startswith("starts over · ")


async def test_an_empty_panel_tabbed_to_keeps_the_keyboard(ren_home: Path) -> None:
    """Only a panel that its last run left hands the keyboard on: one the user tabbed to, empty, keeps it
    through the refreshes (it used to jump back to Running every second)."""
    store = Store(ren_home)
    mark_running(store, queue(store, "training").id, devices=(0,))
    app = make_app(ren_home, FAKE_GPUS)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert app.focused.id == "running"
        await pilot.press("tab")
        assert app.focused.id == "queued"
        app.screen.refresh_queue()
        await settle(app, pilot)
        assert app.focused.id == "queued"
