"""The queue worker: placement through a fake GPU inventory, and real tiny CPU runs
started, cancelled, crashed and re-adopted by a worker process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.errors import RenError, StoreError
from engine.jobs import api as Q
from engine.jobs.gpus import GPU
from engine.jobs.worker import Worker, worker_info
from engine.store import Store
from tests.helpers.paths import REPO

FIXTURE = REPO / "tests" / "fixtures" / "one_tower.toml"


def gpu(index: int, used_mb: int = 0) -> GPU:
    return GPU(index=index, uuid=f"GPU-{index:04d}", name="fake", pci_bus_id=f"0000:{index:02x}:00.0",
               memory_total_mb=80_000, memory_used_mb=used_mb)


class FakeChild(subprocess.Popen):
    """Stands in for a runner: a sleeping process that records what the worker asked to run."""

    def __init__(self, argv: list[str], **kwargs) -> None:
        self.argv, self.env = argv, kwargs["env"]
        super().__init__(["sleep", "600"])


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch):
    children: dict[str, FakeChild] = {}

    def popen(argv: list[str], **kwargs) -> FakeChild:
        child = FakeChild(argv, **kwargs)
        children[argv[argv.index("engine.jobs.runner") + 1]] = child
        return child

    monkeypatch.setattr("engine.jobs.worker.subprocess.Popen", popen)
    yield children
    for child in children.values():
        child.kill()
        child.wait()


def queue(store: Store, name: str, gpus: int = 1, after: list[str] = ()) -> str:
    (record,) = Q.add(store, FIXTURE, gpus=gpus, after=after, name=name, start_worker=False)
    return record.id


def finish(store: Store, launched: dict[str, FakeChild], run_id: str, status: str = "finished") -> None:
    store.mark_ended(run_id, status)
    launched[run_id].kill()
    launched[run_id].wait()


def test_placement_order_devices_dependencies_and_reordering(ren_home: Path,
                                                            launched: dict[str, FakeChild]) -> None:
    store = Store(ren_home)
    inventory = [gpu(0), gpu(1, used_mb=20_000), gpu(2), gpu(3)]  # GPU 1 is busy with a foreign process
    worker = Worker(store, inventory=lambda: inventory)
    a, b = queue(store, "a", 1), queue(store, "b", 2)
    c, d = queue(store, "c", 4), queue(store, "d", 1, after=[a])

    assert worker.tick() == [a, b]
    assert launched[a].env["CUDA_VISIBLE_DEVICES"] == "0" and launched[b].env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert launched[a].env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert launched[a].argv[-4:] == [sys.executable, "-m", "engine.train", a]  # one GPU: no accelerate launch
    assert "accelerate.commands.launch" in launched[b].argv
    assert launched[b].argv[launched[b].argv.index("--num_processes") + 1] == "2"
    assert store.get_run(b).devices == (2, 3) and store.get_run(b).status == "running"
    reasons = Q.view(store, gpus=inventory).reasons
    assert reasons[c] == "needs 4 free GPU(s), 0 free" and reasons[d] == "waiting for " + a

    finish(store, launched, a)
    assert worker.tick() == []  # d may go now, but c is first in line and does not fit
    assert Q.view(store, gpus=inventory).reasons[d] == f"behind {c}"
    Q.move(store, d, 1)
    assert worker.tick() == [d] and launched[d].env["CUDA_VISIBLE_DEVICES"] == "0"

    finish(store, launched, b)
    finish(store, launched, d)
    assert worker.tick() == []  # GPU 1 is still taken by the foreign process
    inventory[1] = gpu(1)
    assert worker.tick() == [c]
    assert launched[c].env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert launched[c].argv[launched[c].argv.index("--num_processes") + 1] == "4"


def test_a_dependency_that_failed_cancels_the_waiting_run(ren_home: Path, launched: dict[str, FakeChild]) -> None:
    store = Store(ren_home)
    worker = Worker(store, inventory=lambda: [gpu(0)])
    a = queue(store, "a")
    b = queue(store, "b", after=[a])
    assert worker.tick() == [a]
    finish(store, launched, a, "failed")
    worker.tick()
    after = store.get_run(b)
    assert after.status == "cancelled" and f"{a} (failed)" in after.error


def test_queue_api_refuses_bad_requests(ren_home: Path) -> None:
    store = Store(ren_home)
    run = queue(store, "a")
    with pytest.raises(RenError, match="only failed, cancelled or crashed"):
        Q.retry(store, run)
    with pytest.raises(RenError, match="queue positions start at 1"):
        Q.move(store, run, 0)
    with pytest.raises(RenError, match="cpu_slot"):
        Q.configure(store, ["cpu_slot=2"])
    with pytest.raises(RenError, match="cpu_slots=0 is refused: it must be a finite number from 1 to 1024"):
        Q.configure(store, ["cpu_slots=0"])
    assert Q.configure(store, ["cpu_slots=2", "allow_gpus=0,2", "foreign_memory_mb=none"]).allow_gpus == (0, 2)
    assert Q.cancel(store, run).status == "cancelled"
    with pytest.raises(RenError, match="only queued or running"):
        Q.cancel(store, run)


# --- real runs under a worker process -------------------------------------------------------------------------------


def tiny_preset(tmp_path: Path, data_cache: Path, name: str, steps: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'extends = "{FIXTURE}"\n[run]\nname = "{name}"\n'
        f'[data]\ncache_dir = "{data_cache}"\neval_max_samples = 32\n'
        f"[train]\nmax_steps = {steps}\nbatch_size = 4\nlog_every = 1\neval_every = 100000\n"
        "checkpoint_every = 100000\ncpu_threads = 1\n"
    )
    return path


def start_worker(ren_home: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "engine.jobs.worker"], env={**os.environ, "REN_HOME": str(ren_home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while worker_info(Store(ren_home)) is None or not worker_info(Store(ren_home)).pid:
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    return proc


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


@pytest.mark.slow
def test_one_slot_runs_in_order_and_cancel_starts_the_next(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    long_run = queue_preset(store, tiny_preset(tmp_path, data_cache, "long", 100_000))
    second = queue_preset(store, tiny_preset(tmp_path, data_cache, "second", 3))
    third = queue_preset(store, tiny_preset(tmp_path, data_cache, "third", 3))
    worker = start_worker(ren_home)
    try:
        wait_for(lambda: store.read_metrics(long_run), 120, "the first run to train")
        assert store.get_run(second).status == "queued"
        running = store.get_run(long_run)
        members = group_members(running.runner_pid)
        assert {running.runner_pid, running.pid} <= {p.pid for p in members}

        Q.cancel(store, long_run)
        t0 = time.monotonic()
        wait_for(lambda: store.get_run(second).status != "queued", 5, "the next run to start after a cancel")
        started_after_s = time.monotonic() - t0
        cancelled = store.get_run(long_run)
        assert cancelled.status == "cancelled", cancelled.error
        assert cancelled.error and "when asked to" in cancelled.error  # a reason, as every ended run has
        assert (store.run_dir(long_run) / "checkpoints" / "latest").exists()  # it checkpointed on SIGTERM
        assert group_members(cancelled.runner_pid) == []  # no orphans: the whole group is gone

        wait_for(lambda: store.get_run(third).status in ("finished", "failed"), 180, "the third run")
        s, t = store.get_run(second), store.get_run(third)
        assert s.status == t.status == "finished", (s.error, t.error)
        assert t.started_at >= s.ended_at  # one slot: strictly one after another
        assert any("step 3/3" in line for line in Q.follow_log(store, second))
        print(f"next run started {started_after_s:.2f}s after the cancel")
    finally:
        worker.terminate()
        worker.wait(timeout=10)


def queue_preset(store: Store, preset: Path) -> str:
    (record,) = Q.add(store, preset, start_worker=False)
    return record.id


@pytest.mark.slow
def test_a_killed_worker_is_replaced_without_losing_runs(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    Q.configure(store, ["cpu_slots=2"])
    survivor = queue_preset(store, tiny_preset(tmp_path, data_cache, "survivor", 40))
    victim = queue_preset(store, tiny_preset(tmp_path, data_cache, "victim", 100_000))
    later = queue_preset(store, tiny_preset(tmp_path, data_cache, "later", 2))
    worker = start_worker(ren_home)
    try:
        wait_for(lambda: all(store.get_run(r).pid for r in (survivor, victim)), 120, "both runs to start")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        victim_record = store.get_run(victim)
        os.killpg(victim_record.runner_pid, signal.SIGKILL)  # the victim dies while no worker watches
        wait_for(lambda: not group_members(victim_record.runner_pid), 10, "the victim's processes to go")
        assert store.get_run(survivor).status == "running"  # its trainer does not depend on the worker
        assert store.get_run(later).status == "queued"

        worker = start_worker(ren_home)
        failed = wait_for(lambda: (r := store.get_run(victim)).status == "failed" and r, 10, "the victim marked failed")
        assert "processes are gone" in failed.error and "SIGKILL" in failed.error
        wait_for(lambda: store.get_run(later).status in ("finished", "failed"), 180, "the queued run")
        s, lt = store.get_run(survivor), store.get_run(later)
        assert s.status == "finished" and s.step == 40, s.error  # re-adopted, ran to its end
        assert lt.status == "finished", lt.error
        retried = Q.retry(store, victim, start_worker=False)
        assert retried.status == "queued" and retried.resume
    finally:
        worker.terminate()
        worker.wait(timeout=10)


def test_only_one_worker_per_store(ren_home: Path) -> None:
    Store(ren_home)
    first = start_worker(ren_home)
    try:
        second = subprocess.run([sys.executable, "-m", "engine.jobs.worker"],
                                env={**os.environ, "REN_HOME": str(ren_home)},
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "another worker serves" in second.stderr
        assert worker_info(Store(ren_home)).pid == first.pid
    finally:
        first.terminate()
        first.wait(timeout=10)
    assert worker_info(Store(ren_home)) is None


def test_a_preset_named_by_init_from_is_queued_first(tmp_path: Path, ren_home: Path) -> None:
    model = FIXTURE.read_text().split("[model]", 1)[1].split("[task]", 1)[0]
    (tmp_path / "pre.toml").write_text('[run]\nname = "pre"\n[objectives.mlm]\n[model]' + model)
    (tmp_path / "ft.toml").write_text('[run]\nname = "ft"\n[task]\nname = "vqa"\n'
                                      '[train]\ninit_from = "preset:pre.toml"\n[model]' + model)
    store = Store(ren_home)
    pre, ft = Q.add(store, tmp_path / "ft.toml", gpus=2, start_worker=False)
    assert (pre.name, ft.name) == ("pre", "ft")
    assert ft.after == (pre.id,) and ft.config["train"]["init_from"] == f"run:{pre.id}" and pre.gpus == 2
    (again,) = Q.add(store, tmp_path / "ft.toml", start_worker=False)  # the queued pretraining is reused
    assert again.after == (pre.id,)
    assert [r.id for r in store.queued_runs()] == [pre.id, ft.id, again.id]


# --- crash points and bad records (issue 15) ------------------------------------------------------------------------


_POPEN = subprocess.Popen  # the real one, also while the `launched` fixture stands in for runners


def own_group(*argv: str) -> subprocess.Popen:
    """A process leading its own group, as a runner does (the worker watches and signals the group)."""
    return _POPEN(list(argv), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_run_marked_running_by_a_worker_that_died_is_queued_again(ren_home: Path,
                                                                    launched: dict[str, FakeChild]) -> None:
    """The state a worker SIGKILLed between marking a run running and starting its runner leaves (the
    real kill: tests/reliability/test_queue_crash.py) once wedged the queue for good: the next worker's
    enqueue refused the running run and that error aborted every tick."""
    store = Store(ren_home)
    stuck, behind = queue(store, "stuck"), queue(store, "behind")
    launch = time.time() - 5
    store.update_run(stuck, status="running", host=os.uname().nodename, launched_at=launch, started_at=launch)
    assert [r.id for r in Q.view(store, gpus=[]).running] == [stuck]  # `ren queue ls` shows it

    worker = Worker(store, inventory=lambda: [gpu(0), gpu(1)])
    assert worker.tick() == [stuck, behind]  # requeued at its place, then started with the one behind it
    record = store.get_run(stuck)
    assert record.status == "running" and record.runner_pid == launched[stuck].pid and record.launched_at != launch
    assert "its worker stopped before starting it; it is back in the queue" in (
        store.run_dir(stuck) / "logs" / "run.log").read_text()


def test_a_runner_of_a_voided_launch_starts_nothing(ren_home: Path, tmp_path: Path) -> None:
    """A runner started just before its worker died claims the run for its launch; the next worker has
    voided that launch by then, so the runner exits without starting the trainer: no run twice at once."""
    store = Store(ren_home)
    run_id = queue(store, "voided")
    store.update_run(run_id, status="running", host=os.uname().nodename, launched_at=100.0)
    Worker(store, inventory=lambda: []).store.update_queue_settings(paused=True)
    Worker(store, inventory=lambda: []).tick()  # voids launch 100.0: the run is queued again (paused: no start)
    assert store.get_run(run_id).status == "queued"
    marker = tmp_path / "trained"
    runner = subprocess.run([sys.executable, "-m", "engine.jobs.runner", run_id, "--launch", "100.0", "--",
                             sys.executable, "-c", f"open({str(marker)!r}, 'w')"], env=os.environ.copy(), timeout=60)
    assert runner.returncode == 0 and not marker.exists()
    assert store.get_run(run_id).status == "queued" and store.get_run(run_id).runner_pid is None
    assert "nothing started" in (store.run_dir(run_id) / "logs" / "run.log").read_text()


def test_a_record_that_breaks_the_worker_fails_alone(ren_home: Path, launched: dict[str, FakeChild],
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = Store(ren_home)
    broken_gpus, broken_check = queue(store, "broken-gpus"), queue(store, "broken-check")
    victim, a, b = queue(store, "victim"), queue(store, "a"), queue(store, "b")
    store.update_run(broken_gpus, gpus="two")  # a hand-edited index: plan() cannot compare it
    runner = own_group("sleep", "600")
    store.update_run(broken_check, status="running", host=os.uname().nodename, launched_at=1.0,
                     runner_pid=runner.pid, cancel_requested_at="soon")  # reconciling it raises
    monkeypatch.setenv("REN_FAULT", "worker:marked-running=raise")  # the first launch raises, once
    monkeypatch.setenv("REN_FAULT_DIR", str(tmp_path))
    try:
        started = Worker(store, inventory=lambda: [gpu(i) for i in range(4)]).tick()
    finally:
        runner.kill()
        runner.wait()
    assert started == [a, b]
    assert store.get_run(victim).status == "failed"
    assert store.get_run(victim).error == ("the worker could not start it: RuntimeError: fault injected at "
                                           "worker:marked-running (REN_FAULT)")
    with pytest.raises(StoreError, match="field 'gpus' is 'two', not a whole number"):
        store.get_run(broken_gpus)  # the store reads it as unreadable (named by `ren runs`) and schedules the rest
    with pytest.raises(StoreError, match="field 'cancel_requested_at' is 'soon'"):
        store.get_run(broken_check)


def test_a_garbage_pid_reads_as_no_process(ren_home: Path) -> None:
    store = Store(ren_home)
    run_id = queue(store, "garbage")
    store.update_run(run_id, status="running", host=os.uname().nodename, runner_pid=-7, pid=-3)
    (record,) = store.list_runs()  # once an error from psutil that broke every listing
    assert record.status == "crashed" and "before its first step" in record.error


def test_a_nan_grace_period_stored_earlier_still_ends_in_sigkill(ren_home: Path) -> None:
    """cancel_grace_s = nan (accepted by `ren queue config` before issue 15) made the worker wait for ever
    on a cancelled run that ignores SIGTERM; the worker now uses the default for an unusable value."""
    store = Store(ren_home)
    store.update_queue_settings(cancel_grace_s=61.5)  # then as an older ren wrote it (the store now refuses NaN)
    index = ren_home / "index.json"
    index.write_text(index.read_text().replace("61.5", "NaN"))
    run_id = queue(store, "stubborn")
    runner = own_group(sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                             "time.sleep(600)")
    try:
        store.update_run(run_id, status="running", host=os.uname().nodename, launched_at=1.0, runner_pid=runner.pid,
                         runner_started=psutil.Process(runner.pid).create_time(),
                         cancel_requested_at=time.time() - 61)  # the default grace is 60 s
        Worker(store, inventory=lambda: []).tick()
        assert runner.wait(timeout=10) == -signal.SIGKILL
    finally:
        runner.kill()
        runner.wait()


def test_a_killed_runner_is_watched_by_its_group_then_explained(ren_home: Path, tmp_path: Path) -> None:
    """A runner SIGKILLed under a live trainer: the run stays running while the trainer lives (the worker
    watches the process group) and, once the trainer is gone too, is failed with the reason, which the
    run's log also says (`ren logs`)."""
    store = Store(ren_home)
    run_id = queue(store, "orphaned")
    ready = tmp_path / "ready"
    launch = time.time()
    store.update_run(run_id, status="running", host=os.uname().nodename, launched_at=launch)
    runner = subprocess.Popen(
        [sys.executable, "-m", "engine.jobs.runner", run_id, "--launch", repr(launch), "--", sys.executable, "-c",
         f"import os, time; open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(600)"],
        start_new_session=True, env=os.environ.copy())
    trainer = None
    try:
        wait_for(ready.exists, 60, "the trainer to start")
        trainer = int(wait_for(ready.read_text, 10, "the trainer's pid"))
        store.update_run(run_id, pid=trainer, pid_started=psutil.Process(trainer).create_time())
        runner.kill()
        runner.wait()
        worker = Worker(store, inventory=lambda: [])
        worker.tick()
        assert store.get_run(run_id).status == "running"  # its trainer lives
        os.kill(trainer, signal.SIGKILL)
        wait_for(lambda: not group_members(runner.pid), 10, "the trainer to go")
        worker.tick()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
    after = store.get_run(run_id)
    assert after.status == "failed"
    assert f"its runner (pid {runner.pid}) recorded no outcome" in after.error
    log = "\n".join(Q.follow_log(store, run_id))
    assert f"[ren worker] its runner (pid {runner.pid}) was killed; its training processes go on" in log
    assert f"[ren worker] {after.error}" in log


