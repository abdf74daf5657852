"""End-to-end training on easy-VQA with tiny models: records, objectives,
init_from, and exact resume after SIGKILL."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import config_from_dict
from engine.store import Store
from engine.train import (
    FINAL_WEIGHTS,
    EpochSampler,
    latest_checkpoint,
    lr_factor,
    train,
)
from tests.helpers.paths import REPO
from tests.helpers.training import start, tiny_finetune, tiny_pretrain


def test_finetune_records_metrics_scores_checkpoints_and_weights(ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache))
    final = train(cfg, store, run_id)

    record = store.get_run(run_id)
    assert record.status == "finished" and record.step == 20
    assert 0.0 < final["vqa_score"] <= 1.0
    assert final["eval_samples"] == 3892  # the final evaluation uses the whole validation split
    assert record.final_scores["vqa_score"] == final["vqa_score"]
    assert "eval/vqa_score" in record.best_scores and record.eval_split == "val"
    assert list(record.test_scores) == ["test/vqa_score"] and 0.0 < record.test_scores["test/vqa_score"] <= 1.0
    assert record.params["trainable"] == record.params["total"] > 0
    assert record.device.startswith("cpu")

    losses = store.series(run_id, "loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20]
    assert all(v == v and v > 0 for _, v in losses)
    evals = store.series(run_id, "eval/vqa_score")
    assert [s for s, _ in evals] == [10, 20]
    assert all(p["lr"] > 0 for p in store.read_metrics(run_id) if "lr" in p)

    run_dir = store.run_dir(run_id)
    assert (run_dir / FINAL_WEIGHTS).exists()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000010", "step_00000020"]
    assert latest_checkpoint(run_dir).name == "step_00000020"


def test_easy_vqa_selects_on_val_and_scores_test_once_after_training(ren_home: Path, data_cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.train as engine_train

    bundles, calls = [], []
    build_data, evaluate = engine_train.build_data, engine_train.evaluate

    def keep_bundle(*args, **kwargs):
        bundles.append(build_data(*args, **kwargs))
        return bundles[-1]

    def note_split(model, loader, *args, **kwargs):
        calls.append({id(bundles[0].eval): "val", id(bundles[0].test): "test"}[id(loader.dataset)])
        return evaluate(model, loader, *args, **kwargs)

    monkeypatch.setattr(engine_train, "build_data", keep_bundle)
    monkeypatch.setattr(engine_train, "evaluate", note_split)
    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache, max_steps=10, eval_every=5, checkpoint_every=5))
    train(cfg, store, run_id)
    assert calls == ["val", "val", "test"]  # step 5, final, then test once
    assert len(bundles[0].eval) == 3892 and len(bundles[0].test) == 9673
    record = store.get_run(run_id)
    assert record.eval_split == "val" and set(record.test_scores) == {"test/vqa_score"}
    assert store.series(run_id, "eval/vqa_score")[-1][1] == record.final_scores["vqa_score"]  # val, not test


def test_pretraining_logs_each_objective_and_their_weighted_sum(ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    cfg, run_id = start(store, tiny_pretrain(data_cache))
    train(cfg, store, run_id)
    points = [p for p in store.read_metrics(run_id) if "loss" in p]
    assert [p["step"] for p in points] == [1, 2, 3, 4, 5, 6]
    for p in points:
        assert p["loss_mlm"] > 0 and p["loss_itm"] > 0 and p["loss_itc"] > 0
        assert p["loss"] == pytest.approx(p["loss_mlm"] + 0.5 * p["loss_itm"] + 0.25 * p["loss_itc"], rel=1e-5)
    assert store.get_run(run_id).status == "finished"


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "retried-before-a-checkpoint"])
def test_finetune_starts_from_a_pretraining_run(ren_home: Path, data_cache: Path, resume: bool) -> None:
    """A retried run (resume) that never reached a checkpoint starts from init_from, not from random weights."""
    store = Store(ren_home)
    pre_cfg, pre_id = start(store, tiny_pretrain(data_cache))
    train(pre_cfg, store, pre_id)
    raw = tiny_pretrain(data_cache)
    raw.pop("objectives")
    raw["task"] = {"name": "vqa"}
    raw["train"] = {**raw["train"], "init_from": f"run:{pre_id}", "max_steps": 1}
    raw["optim"] = {"lr": 1e-12, "warmup_ratio": 0.0}  # (almost) no update: weights stay the pretrained ones
    cfg, run_id = start(store, raw)
    train(cfg, store, run_id, resume=resume)
    pre = load_file(str(store.run_dir(pre_id) / FINAL_WEIGHTS))
    fine = load_file(str(store.run_dir(run_id) / FINAL_WEIGHTS))
    shared = [k for k in pre if k.startswith("encoder.")]
    assert shared and all(torch.allclose(pre[k], fine[k], atol=1e-6) for k in shared)
    assert not any(k.startswith("heads.mlm") for k in fine) and any(k.startswith("heads.task") for k in fine)


def test_sigkill_then_resume_matches_an_uninterrupted_run(ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    raw = tiny_finetune(data_cache, max_steps=60, checkpoint_every=10, eval_every=1000)

    cfg, ref_id = start(store, copy.deepcopy(raw))
    train(cfg, store, ref_id)

    cfg, run_id = start(store, copy.deepcopy(raw))
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", run_id], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    run_dir = store.run_dir(run_id)
    deadline = time.monotonic() + 120
    while latest_checkpoint(run_dir) is None:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # the store is valid after the kill and tells the run died
    killed = store.get_run(run_id)
    assert killed.status == "crashed"
    assert store.read_metrics(run_id) is not None
    resumed_from = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert 10 <= resumed_from < 60

    train(config_from_dict(killed.config), store, run_id, resume=True)
    assert store.get_run(run_id).status == "finished"
    steps = [s for s, _ in store.series(run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no duplicated steps after the rewind
    ref = load_file(str(store.run_dir(ref_id) / FINAL_WEIGHTS))
    got = load_file(str(run_dir / FINAL_WEIGHTS))
    assert all(torch.allclose(ref[k], got[k], atol=1e-5) for k in ref)
    ref_loss = dict(store.series(ref_id, "loss"))
    assert all(ref_loss[s] == pytest.approx(v, rel=1e-4) for s, v in store.series(run_id, "loss") if s > resumed_from)


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochSampler(100, seed=3), EpochSampler(100, seed=3)
    a.use_epoch(2)
    b.use_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(100))
    b.use_epoch(3)
    assert list(a) != list(b)


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "cosine") < 0.01
    assert lr_factor(50, 100, 0, "constant") == 1.0


@pytest.mark.parametrize(
    ("kind", "objectives"),
    [
        ("two_tower", {"mlm": {}, "itc": {}}),
        ("two_tower", {"itm": {}, "itc": {}}),
        ("two_tower", {"mlm": {}, "itm": {}}),
        ("two_tower", {"itm": {"negatives": "hard"}, "itc": {}}),
        ("two_tower", {"mlm": {}, "itm": {"negatives": "hard"}, "itc": {}}),
        ("one_tower", {"mlm": {}}),
        ("dual_encoder", {"itc": {}}),
    ],
)
def test_every_objective_combination_trains(kind: str, objectives: dict, data_cache: Path) -> None:
    from engine.data.pipeline import build_data
    from engine.models import build_model
    from engine.train import _pretrain_step

    raw = tiny_pretrain(data_cache)
    raw["objectives"] = objectives
    if kind == "one_tower":
        raw["model"] = tiny_finetune(data_cache)["model"]
    elif kind == "dual_encoder":
        raw["model"] = {"kind": "dual_encoder", "text": raw["model"]["text"], "vision": raw["model"]["vision"],
                        "projection_dim": 16}
    cfg = config_from_dict(raw)
    data = build_data(cfg, cache_dir=data_cache)
    model = build_model(cfg, vocab_size=data.vocab_size)
    batch = data.train.__getitems__(list(range(0, 48, 3)))
    loss, parts = _pretrain_step(model, batch, cfg, data, torch.Generator().manual_seed(0))
    loss.backward()
    losses = {"loss", *(f"loss_{name}" for name in objectives)}
    assert set(parts) == losses | ({"itm_unpaired"} if "itm" in objectives else set())
    assert all(parts[name] > 0 for name in losses)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_busy_index_skips_a_progress_update_but_never_fails_the_run(
        ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many runs share one index lock; a periodic progress update that times out waiting for it is retried at
    the next interval instead of failing the run (measured by bench/store_load.py: waits of 23 s with 100 runs)."""
    import engine.train as train_module
    from engine.errors import StoreBusy

    monkeypatch.setattr(train_module, "INDEX_UPDATE_S", 0.0)  # every logged step updates the index
    store = Store(ren_home)
    cfg, run_id = start(store, tiny_pretrain(data_cache))
    real_update = Store.update_run
    refused: list[int] = []

    def busy_while_training(self: Store, rid: str, **fields):
        if "compute" in fields and "status" not in fields and fields.get("step", 0) < cfg.train.max_steps:
            refused.append(fields["step"])
            raise StoreBusy("Waited 30 s for index.lock; another ren process is holding it.")
        return real_update(self, rid, **fields)

    monkeypatch.setattr(Store, "update_run", busy_while_training)
    train(cfg, store, run_id)
    record = store.get_run(run_id)
    assert refused == [1, 2, 3, 4, 5]
    assert record.status == "finished" and record.step == cfg.train.max_steps
    assert [s for s, _ in store.series(run_id, "loss")] == [1, 2, 3, 4, 5, 6]


