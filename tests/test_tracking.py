"""Experiment trackers: a run's metrics, config and final scores reach TensorBoard, MLflow and W&B, read
back with each one's own reader; a tracker that is missing, unreachable or failing never stops a run."""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.store import Store
from engine.tracking import Guarded, hparams
from engine.train import latest_checkpoint, train
from tests.helpers import training
from tests.helpers.cli import ren, ren_json
from tests.helpers.trackers import free_port, mlflow_server, wandb_config, wandb_history
from tests.helpers.training import start, tiny_finetune


class Messages(training.Messages):
    def warnings(self) -> list[str]:
        return [line for line in self.lines if line.startswith("[ren] tracker")]


def tracked_run(store: Store, cache: Path, tracking: dict, **train_keys: int) -> tuple[str, Messages]:
    raw = tiny_finetune(cache, **{"max_steps": 10, "eval_every": 5, "checkpoint_every": 5, **train_keys})
    cfg, run_id = start(store, {**raw, "tracking": tracking})
    messages = Messages()
    train(cfg, store, run_id, reporter=messages)
    return run_id, messages


def stored_series(store: Store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric the store recorded for the run, as (step, value) by key."""
    series: dict[str, list[tuple[int, float]]] = {}
    for point in store.read_metrics(run_id):
        for key, value in point.items():
            if key not in ("step", "time"):
                series.setdefault(key, []).append((point["step"], value))
    return series


def close(a: list[tuple[int, float]], b: list[tuple[int, float]], rel: float) -> bool:
    same_steps = [s for s, _ in a] == [s for s, _ in b]
    return same_steps and all(math.isclose(x, y, rel_tol=rel) for (_, x), (_, y) in zip(a, b))


def test_hparams_flatten_the_config_to_scalars() -> None:
    flat = hparams({"run": {"name": "x", "tags": ["a", "b"], "seed": 3}, "optim": {"lr": 1e-3},
                    "train": {"compile": False, "micro_batch_size": None}})
    assert flat == {"run.name": "x", "run.tags": '["a", "b"]', "run.seed": 3, "optim.lr": 1e-3,
                    "train.compile": False, "train.micro_batch_size": "null"}


def test_every_stored_metric_and_the_test_score_reach_tensorboard(ren_home: Path, data_cache: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = Store(ren_home)
    run_id, messages = tracked_run(store, data_cache, {"log_with": ["tensorboard"]})
    assert messages.warnings() == []
    logdir = ren_home / "tensorboard" / run_id
    events = EventAccumulator(str(logdir))
    events.Reload()
    stored = stored_series(store, run_id)
    assert {"loss", "lr", "samples_per_s", "eval/vqa_score", "compute/pflops"} <= set(stored)
    assert set(events.Tags()["scalars"]) == set(stored) | {"test/vqa_score"}
    for key, points in stored.items():  # TensorBoard keeps float32
        assert close([(e.step, e.value) for e in events.Scalars(key)], points, rel=1e-6), key
    test = store.get_run(run_id).test_scores["test/vqa_score"]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("test/vqa_score")] == [(10, round(test, 6))]
    config = next(logdir.glob("*/hparams.yml")).read_text()  # the resolved config, as hyper-parameters
    assert "train.max_steps: 10" in config and f"ren.run_id: {run_id}" in config


def test_a_resumed_run_leaves_one_point_per_step_in_tensorboard(ren_home: Path, data_cache: Path) -> None:
    """The resume starts again from the checkpoint at step 5: TensorBoard drops what came after it (as the
    store does), so steps 6-10 are not there twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = Store(ren_home)
    raw = tiny_finetune(data_cache, max_steps=10, eval_every=5, checkpoint_every=5, log_every=1)
    cfg, run_id = start(store, {**raw, "tracking": {"log_with": ["tensorboard"]}})
    train(cfg, store, run_id)
    run_dir = store.run_dir(run_id)
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")  # as if it had died after step 5
    assert latest_checkpoint(run_dir).name == "step_00000005"
    time.sleep(1.1)  # TensorBoard names event files by the second
    train(cfg, store, run_id, resume=True)
    events = EventAccumulator(str(ren_home / "tensorboard" / run_id))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 11))
    assert close([(e.step, e.value) for e in events.Scalars("loss")], store.series(run_id, "loss"), rel=1e-6)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real MLflow server for the module (it takes seconds to start)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def test_a_run_mirrors_into_a_real_mlflow_server(ren_home: Path, data_cache: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    store = Store(ren_home)
    run_id, messages = tracked_run(store, data_cache, {"log_with": ["mlflow"], "project": "live",
                                                       "mlflow": {"tracking_uri": mlflow_uri}})
    client = MlflowClient(mlflow_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
               for key in found.data.metrics}
    assert messages.warnings() == []
    assert found.info.status == "FINISHED" and found.info.run_name == "tiny-ft"
    tags = found.data.tags
    assert tags["ren.run_id"] == run_id and tags["ren.host"] == socket.gethostname()
    assert tags["ren.store"] == str(store.run_dir(run_id).resolve())
    assert found.data.params["train.max_steps"] == "10" and found.data.params["model.kind"] == "one_tower"
    stored = stored_series(store, run_id)
    assert set(history) == set(stored) | {"test/vqa_score"}
    for key, points in stored.items():
        assert close(history[key], points, rel=1e-12), key
    assert json.loads((store.run_dir(run_id) / "trackers.json").read_text()) == {"mlflow": found.info.run_id}


class _StopsAt(Messages):
    """A reporter through which the training loop meets ``error`` at step ``at``."""

    def __init__(self, at: int, error: BaseException) -> None:
        super().__init__()
        self.at, self.error = at, error

    def step(self, step: int, metrics: dict) -> None:
        if step == self.at:
            raise self.error


@pytest.mark.parametrize(("error", "status", "mlflow_status"), [
    (RuntimeError("a bug at step 3"), "failed", "FAILED"), (KeyboardInterrupt(), "cancelled", "KILLED")])
def test_mlflow_hears_how_a_run_ended(ren_home: Path, data_cache: Path, mlflow_uri: str, error: BaseException,
                                      status: str, mlflow_status: str) -> None:
    """A failed run ends its MLflow run FAILED, a cancelled one KILLED, with the points logged until then."""
    from mlflow.tracking import MlflowClient

    store = Store(ren_home)
    experiment = f"ends-{status}"
    raw = tiny_finetune(data_cache, max_steps=10, eval_every=5, checkpoint_every=5, log_every=1)
    cfg, run_id = start(store, {**raw, "tracking": {"log_with": ["mlflow"], "project": experiment,
                                                    "mlflow": {"tracking_uri": mlflow_uri}}})
    reporter = _StopsAt(3, error)
    if status == "failed":
        with pytest.raises(RuntimeError, match="a bug at step 3"):
            train(cfg, store, run_id, reporter=reporter)
    else:
        train(cfg, store, run_id, reporter=reporter)
    assert store.get_run(run_id).status == status
    client = MlflowClient(mlflow_uri)
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert found.info.status == mlflow_status and found.data.tags["ren.run_id"] == run_id
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [1, 2, 3]


def test_a_run_goes_on_when_its_trackers_are_missing_or_unreachable(ren_home: Path, data_cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard not installed, MLflow's server down: one warning each, naming the fix, and the run
    finishes with every metric in the store, without waiting on the server."""
    import torch.utils

    monkeypatch.delattr(torch.utils, "tensorboard", raising=False)  # an earlier import left it there
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    store = Store(ren_home)
    down = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    run_id, messages = tracked_run(store, data_cache, {"log_with": ["tensorboard", "mlflow"],
                                                       "mlflow": {"tracking_uri": down}})
    took = time.monotonic() - began
    tensorboard, mlflow = messages.warnings()
    assert "tracker tensorboard is off" in tensorboard and "pip install 'ren[tensorboard]'" in tensorboard
    assert "tracker mlflow is off" in mlflow and f"cannot connect to {down}" in mlflow
    record = store.get_run(run_id)
    assert record.status == "finished" and [s for s, _ in store.series(run_id, "loss")] == [5, 10]
    assert took < 60  # MLflow's own retries would take minutes


def test_a_tracker_that_fails_mid_run_is_dropped_after_one_warning() -> None:
    class Flaky:
        name, tracker = "flaky", None

        def __init__(self) -> None:
            self.logged: list[int] = []

        def start(self) -> None: ...

        def log(self, values: dict, step: int | None = None) -> None:
            if step == 2:
                raise OSError("disk full")
            self.logged.append(step)

    warned: list[str] = []
    guarded = Guarded(Flaky(), warned.append)  # type: ignore[arg-type]
    guarded.start()
    for step in range(1, 5):
        guarded.log({"loss": 1.0}, step=step)
    assert guarded.inner.logged == [1] and guarded.off
    assert len(warned) == 1 and "its log failed (OSError: disk full)" in warned[0]


def test_a_run_writes_a_wandb_offline_run(ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = Store(ren_home)
    run_id, messages = tracked_run(store, data_cache, {"log_with": ["wandb"], "wandb": {"mode": "offline"}})
    assert messages.warnings() == []
    (path,) = store.run_dir(run_id).glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(path)
    stored = stored_series(store, run_id)
    for key, points in stored.items():
        assert close([(row["_step"], row[key]) for row in rows if key in row], points, rel=1e-12), key
    config = wandb_config(path)
    assert config["ren.run_id"] == run_id and config["train.max_steps"] == 10


def finished_run(root: Path, cache: Path, host: str, name: str) -> tuple[Store, str]:
    """A finished run in the store at ``root`` as its box recorded it (metric points, test scores), made
    without training: what `ren sync` reads."""
    store = Store(root)
    raw = tiny_finetune(cache)
    cfg, run_id = start(store, {**raw, "run": {**raw["run"], "name": name}})
    with store.metrics_writer(run_id) as writer:
        for step in (5, 10, 15, 20):
            writer.log(step, loss=4.0 / step, lr=1e-3)
        writer.log(20, **{"eval/vqa_score": 0.5 if host == "box-a" else 0.7})
    store.update_run(run_id, host=host, step=20, test_scores={"test/vqa_score": 0.6})
    store.mark_ended(run_id, "finished")
    return store, run_id


def test_two_boxes_mirror_into_one_mlflow_server_and_runs_lists_both(tmp_path: Path, data_cache: Path,
                                                                     mlflow_uri: str) -> None:
    """Two stores stand in for two GPU boxes: `ren sync` mirrors a run of each into one MLflow server, and
    `ren runs --mlflow` on either lists both, with their hosts; a second sync replays nothing."""
    from mlflow.tracking import MlflowClient

    boxes = {host: finished_run(tmp_path / host, data_cache, host, f"on-{host}") for host in ("box-a", "box-b")}
    for store, run_id in boxes.values():
        synced = ren("sync", run_id, "--to", "mlflow", "--uri", mlflow_uri, env={"REN_HOME": str(store.root)})
        assert synced.returncode == 0 and f"{run_id}: replayed into mlflow" in synced.stdout, synced.stderr
    store_a, run_a = boxes["box-a"]
    again = ren("sync", run_a, "--to", "mlflow", "--uri", mlflow_uri, env={"REN_HOME": str(store_a.root)})
    assert again.returncode == 0 and "already in MLflow, nothing replayed" in again.stdout

    listed = ren("runs", "--mlflow", mlflow_uri, env={"REN_HOME": str(tmp_path / "elsewhere"), "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:] if line.strip()}
    for host, (store, run_id) in boxes.items():
        assert rows[run_id][1:3] == [host, "finished"]
        assert str(store.run_dir(run_id).resolve()) in listed.stdout
    assert "vqa_score=0.5000" in " ".join(rows[run_a]) and "vqa_score=0.7000" in " ".join(rows[boxes["box-b"][1]])
    doc = ren_json("runs", "--mlflow", mlflow_uri, "--json", env={"REN_HOME": str(tmp_path / "elsewhere")})
    assert doc["schema"] == "ren.lab-runs/1" and doc["uri"] == mlflow_uri
    listed = {run["run_id"]: run for run in doc["runs"]}
    for host, (store, run_id) in boxes.items():
        run = listed[run_id]
        assert (run["host"], run["status"], run["store"]) == (host, "FINISHED", str(store.run_dir(run_id).resolve()))
        assert run["stage"] == "finetune" and isinstance(run["start_time"], float)
    assert listed[run_a]["metrics"]["eval/vqa_score"] == 0.5 and listed[run_a]["metrics"]["test/vqa_score"] == 0.6

    client = MlflowClient(mlflow_uri)
    (mirrored,) = client.search_runs([client.get_experiment_by_name("ren").experiment_id],
                                     f"tags.`ren.run_id` = '{run_a}'")
    assert [(m.step, m.value) for m in client.get_metric_history(mirrored.info.run_id, "loss")] == [
        (5, 0.8), (10, 0.4), (15, 4.0 / 15), (20, 0.2)]
    assert mirrored.data.metrics["test/vqa_score"] == 0.6 and mirrored.data.params["train.max_steps"] == "20"


def test_sync_to_tensorboard_replaces_what_it_wrote_before(tmp_path: Path, data_cache: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, run_id = finished_run(tmp_path / "box", data_cache, "box-a", "tb")
    logdir = tmp_path / "tb"
    for _ in range(2):
        synced = ren("sync", run_id[:15], "--to", "tensorboard", "--logdir", str(logdir),
                     env={"REN_HOME": str(store.root)})
        assert synced.returncode == 0, synced.stderr
        time.sleep(1.1)  # TensorBoard names event files by the second
    events = EventAccumulator(str(logdir / run_id))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [
        (5, 0.8), (10, 0.4), (15, round(4.0 / 15, 6)), (20, 0.2)]


def test_runs_from_an_unreachable_mlflow_server_is_a_clear_error(ren_home: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    listed = ren("runs", "--mlflow", down)
    assert listed.returncode == 2 and f"cannot connect to {down}" in listed.stderr and "Traceback" not in listed.stderr


def test_runs_from_an_unreachable_mlflow_server_with_json_prints_no_document(ren_home: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    listed = ren("runs", "--mlflow", down, "--json")
    assert listed.returncode == 2 and listed.stdout == "" and f"cannot connect to {down}" in listed.stderr


class _BlockedTrackers:
    """An accelerator whose trackers take a point only once ``release`` is set."""

    def __init__(self) -> None:
        import threading

        self.release, self.points, self.finished = threading.Event(), [], 0
        self.trackers = [self]

    def log(self, values: dict, step: int) -> None:
        self.release.wait()
        self.points.append((step, values))

    def finish(self) -> None:
        self.finished += 1


class _Points:
    def __init__(self) -> None:
        self.points, self.closed = [], False

    def log(self, step: int, **values: float) -> None:
        self.points.append((step, values))

    def close(self) -> None:
        self.closed = True


def test_a_slow_tracker_never_holds_the_training_thread() -> None:
    """Points go to the store at once and to the trackers from a thread of their own: with every tracker
    blocked, 200 log calls all return and the store has them; once the trackers move, they get every point in
    order before they are finished."""
    from engine.tracking import TrackedWriter

    store, accelerator = _Points(), _BlockedTrackers()
    tracked = TrackedWriter(store, accelerator)
    for step in range(1, 201):
        tracked.log(step, loss=1.0 / step)
    tracked.summary(200, {"test/vqa_score": 0.5})
    assert len(store.points) == 200 and accelerator.points == []
    accelerator.release.set()
    tracked.close()
    assert store.closed and accelerator.finished == 1
    assert accelerator.points == [*store.points, (200, {"test/vqa_score": 0.5})]


def test_a_tracker_stuck_at_the_end_is_given_up_with_a_warning() -> None:
    from engine.tracking import TrackedWriter

    store, accelerator, warnings = _Points(), _BlockedTrackers(), []
    tracked = TrackedWriter(store, accelerator, close_timeout_s=0.2, warn=warnings.append)
    tracked.log(1, loss=2.0)
    tracked.close()  # returns although the tracker never takes its point
    assert store.closed and accelerator.finished == 0
    assert len(warnings) == 1 and "gave up waiting after 0.2 s" in warnings[0] and "ren sync RUN" in warnings[0]
    accelerator.release.set()
