"""`ren queue`, `ren logs`, `ren worker` and `ren submit` as a user types them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from engine.jobs.worker import worker_info
from engine.store import Store
from tests.helpers.cli import HEAVY, modules_after, ren
from tests.helpers.paths import REPO

FIXTURE = REPO / "tests" / "fixtures" / "one_tower.toml"


def test_queue_add_reports_a_run_the_worker_started_before_it_could_say_where_it_waits(
        tmp_path: Path, ren_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The worker that `queue add` starts can take the run before the command lists the queue: the command
    said where the run waits and died of ValueError (seen in a CI run)."""
    from engine.cli import queue as cli_queue
    from engine.jobs import api as Q

    add = Q.add

    def add_then_start(store: Store, *args, **kwargs):
        queued = add(store, *args, **{**kwargs, "start_worker": False})
        store.transition(queued[-1].id, ("queued",), status="running")  # what the worker does first
        return queued

    monkeypatch.setattr(cli_queue.Q, "add", add_then_start)
    monkeypatch.setattr(cli_queue, "worker_info", lambda store: None)
    cli_queue.add(FIXTURE, [], gpus=1, after=[], name="fast")
    assert re.search(r"queued \S+-fast-\S+ and running already \(gpus 1\)", capsys.readouterr().out)


@pytest.mark.slow
def test_queue_add_starts_a_worker_and_logs_follow_the_run(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    preset = tmp_path / "tiny.toml"
    preset.write_text(f'extends = "{FIXTURE}"\n[data]\ncache_dir = "{data_cache}"\neval_max_samples = 16\n'
                      "[train]\nmax_steps = 4\nbatch_size = 4\nlog_every = 2\ncpu_threads = 1\n")
    try:
        added = ren("queue", "add", str(preset), "--name", "cli-run")
        assert added.returncode == 0, added.stderr
        run_id = re.search(r"queued (\S+) (at position 1|and running already) ", added.stdout).group(1)
        listed = ren("queue", "ls")
        assert run_id in listed.stdout and "worker pid" in listed.stdout
        followed = ren("logs", run_id[:15], "-f", timeout=180)
        assert followed.returncode == 0, followed.stderr
        assert "step 4/4" in followed.stdout and "exited with code 0" in followed.stdout
        assert Store(ren_home).get_run(run_id).status == "finished"
        assert "nothing queued or running" in ren("queue", "ls").stdout
    finally:
        stopped = ren("worker", "stop")
    assert stopped.returncode == 0 and "stopped worker" in stopped.stdout
    assert worker_info(Store(ren_home)) is None


def test_queue_commands_manage_order_and_settings(ren_home: Path) -> None:
    ren("queue", "pause")  # nothing starts: the test only edits the queue
    ids = []
    for name in ("first", "second"):
        out = ren("queue", "add", str(FIXTURE), "--name", name)
        assert out.returncode == 0, out.stderr
        ids.append(re.search(r"queued (\S+)", out.stdout).group(1))
    moved = ren("queue", "mv", ids[1], "1")
    assert moved.stdout.split().index(ids[1]) < moved.stdout.split().index(ids[0])
    listed = ren("queue", "ls")
    assert "paused" in listed.stdout and "the queue is paused" in listed.stdout
    assert "cpu_slots = 3" in ren("queue", "config", "cpu_slots=3").stdout
    cancelled = ren("queue", "cancel", ids[0])
    assert "cancelled" in cancelled.stdout
    assert Store(ren_home).get_run(ids[0]).status == "cancelled"
    assert ren("queue", "retry", ids[0]).returncode == 0
    assert [r.id for r in Store(ren_home).queued_runs()] == [ids[1], ids[0]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("queue", "add", "nope.toml"), "nope.toml"),
        (("queue", "mv", "no-such-run", "1"), "No run with id 'no-such-run'"),
        (("queue", "config", "slots=2"), "expected KEY=VALUE with KEY one of"),
        (("queue", "config", "cpu_slots=zero"), "cannot use 'zero'"),
        (("queue", "add", str(FIXTURE), "--gpus", "0"), "at least one GPU"),
        (("logs", "no-such-run"), "No run with id"),
        (("worker", "restart"), "expected start, stop or status"),
        (("submit", str(FIXTURE)), "--slurm"),
    ],
)
def test_bad_queue_input_exits_2(args: tuple[str, ...], message: str) -> None:
    result = ren(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_submit_writes_an_sbatch_script(tmp_path: Path, ren_home: Path) -> None:
    result = ren("submit", "--slurm", str(FIXTURE), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                 "--time", "12:00:00", "--sbatch=--mem=64G", "--set", 'distributed.strategy="fsdp"')
    assert result.returncode == 0, result.stderr
    (record,) = Store(ren_home).list_runs()
    script = (Store(ren_home).run_dir(record.id) / "submit.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=gpu" in script and "#SBATCH --mem=64G" in script
    assert "--num_processes 8" in script and "--use_fsdp" in script and record.id in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "sbatch" in result.stdout
    again = ren("submit", "--slurm", "--resume", record.id, "--nodes", "2", "--gpus-per-node", "4")
    assert again.returncode == 0, again.stderr
    resumed = (Store(ren_home).run_dir(record.id) / "submit.sbatch").read_text()
    assert f"engine.train {record.id} --resume" in " ".join(resumed.split()) and len(Store(ren_home).list_runs()) == 1


def test_queue_and_worker_modules_import_no_torch() -> None:
    loaded = modules_after("import engine.jobs.api, engine.jobs.worker, engine.jobs.runner, engine.cli.queue")
    assert not loaded & set(HEAVY)


# --- issue 15 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("cancel_grace_s=nan", "cancel_grace_s=nan is refused: it must be a finite number from 0.1 to 604800"),
        ("cancel_grace_s=inf", "cancel_grace_s=inf is refused"),
        ("cancel_grace_s=-1", "cancel_grace_s=-1 is refused"),
        ("poll_s=0.0001", "poll_s=0.0001 is refused: it must be a finite number from 0.05 to 3600"),
        ("log_max_mb=nan", "log_max_mb=nan is refused"),
        ("cpu_slots=100000", "cpu_slots=100000 is refused: it must be a finite number from 1 to 1024"),
        ("foreign_memory_mb=-5", "foreign_memory_mb=-5 is refused"),
        ("allow_gpus=0,-1", "allow_gpus=0,-1 is refused: it must list GPU indices"),
    ],
)
def test_queue_config_refuses_unusable_values(ren_home: Path, assignment: str, named: str) -> None:
    before = Store(ren_home).queue_settings()
    result = ren("queue", "config", assignment)
    assert result.returncode == 2, result.stdout + result.stderr
    assert named in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert Store(ren_home).queue_settings() == before


