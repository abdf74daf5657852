"""Compute accounting: FLOP counts against hand counts, freezing, device peaks, the step
timer, and what a real run stores (Contract 1) and `ren show` prints."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path

import pytest
import torch

from engine import compute as C
from engine.config import config_from_dict
from engine.freeze import apply_freeze
from engine.store import Store
from engine.train import train
from tests.helpers.cli import ren
from tests.helpers.models import ALL_KINDS, B, L, inputs, make, mlm_positions, one_tower, two_tower
from tests.helpers.paths import REPO
from tests.helpers.training import start, tiny_finetune

CONTRACT_KEYS = {"flops_per_sample", "device", "dtype", "processes", "peak_flops", "peak_source", "samples_per_s",
                 "tokens_per_s", "achieved_flops", "utilisation", "step_split_s", "peak_memory_mb", "pflops",
                 "device_hours", "train_seconds"}


def measure(model: torch.nn.Module, forward) -> C.FlopMeter:
    """One training step of ``model`` under the meter, as the trainer counts its first step."""
    model.train()
    ids, mask, _ = inputs()
    meter = C.FlopMeter()
    batch = {"input_ids": ids, "attention_mask": mask}
    with meter.count("forward", batch):
        loss = forward(model)
    with meter.count("backward", batch):
        loss.backward()
    return meter


def task_loss(model: torch.nn.Module, image_size: int = 32) -> torch.Tensor:
    ids, mask, pix = inputs(image_size=image_size)
    return model(ids, mask, pix, task=True).logits["task"].float().pow(2).mean()


# --- hand counts ---------------------------------------------------------------------------
# FLOPs as flop_counter counts them: 2*m*n*k per (m x k) @ (k x n) matmul; nothing for
# embeddings, norms, softmax or activations.


def encoder_layer(n: int, d: int, mlp: int) -> tuple[int, int]:
    """(matmul FLOPs of the linear layers, FLOPs of attention) of one pre-LN transformer layer
    (BERT or ViT) on ``n`` tokens of width ``d`` with an MLP of width ``mlp``, per sample."""
    linear = (3 * 2 * n * d * d  # Q, K, V projections
              + 2 * n * d * d  # attention output projection
              + 2 * n * d * mlp + 2 * n * mlp * d)  # MLP
    attention = 2 * n * n * d + 2 * n * n * d  # Q K^T over all heads, then (softmax) V
    return linear, attention


def cls_only_layer(n: int, d: int, mlp: int) -> tuple[int, int]:
    """:func:`encoder_layer` computed for the [CLS] row only (the last layer under a classifier): keys and
    values of all ``n`` tokens, everything else for one."""
    linear, _ = encoder_layer(1, d, mlp)
    return linear - 2 * 2 * d * d + 2 * 2 * n * d * d, 2 * n * d + 2 * n * d


def patch_embedding(image: int, patch: int, d: int) -> int:
    """A ViT patch embedding: a patch x patch convolution, stride patch, 3 -> d channels."""
    return 2 * (image // patch) ** 2 * d * (3 * patch * patch)


# Backward, per part: a linear layer whose input needs a gradient computes grad-input and
# grad-weight, each a matmul of the forward's size (2x forward); the patch convolution reads
# the pixels, which need no gradient, so only its grad-weight (1x); attention recomputes
# Q K^T and then takes two products per gradient of its two matmuls (2.5x forward).
LINEAR_BWD, FIRST_LAYER_BWD, ATTENTION_BWD = 2.0, 1.0, 2.5


def test_flops_of_a_tiny_one_tower_match_a_hand_count() -> None:
    """A ViT backbone (hidden 32, 2 layers, MLP 64) on [8 text tokens; CLS + 16 patches],
    its pooler and the VQA head (Linear 32 -> 64, Linear 64 -> 7). The classifier reads the [CLS]
    alone, so the last layer computes only its row."""
    model = make(one_tower("vision"), {"task": {}})
    d, mlp = 32, 64
    n = L + 1 + (32 // 8) ** 2
    linear, attention = encoder_layer(n, d, mlp)
    last_linear, last_attention = cls_only_layer(n, d, mlp)
    patches = patch_embedding(32, 8, d)
    pooler = 2 * d * d
    head = 2 * d * (2 * d) + 2 * (2 * d) * 7  # ClassifierHead: hidden = pooled_dim x head_hidden_mult (2.0)
    forward = linear + attention + last_linear + last_attention + patches + pooler + head
    backward = (LINEAR_BWD * (linear + last_linear + pooler + head) + ATTENTION_BWD * (attention + last_attention)
                + FIRST_LAYER_BWD * patches)

    meter = measure(model, task_loss)
    assert meter.forward == pytest.approx(forward, rel=0.05)
    assert meter.backward == pytest.approx(backward, rel=0.05)
    assert meter.per_sample() == {"forward": meter.forward, "backward": meter.backward,
                                  "train": meter.forward + meter.backward}
    assert meter.tokens_per_sample == pytest.approx(((L - 3) + L * (B - 1)) / B)  # row 0 of inputs() is padded


def test_freezing_the_vision_tower_removes_its_backward_flops() -> None:
    """The vision tower is the bottom of its branch, so freezing it removes its whole
    backward (and the grad-input of image_proj, which reads its output); the forward stays."""
    def measured(groups: list[str]) -> C.FlopMeter:
        cfg = config_from_dict({"model": two_tower(), "task": {}, "freeze": {"groups": groups}})
        model = make(two_tower(), {"task": {}})
        report = apply_freeze(model, cfg.freeze)
        assert (report.frozen > 0) == bool(groups)
        return measure(model, task_loss)

    none, vision = measured([]), measured(["vision"])
    d, mlp, layers = 32, 64, 2
    n = 1 + (32 // 8) ** 2  # CLS + 16 patches
    linear, attention = encoder_layer(n, d, mlp)
    patches = patch_embedding(32, 8, d)
    vision_forward = layers * (linear + attention) + patches
    vision_backward = LINEAR_BWD * layers * linear + ATTENTION_BWD * layers * attention + FIRST_LAYER_BWD * patches
    image_proj_grad_input = 2 * n * d * d

    assert vision.forward == none.forward
    assert none.backward - vision.backward == pytest.approx(vision_backward + image_proj_grad_input, rel=0.05)
    # about twice the tower's forward, as the rule of thumb has it (less: see FIRST_LAYER_BWD)
    assert 1.5 * vision_forward < none.backward - vision.backward < 2.5 * vision_forward


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_every_architecture_and_objective_is_counted(kind: str) -> None:
    """Forward and backward of each architecture with its pretraining objectives (MLM, ITM,
    ITC) or task head: both counted, and a fully trainable model's backward is about twice
    its forward."""
    build, stage = ALL_KINDS[kind]
    model = make(build(), stage)
    image_size = 64 if "timm" in kind else 32
    ids, mask, pix = inputs(image_size=image_size)
    obj = stage.get("objectives", {})

    def loss(m: torch.nn.Module) -> torch.Tensor:
        if "task" in stage:
            return task_loss(m, image_size)
        out = m(ids, mask, pix, mlm_positions=mlm_positions(mask) if "mlm" in obj else None,
                itm_rows=slice(0, B) if "itm" in obj else None, itc="itc" in obj)
        return sum(v.float().pow(2).mean() for v in out.logits.values())

    meter = measure(model, loss)
    assert meter.forward > 0 and meter.train == meter.forward + meter.backward
    assert 1.5 < meter.backward / meter.forward < 2.5


def test_eval_counts_the_forward_without_backward() -> None:
    model = make(one_tower("vision"), {"task": {}}).eval()
    ids, mask, pix = inputs()
    meter = C.FlopMeter()
    with torch.no_grad(), meter.count("eval", {"input_ids": ids, "attention_mask": mask}):
        model(ids, mask, pix, task=True)
    trained = measure(make(one_tower("vision"), {"task": {}}), task_loss)
    assert meter.eval == trained.forward and meter.forward is None and not meter.done
    with meter.count("eval", {"input_ids": ids[:1], "attention_mask": mask[:1]}):  # counted once only
        model(ids[:1], mask[:1], pix[:1], task=True)
    assert meter.eval == trained.forward


# --- device peaks ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype", "tf32", "peak"), [
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", False, 19.5e12),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156e12),
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4e12),
    ("NVIDIA H100 PCIe", "bf16", False, 756e12),
    ("NVIDIA H100 NVL", "fp16", False, 835.5e12),
    ("NVIDIA H200", "bf16", False, 989.4e12),
    ("NVIDIA H200 NVL", "bf16", False, 835.5e12),
    ("NVIDIA L4", "bf16", False, 121e12),
    ("NVIDIA L40", "bf16", False, 181e12),
    ("NVIDIA L40S", "bf16", False, 362e12),
    ("NVIDIA A10", "fp16", False, 125e12),
    ("NVIDIA A10G", "bf16", False, None),  # AWS's variant has other tensor rates: measured instead
    ("NVIDIA RTX A6000", "bf16", False, 154.8e12),
    ("NVIDIA RTX 6000 Ada Generation", "bf16", False, None),
    ("Tesla V100-SXM2-16GB", "fp16", False, 125e12),
    ("Tesla V100-PCIE-32GB", "fp16", False, 112e12),
    ("Tesla V100S-PCIE-32GB", "fp32", False, 16.4e12),
    ("NVIDIA GeForce RTX 3090", "bf16", False, 71e12),
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", False, None),
    ("NVIDIA GeForce RTX 4090", "fp16", False, 165.2e12),
])
def test_peak_table_matches_device_names(name: str, dtype: str, tf32: bool, peak: float | None) -> None:
    assert C.table_peak(name, dtype, tf32=tf32) == (pytest.approx(peak) if peak else None)


def test_cpu_peak_is_measured_once_per_machine_threads_and_dtype(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    real = C.measure_matmul_peak

    def counted(device: torch.device, dtype: str, **kwargs) -> float:
        calls.append((dtype, torch.get_num_threads()))
        return real(device, dtype, **kwargs)

    monkeypatch.setattr(C, "measure_matmul_peak", counted)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    first = C.device_peak(cpu, "fp32", tmp_path)
    assert first[1] == "measured" and first[0] > 1e9
    assert C.device_peak(cpu, "fp32", tmp_path) == first
    assert calls == [("fp32", threads)]
    assert f"{C.cpu_name()}|{threads} threads|fp32" in (tmp_path / C.PEAK_CACHE).read_text()
    try:
        torch.set_num_threads(threads + 1)
        C.device_peak(cpu, "fp32", tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert calls == [("fp32", threads), ("fp32", threads + 1)]


class ScriptedClock:
    """A clock whose timed spans last the given seconds, one per timed call; every ``torch.mm`` it sees is
    counted, and so is whether the span it ran in was timed."""

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.timing, self.calls = list(durations), 0.0, False, []

    def __call__(self) -> float:
        if self.timing:
            self.now += self.durations.pop(0)
        self.timing = not self.timing
        return self.now

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.timing)
        return a


def test_the_peak_is_the_fastest_repeat_after_untimed_warm_ups(monkeypatch: pytest.MonkeyPatch) -> None:
    # one size (512 = max_size: one warm-up and one timed call), then 2 warm-ups and 5 repeats, most of them
    # slowed by other load: the peak is the fastest (0.1 s), not the median (0.3 s)
    clock = ScriptedClock([9.0, 0.4, 0.1, 0.5, 0.3, 0.2])
    monkeypatch.setattr(C.torch, "mm", clock.mm)
    peak = C.measure_matmul_peak(torch.device("cpu"), "fp32", repeats=5, warmup=2, max_size=512, clock=clock)
    assert peak == pytest.approx(2 * 512**3 / 0.1)
    assert clock.calls == [False, True, False, False, True, True, True, True, True] and not clock.durations


def test_the_precision_is_what_autocast_makes_of_a_matmul() -> None:
    cpu = torch.device("cpu")
    assert C.autocast_dtype(contextlib.nullcontext(), cpu) == "fp32"
    assert C.autocast_dtype(torch.autocast("cpu", dtype=torch.bfloat16), cpu) == "bf16"
    assert C.autocast_dtype(torch.autocast("cpu", dtype=torch.float16), cpu) == "fp16"


@pytest.mark.slow
def test_fp16_on_a_cpu_records_and_shows_the_fp32_that_ran(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    # accelerate runs no fp16 autocast on a CPU: the run trains in fp32, so its peak must be the fp32 one
    # (seeded here, so nothing is measured) and `ren show` must say that fp16 was not applied
    key = f"cpu: {C.cpu_name()}|1 threads|fp32"
    (ren_home / "cache").mkdir(parents=True)
    (ren_home / "cache" / C.PEAK_CACHE).write_text(json.dumps({key: 1.25e12}))
    preset = tmp_path / "fp16.toml"
    preset.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
        f'[data]\ncache_dir = "{data_cache}"\neval_max_samples = 64\n'
        '[train]\nmax_steps = 4\nlog_every = 2\neval_every = 100\ncpu_threads = 1\nmixed_precision = "fp16"\n'
    )
    result = ren("run", str(preset), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = Store(ren_home).list_runs()[0]
    c = record.compute
    assert (c["dtype"], c["requested_dtype"], c["peak_flops"]) == ("fp32", "fp16", 1.25e12)
    shown = ren("show", record.id)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "fp32 (fp16 was requested and not applied on this device)" in text and "fp32 peak" in text


def test_utilisation_above_the_peak_is_kept_and_flagged(ren_home: Path) -> None:
    from engine.cli.commands import _compute_rows
    from engine.display import format_compute

    store = Store(ren_home)
    record = store.create_run(name="r", stage="pretrain", kind="one_tower", config={}, max_steps=10)
    record = store.update_run(record.id, compute={
        "flops_per_sample": {"train": 3e8}, "achieved_flops": 1.036e11, "utilisation": 1.036, "peak_flops": 1e11,
        "peak_source": "measured", "device": "cpu: x", "dtype": "fp32", "requested_dtype": "fp32", "processes": 1})
    assert "(104% of peak, above 100%)" in format_compute(record)
    rows = dict(_compute_rows(record))
    assert "103.6% of 1 x" in rows["utilisation"] and "above 100%: the machine was busier" in rows["utilisation"]
    assert rows["device"] == "cpu: x, fp32, 1 process(es)"


# --- the step timer ---------------------------------------------------------------------------


def test_step_timer_splits_a_step_and_excludes_paused_time() -> None:
    def slow_loader():
        for i in range(3):
            time.sleep(0.02)
            yield i

    timer = C.StepTimer(micro_batches=1)
    t0 = time.perf_counter()
    for i in timer.batches(slow_loader()):
        timer.start(sampled=True, warm=i > 0)  # the first step is the FLOP-counted one: not timed
        time.sleep(0.01)
        timer.mark("forward")
        time.sleep(0.02)
        timer.mark("backward")
        timer.mark("optimizer")
        with timer.paused():
            time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    split = timer.split()
    assert set(split) == set(C.PHASES)
    assert split["data"] >= 0.02 and split["forward"] >= 0.01 and split["backward"] >= 0.02
    assert split["optimizer"] < split["forward"]
    assert sum(split.values()) * 2 <= timer.seconds <= elapsed - 3 * 0.05
    assert timer.seconds >= 3 * (0.02 + 0.01 + 0.02)


# --- what a run stores ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ren_run_stores_compute_and_ren_show_prints_it(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    steps, batch = 48, 8
    preset = tmp_path / "compute.toml"
    preset.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
        f'[data]\ncache_dir = "{data_cache}"\neval_max_samples = 64\n'
        f"[train]\nmax_steps = {steps}\nbatch_size = {batch}\nlog_every = 2\neval_every = 24\n"
        "checkpoint_every = 1000\ncpu_threads = 1\n"
    )
    result = ren("run", str(preset), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    store = Store(ren_home)
    record = store.list_runs()[0]
    c = record.compute
    assert CONTRACT_KEYS | {"eval_pflops"} <= set(c)

    per = c["flops_per_sample"]
    assert per["train"] == per["forward"] + per["backward"] and per["backward"] > per["forward"] > 0
    assert per["eval"] > 0
    assert c["pflops"] == pytest.approx(per["train"] * steps * batch / 1e15, rel=1e-9)
    assert c["device"] == f"cpu: {C.cpu_name()}" and c["dtype"] == "fp32" and c["processes"] == 1
    assert c["peak_source"] == "measured" and c["peak_flops"] > 1e9
    assert c["achieved_flops"] == pytest.approx(per["train"] * c["samples_per_s"])
    assert 0 < c["utilisation"] <= 1
    assert c["utilisation"] == pytest.approx(c["achieved_flops"] / c["peak_flops"])
    assert c["tokens_per_s"] == pytest.approx(c["tokens_per_sample"] * c["samples_per_s"])
    assert 0 < c["train_seconds"] < record.duration_s
    assert c["device_hours"] == pytest.approx(c["train_seconds"] / 3600) and c["device_hours"] > 0
    assert c["peak_memory_mb"] > 50
    # the step split accounts for most of a step: the timed steps (all but the FLOP-counted
    # first) fit in the training time, and fill most of it (48 steps, so that the slow first step,
    # which is training time but not in the split, is a small part of it)
    split = c["step_split_s"]
    assert set(split) == set(C.PHASES) and all(v >= 0 for v in split.values())
    step_s = sum(split.values())
    print(f"{per['train']:.3g} FLOP/sample, {c['samples_per_s']:.0f} samples/s, utilisation {c['utilisation']:.1%} "
          f"of {c['peak_flops']:.3g} FLOP/s, split {step_s * 1e3:.2f} ms/step = "
          f"{step_s * (steps - 1) / c['train_seconds']:.0%} of the training time")
    assert 0.4 * c["train_seconds"] <= step_s * (steps - 1) <= c["train_seconds"]
    # the evaluation at step 24 stops after its first batch of 256 (the eval loader's batch size,
    # past eval_max_samples); the final one covers the whole validation split, then the test split
    # (easy-VQA's 9,673 questions) is scored once
    assert record.final_scores["eval_samples"] == 3_892 and set(record.test_scores) == {"test/vqa_score"}
    assert c["eval_pflops"] == pytest.approx(per["eval"] * (256 + 3_892 + 9_673) / 1e15)

    pflops = store.series(record.id, "compute/pflops")
    assert [s for s, _ in pflops] == list(range(2, steps + 1, 2))
    assert [v for _, v in pflops] == pytest.approx([per["train"] * s * batch / 1e15 for s, _ in pflops])
    hours = [v for _, v in store.series(record.id, "compute/device_hours")]
    assert hours == sorted(hours) and hours[-1] == pytest.approx(c["device_hours"], rel=1e-6)
    assert len(store.series(record.id, "compute/utilisation")) == len(pflops)
    assert {s for s, _ in store.series(record.id, "eval/vqa_score")} <= {s for s, _ in pflops}

    shown = ren("show", record.id)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for expected in ("FLOPs/sample", "samples/s", "tokens/s", "of 1 x", "fp32 peak (measured matmul)",
                     "step time", "peak memory", "PFLOPs training", "device-hours", "backbone"):
        assert expected in text, expected


@pytest.mark.slow
def test_resume_continues_cumulative_compute(ren_home: Path, data_cache: Path) -> None:
    """A run trained 4 steps, then resumed from its checkpoint to 8, has the compute of
    8 steps (the checkpoint's trainer state carries the totals)."""
    store = Store(ren_home)
    raw = tiny_finetune(data_cache, max_steps=4, checkpoint_every=4, eval_every=1000, log_every=4)
    cfg, run_id = start(store, copy.deepcopy(raw))
    train(cfg, store, run_id)
    first = store.get_run(run_id).compute
    raw["train"]["max_steps"] = 8
    train(config_from_dict(raw), store, run_id, resume=True)
    second = store.get_run(run_id).compute
    # each session measures FLOPs per sample on its own first batch (texts padded to that batch's longest)
    assert first["pflops"] == pytest.approx(first["flops_per_sample"]["train"] * 4 * 16 / 1e15)
    assert second["pflops"] == pytest.approx(first["pflops"] + second["flops_per_sample"]["train"] * 4 * 16 / 1e15)
    assert second["train_seconds"] > first["train_seconds"]
    assert second["device_hours"] == pytest.approx(second["train_seconds"] / 3600)
    pflops = store.series(run_id, "compute/pflops")
    assert [s for s, _ in pflops] == [4, 8] and pflops[-1][1] == pytest.approx(second["pflops"])


def test_records_of_an_older_store_without_compute_still_load(ren_home: Path) -> None:
    store = Store(ren_home)
    record = store.create_run(name="old", stage="finetune", kind="one_tower", config={})
    index = json.loads(store.index_path.read_text())
    for doc in index["runs"].values():
        del doc["compute"]
    store.index_path.write_text(json.dumps(index))
    assert "compute" not in store.index_path.read_text()
    assert store.get_run(record.id).compute == {}
    updated = store.update_run(record.id, compute={"pflops": 1.5})
    assert updated.compute == {"pflops": 1.5} and Store(ren_home).get_run(record.id).compute == {"pflops": 1.5}
