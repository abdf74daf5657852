"""`ren submit --slurm` through a real SLURM: a cluster of two nodes started on this machine
(tests/helpers/slurm.py), jobs submitted with `ren submit --slurm --now`, stopped with `scancel` and continued
with `ren submit --slurm --resume`, judged by the store's records and by what squeue says of the jobs.

Skipped where SLURM is not installed or the tests are not root (.ci/run installs it as root).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runs import FINAL_WEIGHTS
from engine.store import Store
from engine.train import latest_checkpoint
from tests.helpers.cli import ren
from tests.helpers.paths import REPO
from tests.helpers.slurm import SlurmCluster, slurm_cluster, unavailable, wait_for
from tests.helpers.training import tiny_preset

WAIT_S = 240.0  # for a tiny run's job: two shared cores, each process imports torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

# Loaded through PYTHONPATH by the trainer of the job that the test cancels (sitecustomize): once step
# $REN_TEST_HOLD_AT_STEP is reported it creates $REN_TEST_HELD and waits there for SIGTERM (what scancel sends),
# so that the cancel lands at a known step after a checkpoint, however fast the run trains.
HOLD = """
import os, signal, time
_at = int(os.environ.get("REN_TEST_HOLD_AT_STEP", "0"))
if _at:
    import engine.progress as _progress
    _make = _progress.make_reporter
    def make_reporter(*args, **kwargs):
        reporter = _make(*args, **kwargs)
        report = reporter.step
        def step(n, metrics):
            report(n, metrics)
            if n != _at:
                return
            termed = []
            previous = signal.getsignal(signal.SIGTERM)
            def on_term(signum, frame):
                termed.append(signum)
                previous(signum, frame)
            signal.signal(signal.SIGTERM, on_term)
            open(os.environ["REN_TEST_HELD"], "w").close()
            deadline = time.monotonic() + 300
            while not termed and time.monotonic() < deadline:
                time.sleep(0.05)
        reporter.step = step
        return reporter
    _progress.make_reporter = make_reporter
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    with slurm_cluster(nodes=2) as running:
        yield running


def _submit(cluster: SlurmCluster, *args: str, env: dict[str, str] | None = None) -> str:
    """``ren submit --slurm --now ARGS`` against ``cluster``: the SLURM job id it printed."""
    result = ren("submit", "--slurm", "--now", *args, env={"SLURM_CONF": str(cluster.conf), **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert found, result.stdout
    return found.group(1)


def _only_run(store: Store) -> str:
    (record,) = store.list_runs()
    return record.id


def _log(store: Store, run_id: str, job: str) -> str:
    return (store.run_dir(run_id) / "logs" / f"slurm-{job}.log").read_text()


def test_submit_now_trains_a_preset_to_the_end(cluster: SlurmCluster, ren_home: Path, data_cache: Path,
                                               tmp_path: Path) -> None:
    preset = tiny_preset(tmp_path / "tiny.toml", data_cache, max_steps=8, checkpoint_every=4)
    job = _submit(cluster, str(preset))
    store = Store(ren_home)
    run_id = _only_run(store)
    assert cluster.wait_job(job, ("COMPLETED",), WAIT_S) == "COMPLETED"
    assert cluster.job(job)["node_count"] == "1"

    record = store.get_run(run_id)
    assert record.status == "finished", (record.error, _log(store, run_id, job))
    assert record.step == 8 and record.final_scores and record.test_scores
    assert [s for s, _ in store.series(run_id, "loss")] == list(range(1, 9))
    assert (store.run_dir(run_id) / FINAL_WEIGHTS).stat().st_size > 0
    assert "step 8/8" in _log(store, run_id, job)


def test_scancel_leaves_a_checkpoint_and_submit_resume_continues_from_it(cluster: SlurmCluster, ren_home: Path,
                                                                           data_cache: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD)
    held = tmp_path / "held"
    preset = tiny_preset(tmp_path / "tiny.toml", data_cache, max_steps=10, checkpoint_every=4)
    hold = {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "REN_TEST_HOLD_AT_STEP": "6",
            "REN_TEST_HELD": str(held)}
    job = _submit(cluster, str(preset), env=hold)  # sbatch passes the environment on to the job
    store = Store(ren_home)
    run_id = _only_run(store)
    run_dir = store.run_dir(run_id)
    wait_for(lambda: held.exists() or cluster.job_state(job) not in ("PENDING", "CONFIGURING", "RUNNING"), WAIT_S,
             lambda: f"job {job} to reach step 6\n{cluster.logs()}")
    assert held.exists(), (cluster.job(job), _log(store, run_id, job))
    assert store.get_run(run_id).status == "running"
    assert latest_checkpoint(run_dir).name == "step_00000004"

    cluster.run("scancel", job)
    wait_for(lambda: store.get_run(run_id).status != "running", WAIT_S, lambda: f"run {run_id} to stop")
    assert cluster.wait_job(job, ("CANCELLED",), WAIT_S) == "CANCELLED"
    record = store.get_run(run_id)
    assert record.status == "cancelled", (record.error, _log(store, run_id, job))
    assert record.step == 6 and "stopped at step 6" in record.error
    assert latest_checkpoint(run_dir).name == "step_00000006"  # saved on the way out, before SIGKILL

    resumed = _submit(cluster, "--resume", run_id)
    assert "--resume" in (run_dir / "submit.sbatch").read_text()
    assert cluster.wait_job(resumed, ("COMPLETED",), WAIT_S) == "COMPLETED"
    record = store.get_run(run_id)
    assert record.status == "finished", (record.error, _log(store, run_id, resumed))
    assert record.step == 10 and store.list_runs() == [record]
    assert [s for s, _ in store.series(run_id, "loss")] == list(range(1, 11))  # every step once
    assert "resumed from step_00000006" in _log(store, run_id, resumed)
    assert cluster.job_state(job) == "CANCELLED"  # the first job stays as scancel left it


def test_two_nodes_train_one_run_together(cluster: SlurmCluster, ren_home: Path, data_cache: Path,
                                          tmp_path: Path) -> None:
    """One process per node, started by srun on each with its node's rank; the two rendezvous at the head
    node's address (gloo, no GPUs) and train as one run."""
    preset = tiny_preset(tmp_path / "tiny.toml", data_cache, max_steps=6, checkpoint_every=3)
    job = _submit(cluster, str(preset), "--nodes", "2")
    store = Store(ren_home)
    run_id = _only_run(store)
    assert cluster.wait_job(job, ("COMPLETED",), WAIT_S) == "COMPLETED"
    assert cluster.job(job) == {"state": "COMPLETED", "nodes": "node[1-2]", "node_count": "2"}
    record = store.get_run(run_id)
    assert record.status == "finished", (record.error, _log(store, run_id, job))
    assert record.device.startswith("2x cpu") and record.step == 6
    assert [s for s, _ in store.series(run_id, "loss")] == list(range(1, 7))