def test_the_first_queue_add_names_the_worker_it_started(ren_home: Path) -> None:
    assert ren("queue", "pause").returncode == 0  # nothing trains: the test is about the message
    added = ren("queue", "add", str(FIXTURE))
    assert added.returncode == 0, added.stderr
    info = worker_info(Store(ren_home))
    assert info is not None and f"worker pid {info.pid}" in added.stdout
    assert "no worker serves" not in added.stdout


def test_queue_add_refuses_more_processes_than_cpu_slots(ren_home: Path) -> None:
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    ren("queue", "pause")
    refused = ren("queue", "add", str(FIXTURE), "--gpus", "2", env=cpu_only)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert "--gpus 2: this machine has no GPU" in message and "it has 1 (queue setting cpu_slots)" in message
    assert "`ren queue config cpu_slots=2`" in message and "Traceback" not in refused.stderr
    assert Store(ren_home).list_runs() == []
    ren("queue", "config", "cpu_slots=2")
    accepted = ren("queue", "add", str(FIXTURE), "--gpus", "2", env=cpu_only)
    assert accepted.returncode == 0, accepted.stderr
    assert [r.gpus for r in Store(ren_home).queued_runs()] == [2]


def test_retry_names_the_step_it_really_resumes_from(ren_home: Path) -> None:
    store = Store(ren_home)
    ren("queue", "pause")
    ahead, fresh = (store.create_run(name=n, stage="finetune", kind="one_tower", config={}) for n in ("a", "b"))
    checkpoints = store.run_dir(ahead.id) / "checkpoints"
    for step in (5, 10):
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
        (checkpoints / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (checkpoints / "latest").write_text("step_00000010")
    store.update_run(ahead.id, status="failed", step=15)  # the record's step ran past the checkpoint
    store.update_run(fresh.id, status="crashed", step=5)
    first = ren("queue", "retry", ahead.id)
    assert first.returncode == 0, first.stderr
    assert "it resumes from step 10, its last checkpoint" in " ".join(first.stdout.split())
    second = ren("queue", "retry", fresh.id)
    assert "it saved no checkpoint, so it starts over from step 0" in " ".join(second.stdout.split())
