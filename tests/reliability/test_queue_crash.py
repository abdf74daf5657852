"""Crash points of the queue and of `ren run` (issue 15), each produced deterministically.

A process reaches a named point of a transition and acts there as ``$REN_FAULT`` says (engine.faults):
SIGKILL itself, raise, or Ctrl-C itself. The outcome is read back through the real entry points (`ren runs`,
`ren show`, `ren logs`, the store façade the TUI reads) and the store. What is checked: the queue always makes
progress, nothing runs twice, and every run ends in a final state with a reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import commands
from engine.config import load_preset
from engine.errors import RenError
from engine.jobs import api as Q
from engine.jobs.worker import LOG_NAME
from engine.runs import create_run
from engine.store import RunRecord, Store, is_alive
from tests.helpers.cli import REN, spawn_ren
from tests.helpers.paths import REPO
from tests.helpers.training import tiny_preset

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"


def ren(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REN, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def until(predicate, what: str, timeout_s: float = 300.0, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(poll_s)
    return value


def clean(text: str) -> str:
    return " ".join(text.split())


# --- `ren run` ------------------------------------------------------------------------------------------------------


def test_ren_run_killed_in_start_up_reads_crashed_with_the_reason(ren_home: Path) -> None:
    """SIGKILL during start-up (before the first step) once left the run "created" for ever, with no reason."""
    proc = spawn_ren("run", str(ONE_TOWER), env={"REN_FAULT": "run:claimed=kill"})
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (record,) = Store(ren_home, read_only=True).list_runs()  # what the TUI reads
    assert record.status == "crashed"
    assert record.error.startswith(f"Its process (pid {proc.pid}) ended before its first step without recording "
                                   "a result: it was killed (SIGKILL, the out-of-memory killer)")
    listed = ren("runs")
    assert record.id in listed.stdout and "crashed" in listed.stdout
    shown = ren("show", record.id)
    assert shown.returncode == 0 and f"error: {record.error}" in clean(shown.stdout)


def test_an_error_before_the_first_step_fails_the_run(tmp_path: Path, ren_home: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text(f'extends = "{ONE_TOWER}"\n[data]\ndataset = "vqav2"\nroot = "{tmp_path}/no"\n'
                      'tokenizer = "google/electra-small-discriminator"\n')
    result = ren("run", str(preset))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (record,) = Store(ren_home).list_runs()
    assert record.status == "failed"  # was "created"
    assert f"{tmp_path}/no does not exist" in record.error and record.error in clean(result.stderr)


def test_ctrl_c_twice_in_start_up_exits_cleanly_and_records_why(ren_home: Path) -> None:
    """The first Ctrl-C lands in start-up, the second while the first is being handled."""
    proc = spawn_ren("run", str(ONE_TOWER), env={"REN_FAULT": "run:claimed=sigint,run:interrupted=sigint"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "Exception ignored" not in err, err
    (record,) = Store(ren_home).list_runs()
    assert record.status == "cancelled"
    assert record.error == "interrupted (Ctrl-C) before its first step; `ren run --resume` continues it"
    assert clean(err) == f"interrupted; run {record.id} recorded as cancelled ({record.error})"


def test_a_ctrl_c_landing_in_a_finaliser_still_stops_ren_run(ren_home: Path) -> None:
    """A SIGINT handled inside a ``__del__`` (filelock's BaseFileLock.__del__ in the report) cannot raise there:
    Python printed "Exception ignored in ... Traceback" and went on as if Ctrl-C had not been pressed."""
    script = (
        "import time\n"
        "from engine.cli.commands import _Owner\n"
        "from engine.store import Store\n"
        "_Owner(Store())\n"
        "class Finalised:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt  # what the SIGINT handler does when the signal lands here\n"
        "try:\n"
        "    Finalised()\n"
        "    for _ in range(500):\n"
        "        time.sleep(0.01)\n"
        "    print('went on')\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.stdout.strip() == "stopped" and "Exception ignored" not in result.stderr, result.stderr


def test_resume_refuses_a_finished_or_queued_run_and_changes_nothing(tmp_path: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    preset = tiny_preset(tmp_path / "tiny.toml", tmp_path / "cache")
    done = create_run(store, load_preset(preset), str(preset))
    weights = store.run_dir(done.id) / "model.safetensors"
    weights.write_bytes(b"the final weights")
    store.update_run(done.id, status="finished", step=12, started_at=1000.0, ended_at=1600.0)
    result = ren("run", "--resume", done.id)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"run {done.id} is finished (step 12 of 12); there is nothing to resume" in clean(result.stderr)
    assert f"train.init_from='\"run:{done.id}\"'" in clean(result.stderr) and "Traceback" not in result.stderr
    after = store.get_run(done.id)
    assert weights.read_bytes() == b"the final weights"
    assert (after.status, after.duration_s, after.step) == ("finished", 600.0, 12)

    waiting = create_run(store, load_preset(preset), str(preset))
    store.update_queue_settings(paused=True)
    store.enqueue(waiting.id)
    queued = ren("run", "--resume", waiting.id)
    assert queued.returncode == 2 and f"`ren queue cancel {waiting.id}`" in clean(queued.stderr)
    assert store.get_run(waiting.id).status == "queued"


# --- the worker and the runner, with real training runs -------------------------------------------------------------


def start_worker(ren_home: Path, fault: str | None, fault_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "REN_HOME": str(ren_home), "REN_FAULT_DIR": str(fault_dir)}
    env.pop("REN_FAULT", None)
    if fault:
        env["REN_FAULT"] = fault
    log = open(ren_home / LOG_NAME, "ab")
    with log:
        return subprocess.Popen([sys.executable, "-m", "engine.jobs.worker"], env=env, stdout=log, stderr=log,
                                start_new_session=True)


# What the queue's runs end as. "crashed" is only how a running record whose processes are gone reads until the
# worker settles it (requeued or failed), so it is not an end here.
SETTLED = ("finished", "failed", "cancelled")


def ended(record: RunRecord) -> bool:
    return record.status in SETTLED and not is_alive(record.runner_pid or 0, record.runner_started)


def assert_ran_once_to_the_end(store: Store, run_id: str, max_steps: int) -> None:
    record = store.get_run(run_id)
    assert record.status == "finished", (record.status, record.error)
    steps = [p["step"] for p in store.read_metrics(run_id) if "loss" in p]
    assert steps == list(range(1, max_steps + 1))  # every step once: no second trainer logged any
    log = "\n".join(Q.follow_log(store, run_id))
    assert log.count("[ren runner] training processes exited with code 0") == 1


@pytest.mark.slow
def test_a_worker_killed_at_each_launch_step_wedges_nothing(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    """SIGKILL the worker after it marked a run running (before the runner starts), after it started the runner
    (before recording it) and after recording it; then a runner after it claimed its run, and one after its
    trainer ended, before it records the outcome: restarted workers requeue what never began, adopt what did,
    and every run trains once to the end."""
    store = Store(ren_home)
    steps = 3
    preset = tiny_preset(tmp_path / "tiny.toml", data_cache, max_steps=steps, batch_size=4, eval_every=1000)
    runs = [Q.add(store, preset, name=f"r{i}", start_worker=False)[0].id for i in range(3)]
    faults = tmp_path / "faults"
    faults.mkdir()
    worker = start_worker(ren_home, "worker:marked-running=kill", faults)
    assert worker.wait(timeout=300) == -signal.SIGKILL
    stuck = store.get_run(runs[0])
    assert (stuck.status, stuck.runner_pid, stuck.pid) == ("running", None, None)  # the state that wedged

    worker = start_worker(ren_home, "worker:spawned=kill", faults)  # requeues r0, launches it, dies
    assert worker.wait(timeout=300) == -signal.SIGKILL
    # a launch complete but for the worker (it may first wait for r0, trained by the runner it started)
    worker = start_worker(ren_home, "worker:recorded=kill", faults)
    assert worker.wait(timeout=300) == -signal.SIGKILL

    # the next runner to claim a run dies there, and the next one to record an outcome dies just before
    worker = start_worker(ren_home, "runner:claimed=kill,runner:finalizing=kill", faults)
    try:  # a run's record is final a moment before its runner ends (and reaches runner:finalizing)
        until(lambda: all(ended(store.get_run(r)) for r in runs), "every run and its runner to end", 600)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert sorted(os.listdir(faults)) == ["runner_claimed", "runner_finalizing", "worker_marked-running",
                                          "worker_recorded", "worker_spawned"]
    for run_id in runs:
        assert_ran_once_to_the_end(store, run_id, steps)
    log = (ren_home / LOG_NAME).read_text()
    assert "only created, failed, cancelled or crashed runs can be queued" not in log and "Traceback" not in log
    assert "it is back in the queue" in log


@pytest.mark.slow
def test_a_runner_killed_under_a_live_trainer(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    """The trainer once died of BrokenPipeError at its next print, and `ren logs` did not say why; it now trains
    to the end, its log says what happened, and the worker keeps its slot until it is done."""
    store = Store(ren_home)
    steps = 40
    preset = tiny_preset(tmp_path / "tiny.toml", data_cache, max_steps=steps, batch_size=4, eval_every=1000,
                         checkpoint_every=10)
    (record,) = Q.add(store, preset, start_worker=False)
    behind = Q.add(store, preset, name="behind", start_worker=False)[0].id
    worker = start_worker(ren_home, None, tmp_path)
    try:
        until(lambda: len(store.read_metrics(record.id)) >= 3, "the run to train a few steps")
        running = store.get_run(record.id)
        runner = running.runner_pid
        os.kill(runner, signal.SIGKILL)
        overtaken = []

        def trainer_gone() -> bool:  # one slot: held by the orphaned trainer while it lives
            status = store.get_run(behind).status
            if status != "queued" and is_alive(running.pid, running.pid_started):
                overtaken.append(status)
            return not is_alive(running.pid, running.pid_started)

        until(trainer_gone, "the trainer to end", 600)
        assert overtaken == []
        until(lambda: store.get_run(behind).status in SETTLED, "the run behind it", 600)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    record = store.get_run(record.id)
    assert record.status == "finished", record.error
    assert [p["step"] for p in store.read_metrics(record.id) if "loss" in p] == list(range(1, steps + 1))
    log = "\n".join(Q.follow_log(store, record.id))
    assert "[ren trainer] the runner that copied this output is gone (killed)" in log
    assert f"[ren worker] its runner (pid {runner}) was killed; its training processes go on" in log
    assert f"step {steps}/{steps}" in log and "BrokenPipeError" not in log
    assert store.get_run(behind).status == "finished"


def test_ren_run_in_process_gives_back_the_sigint_handler(ren_home: Path) -> None:
    """`ren run` takes over SIGINT and the unraisable hook while it runs; an in-process caller (the bad-input
    tests call the entry point in-process) gets its own back."""
    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    with pytest.raises(RenError, match="give a preset file"):
        commands.run(None, [], resume=None, name=None, gpus=1)
    assert signal.getsignal(signal.SIGINT) is handler and sys.unraisablehook is hook