def test_each_micro_batch_of_a_step_draws_its_own_masks(ren_home: Path, data_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With gradient accumulation the micro-batches of one optimizer step get different seeds
    (they once shared one, so masks and negatives repeated within a step), each the pure
    function micro_batch_seed(seed, step, micro-batch index within the step, process)."""
    import engine.train as train_module
    from engine import objectives as O

    probe_ids = torch.arange(1, 41).reshape(2, 20) + 10
    probe_words = torch.arange(20).repeat(2, 1)
    seen: list[tuple[int, torch.Tensor]] = []
    real_step = train_module._pretrain_step

    def recording_step(model, batch, cfg, data, gen):  # noqa: ANN001, ANN202
        probe = torch.Generator()
        probe.set_state(gen.get_state())
        _, labels = O.mask_tokens(probe_ids, probe_words, mask_prob=0.15, whole_word=True, mask_id=3,
                                  vocab_size=100, num_special=5, generator=probe)
        seen.append((gen.initial_seed(), labels))
        return real_step(model, batch, cfg, data, gen)

    monkeypatch.setattr(train_module, "_pretrain_step", recording_step)
    store = Store(ren_home)
    raw = tiny_pretrain(data_cache)
    raw["train"].update(max_steps=2, batch_size=16, micro_batch_size=8, checkpoint_every=10)
    cfg, run_id = start(store, raw)
    train(cfg, store, run_id)
    seeds = [seed for seed, _ in seen]
    assert seeds == [O.micro_batch_seed(0, step, micro, 0) for step in (0, 1) for micro in (0, 1)]
    assert len(set(seeds)) == 4
    for step in (0, 2):  # the two micro-batches of each step mask the same probe differently
        assert not torch.equal(seen[step][1], seen[step + 1][1])
    assert O.micro_batch_seed(3, 1, 0, 1) == O.micro_batch_seed(3, 1, 0, 1)  # pure: same coordinates, same seed
    grid = {O.micro_batch_seed(s, t, m, p) for s in range(3) for t in range(50) for m in range(8) for p in range(8)}
    assert len(grid) == 3 * 50 * 8 * 8  # no two coordinates collide