def test_cpu_runs_are_never_squeezed_into_fewer_slots(ren_home: Path, launched: dict[str, FakeChild]) -> None:
    store = Store(ren_home)
    Q.configure(store, ["cpu_slots=2"])
    wide, narrow = queue(store, "wide", gpus=2), queue(store, "narrow")
    Q.configure(store, ["cpu_slots=1"])  # lowered after the 2-process run was queued
    assert Worker(store, inventory=lambda: []).tick() == [narrow]  # the one that can never fit steps aside
    assert Q.view(store, gpus=[]).reasons[wide] == ("needs 2 CPU slots (one per process); the queue has 1 (see "
                                                    "`ren queue config cpu_slots`)")
    with pytest.raises(RenError, match=r"--gpus 2: this machine has no GPU.*has 1 \(queue setting cpu_slots\)"):
        Q.add(store, FIXTURE, gpus=2, start_worker=False, inventory=[])
    with pytest.raises(RenError, match="--gpus 3: this machine has 2 GPU"):
        Q.add(store, FIXTURE, gpus=3, start_worker=False, inventory=[gpu(0), gpu(1)])


def test_only_rank_0_reports_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.progress import LineReporter, QuietReporter, make_reporter

    monkeypatch.setenv("RANK", "1")
    assert isinstance(make_reporter(), QuietReporter)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(make_reporter(), LineReporter)  # not a terminal under pytest
