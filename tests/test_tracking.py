"""Experiment trackers: a run's metrics, config and final scores reach TensorBoard, MLflow and W&B, read
back with each one's own reader; a tracker that is missing, unreachable or failing never stops a run."""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from pathlib import Path

import pytest

from engine.store import Store
from engine.tracking import Guarded, hparams
from engine.train import latest_checkpoint, train
from tests.helpers.trackers import free_port, mlflow_server, wandb_config, wandb_history
from tests.helpers.training import start, tiny_finetune


class Messages:
    """A reporter that keeps its messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None:
        self.lines.append(text)
    def stop(self) -> None: ...

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


def test_a_run_mirrors_into_a_real_mlflow_server(ren_home: Path, data_cache: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = Store(ren_home)
    with mlflow_server(tmp_path) as uri:
        run_id, messages = tracked_run(store, data_cache, {"log_with": ["mlflow"], "project": "lab",
                                                           "mlflow": {"tracking_uri": uri}})
        client = MlflowClient(uri)
        (found,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
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
