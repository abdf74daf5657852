"""The run supervisor: logs (rotated, followed) and the final record of a run whose
processes end without writing one. Commands here are small Python scripts, not trainers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.jobs import api as Q
from engine.jobs.runner import describe_exit, log_files
from engine.store import RunRecord, Store


@pytest.fixture
def store(ren_home: Path) -> Store:
    return Store(ren_home)


def running_run(store: Store, batch_size: int = 48) -> RunRecord:
    record = store.create_run(name="sup", stage="finetune", kind="one_tower",
                              config={"train": {"batch_size": batch_size, "micro_batch_size": 12}})
    return store.update_run(record.id, status="running", host=os.uname().nodename, devices=(2,))


def supervise(run_id: str, script: str, *extra: str, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.jobs.runner", run_id, *extra, "--",
           sys.executable, "-c", textwrap.dedent(script)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    if wait:
        proc.wait(timeout=60)
    return proc


def test_output_goes_to_the_log_and_a_silent_exit_fails_the_run(store: Store) -> None:
    record = running_run(store)
    supervise(record.id, "print('hello'); import sys; print('to stderr', file=sys.stderr); sys.exit(3)")
    after = store.get_run(record.id)
    assert after.status == "failed"
    assert after.error == "The training process exited with code 3 before recording a result."
    lines = list(Q.follow_log(store, record.id))
    assert "hello" in lines and "to stderr" in lines
    assert "to stderr" in after.log_tail


def test_sigkill_is_explained(store: Store) -> None:
    record = running_run(store)
    supervise(record.id, "import os, signal; print('working', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    after = store.get_run(record.id)
    assert after.status == "failed" and "SIGKILL" in after.error and "dmesg" in after.error
    assert "working" in after.log_tail


def test_cuda_oom_names_the_batch(store: Store) -> None:
    record = running_run(store, batch_size=48)
    supervise(record.id, "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB');"
                         "sys.exit(1)")
    error = store.get_run(record.id).error
    assert error.startswith("CUDA out of memory on GPU(s) 2 with train.batch_size 48 (micro batch 12 per process)")
    assert "micro_batch_size" in error


def test_a_failure_the_trainer_recorded_is_kept_with_the_log_tail(store: Store) -> None:
    record = running_run(store)
    supervise(record.id, f"""
        from engine.store import Store
        print('step 1 loss=2.0', flush=True)
        Store().mark_ended({record.id!r}, "failed", error="ValueError: bad batch")
        raise SystemExit(1)
    """)
    after = store.get_run(record.id)
    assert after.error == "ValueError: bad batch" and "step 1 loss=2.0" in after.log_tail


def test_a_cancel_without_checkpoint_ends_cancelled(store: Store) -> None:
    record = running_run(store)
    store.update_run(record.id, cancel_requested_at=1.0)
    supervise(record.id, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    after = store.get_run(record.id)
    assert after.status == "cancelled" and "before a checkpoint" in after.error


def test_logs_rotate_and_read_back_in_order(store: Store) -> None:
    record = running_run(store)
    supervise(record.id, "for i in range(4000): print(f'line {i:05d} ' + 'x' * 80)",
              "--log-max-mb", "0.05", "--log-backups", "20")
    files = log_files(store.run_dir(record.id))
    assert len(files) >= 5 and files[-1].name == "run.log" and files[0].name == f"run.log.{len(files) - 1}"
    assert all(f.stat().st_size <= 0.05 * 1024 * 1024 + 200 for f in files)
    lines = [line for line in Q.follow_log(store, record.id) if line.startswith("line ")]
    assert lines == [f"line {i:05d} " + "x" * 80 for i in range(4000)]
    assert list(Q.follow_log(store, record.id, lines=2))[-1].startswith("[ren runner] training processes exited")


def test_follow_reads_across_rotations_until_the_run_ends(store: Store) -> None:
    record = running_run(store)
    proc = supervise(record.id, """
        import time
        for i in range(600):
            print(f'line {i:04d} ' + 'y' * 60, flush=True)
            if i % 100 == 0:
                time.sleep(0.2)
    """, "--log-max-mb", "0.01", "--log-backups", "100", wait=False)
    try:
        while not log_files(store.run_dir(record.id)):
            assert proc.poll() is None
        got = [line for line in Q.follow_log(store, record.id, follow=True, poll_s=0.02) if line.startswith("line ")]
    finally:
        proc.wait(timeout=60)
    assert got == [f"line {i:04d} " + "y" * 60 for i in range(600)]


def test_describe_exit_reads_rank_signals_from_accelerate_output() -> None:
    record = RunRecord(id="r", name="r", stage="pretrain", kind="k", status="running")
    tail = "torch.distributed.elastic.multiprocessing.api: failed (exitcode: -9) local_rank: 1"
    assert "SIGKILL" in describe_exit(1, tail, record)
    assert describe_exit(-15, "", record) == "The training process was killed by SIGTERM."


def until(predicate, what: str, timeout_s: float = 60.0, explain=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; {explain()}"
        time.sleep(0.01)


def process_state(pid: str) -> str:
    """What the kernel says a process is doing (to explain a wait that timed out)."""
    proc = Path("/proc") / pid
    if not proc.exists():
        return f"process {pid} is gone"
    state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")), "")
    return f"process {pid}: {state}, waiting in {(proc / 'wchan').read_text() or '-'}"


def test_a_trainer_outlives_its_killed_runner_and_keeps_logging(store: Store, tmp_path: Path) -> None:
    """SIGKILL the runner under a live trainer: the trainer's output pipe breaks. It used to die of
    BrokenPipeError at its next print, with nothing in `ren logs` saying why; it now goes on writing
    into the run's log, which says what happened."""
    record = running_run(store)
    go, done, died, pid = (tmp_path / name for name in ("go", "done", "died", "pid"))
    proc = supervise(record.id, f"""
        import os, pathlib, time, traceback
        pathlib.Path({str(pid)!r}).write_text(str(os.getpid()))
        try:
            from engine.jobs.runner import install_output_guard
            install_output_guard()  # what engine.train's main does first
            print('before the kill', flush=True)
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
            for i in range(3):
                print(f'after the kill {{i}}', flush=True)
            pathlib.Path({str(done)!r}).write_text('ok')
        except BaseException:  # its stderr may be the broken pipe: say what happened where the test looks
            pathlib.Path({str(died)!r}).write_text(traceback.format_exc())
            raise
    """, wait=False)
    log = store.run_dir(record.id) / "logs" / "run.log"
    try:
        until(lambda: "before the kill" in (log.read_text() if log.exists() else ""), "the trainer's first line")
    finally:
        proc.kill()  # the runner only: its trainer is another process
        proc.wait(timeout=10)
    go.write_text("")
    until(lambda: done.exists() or died.exists(), "the trainer to go on to its end",
          explain=lambda: f"{process_state(pid.read_text())}; the run's log:\n{log.read_text()}")
    assert not died.exists(), died.read_text()
    lines = list(Q.follow_log(store, record.id))
    assert [line for line in lines if line.startswith("after the kill")] == [f"after the kill {i}" for i in range(3)]
    assert any(line.startswith("[ren trainer] the runner that copied this output is gone (killed)") for line in lines)


def test_the_reason_quotes_the_exception_the_trainer_died_of(store: Store) -> None:
    record = running_run(store)
    supervise(record.id, "raise ValueError('the data directory is empty')")
    assert store.get_run(record.id).error == ("The training process exited with code 1 before recording a result: "
                                              "ValueError: the data directory is empty.")
