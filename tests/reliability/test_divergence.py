"""A diverging run (issue 15): its NaN losses reach the store as standard JSON, and the guard
``train.max_nonfinite_steps`` fails it naming the step and the objective, every process at once.

The NaN is injected into a real tiny run (the config refuses the absurd values that would make one
diverge by itself): once into the MLM loss, so the gradients and then the weights turn NaN as in a real
divergence, or into the logged loss only (``loss + nan * loss.detach()`` has finite gradients), which a
degenerate batch gives and the run recovers from.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

import engine.objectives as O
import engine.tasks as T
from engine.store import Store
from engine.train import Diverged, train
from tests.helpers.cli import REN
from tests.helpers.paths import REPO
from tests.helpers.training import start, tiny_finetune, tiny_pretrain


def _strict(path: Path) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _all_json_is_standard(root: Path) -> None:
    files = [p for p in root.rglob("*.json")]
    assert files
    for path in files:
        _strict(path)


def _nan_on_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str, calls: set[int], *,
                  gradients: bool) -> None:
    """``module.name`` returns NaN on these (1-based) calls: with NaN gradients, or finite ones."""
    real, seen = getattr(module, name), [0]

    def patched(*args, **kwargs):
        loss = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] not in calls:
            return loss
        return loss * math.nan if gradients else loss + math.nan * loss.detach()
    monkeypatch.setattr(module, name, patched)


def test_a_diverging_run_fails_naming_the_step_and_the_objective(
        ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One NaN MLM loss on the first micro batch of step 3 (two micro batches a step): the weights turn NaN,
    every later loss is NaN, and the guard (3 steps) fails the run at step 5, naming step 3 and loss_mlm."""
    raw = tiny_pretrain(data_cache)
    raw["train"].update(max_steps=12, micro_batch_size=8, max_nonfinite_steps=3, checkpoint_every=100)
    _nan_on_calls(monkeypatch, O, "mlm_loss", {5}, gradients=True)
    store = Store(ren_home)
    cfg, run_id = start(store, raw)
    with pytest.raises(Diverged) as info:
        train(cfg, store, run_id)
    record = store.get_run(run_id)
    assert record.status == "failed"
    assert str(info.value).startswith("loss_mlm and loss were nan at step 3")
    assert "3 steps in a row" in record.error and "train.max_nonfinite_steps = 3" in record.error
    points = [p for p in store.read_metrics(run_id) if "loss" in p]
    assert [p["step"] for p in points] == [1, 2, 3, 4, 5]  # stopped at step 5
    assert [math.isfinite(p["loss"]) for p in points] == [True, True, False, False, False]
    segment = _strict(store.run_dir(run_id) / "metrics" / "000000.json")["points"]
    assert segment[2]["loss"] is None and segment[2]["nonfinite"]["loss_mlm"] == "nan"
    assert record.loss_trace[:2] == tuple(p["loss"] for p in points[:2]) and record.loss_trace[2:] == (None,) * 3
    _all_json_is_standard(ren_home)


def test_without_the_guard_a_nan_run_finishes_and_the_store_stays_standard_json(
        ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tiny_finetune(data_cache, max_steps=6, log_every=1, eval_every=3, checkpoint_every=3,
                        max_nonfinite_steps=0)
    _nan_on_calls(monkeypatch, T, "task_loss", {2}, gradients=True)
    store = Store(ren_home)
    cfg, run_id = start(store, raw)
    train(cfg, store, run_id)
    record = store.get_run(run_id)
    assert record.status == "finished" and record.loss_trace[0] is not None and record.loss_trace[1:] == (None,) * 5
    assert all(math.isfinite(v) for v in record.best_scores.values())
    _all_json_is_standard(ren_home)


def test_a_step_whose_loss_alone_is_nan_does_not_stop_the_run(
        ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite gradients (a degenerate batch): the weights stay finite, the next steps recover, and two
    non-finite steps that are not consecutive never reach a guard of 2."""
    raw = tiny_finetune(data_cache, max_steps=6, log_every=2, eval_every=100, checkpoint_every=100,
                        max_nonfinite_steps=2)
    _nan_on_calls(monkeypatch, T, "task_loss", {2, 4}, gradients=False)
    store = Store(ren_home)
    cfg, run_id = start(store, raw)
    train(cfg, store, run_id)
    assert store.get_run(run_id).status == "finished"
    assert [(s, math.isnan(v)) for s, v in store.series(run_id, "loss")] == [(2, True), (4, True), (6, False)]


# Loaded by every process of `ren run --gpus 2` (sitecustomize): the process of rank 1 sees a NaN loss with
# finite gradients from its third micro batch on; rank 0 never sees one itself.
RANK_1_NAN = """
import math, os
if os.environ.get("RANK") == "1":
    import engine.tasks as T
    _real, _calls = T.task_loss, [0]
    def task_loss(*args, **kwargs):
        loss = _real(*args, **kwargs)
        _calls[0] += 1
        return loss + math.nan * loss.detach() if _calls[0] >= 3 else loss
    T.task_loss = task_loss
"""


@pytest.mark.slow
def test_two_processes_with_accumulation_stop_together_when_one_diverges(
        tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    """Rank 1 alone sees NaN losses from step 2 (two micro batches a step per process); the guard's history
    is gathered from every process, so rank 0, which records the failure, stops at the same step and no
    process waits forever in a collective the other one left."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_1_NAN)
    preset = tmp_path / "ddp.toml"
    preset.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
        f'[data]\ncache_dir = "{data_cache}"\neval_max_samples = 64\n'
        "[train]\nmax_steps = 20\nbatch_size = 16\nmicro_batch_size = 4\nlog_every = 2\neval_every = 100\n"
        "checkpoint_every = 100\ncpu_threads = 1\nmax_nonfinite_steps = 3\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*REN, "run", str(preset), "--gpus", "2"], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode != 0, result.stdout[-2000:]
    (record,) = Store(ren_home).list_runs()
    assert record.status == "failed" and record.device.startswith("2x cpu"), (record.status, record.error)
    assert record.error.startswith("Diverged: loss was nan at step 2"), record.error
    points = [p for p in Store(ren_home).read_metrics(record.id) if "loss" in p]
    assert [p["step"] for p in points] == [2, 4]  # steps 2, 3, 4 in a row: stopped at the check of step 4
    assert all(math.isnan(p["loss"]) for p in points)  # the mean over the processes
    _all_json_is_standard(ren_home)
