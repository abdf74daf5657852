"""Compose's run total and time estimate (ren_tui.estimate): the compute of a config and the training
throughput this machine's finished runs measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.store import RunRecord, Store
from ren_tui.estimate import SIMILAR, eta_seconds, measured_throughput, plan, run_flops_per_s
from ren_tui.screens.compose import compute_lines

from .tui_fake import canned_run, preset_config

HOST = "gpu-box-1"


def finished(store: Store, name: str, *, host: str = HOST, pflops: float = 2.0, seconds: float = 400.0,
             per_sample: float = 1.5e8, device: str = "NVIDIA H100 80GB HBM3", status: str = "finished",
             ended_at: float | None = None) -> RunRecord:
    record = canned_run(store, name, status=status)
    return store.update_run(record.id, host=host, ended_at=ended_at or record.ended_at, compute={
        "device": device, "processes": 1, "pflops": pflops, "train_seconds": seconds,
        "flops_per_sample": {"train": per_sample}})


def test_plan_counts_training_and_the_sized_evaluations() -> None:
    finetune = preset_config()  # quickstart: 1000 steps of 64, evaluations of 2000 samples every 250 steps
    train, data = finetune["train"], finetune["data"]
    work = plan({"train": 1.5e8, "eval": 5e7}, finetune)
    assert work is not None
    assert work.train == 1.5e8 * train["batch_size"] * train["max_steps"]
    assert work.evals == (train["max_steps"] - 1) // train["eval_every"] == 3  # not at the last step: the final one
    assert work.eval == 5e7 * data["eval_max_samples"] * work.evals and work.final_eval_left_out
    assert work.total == work.train + work.eval

    unsized = {**finetune, "data": {**data, "eval_max_samples": None}}  # the whole split each time: size unknown
    assert plan({"train": 1.5e8, "eval": 5e7}, unsized).eval == 0  # type: ignore[union-attr]

    pretrain = preset_config("easyvqa_pretrain.toml")
    work = plan({"train": 3e8}, pretrain)
    assert work is not None and (work.evals, work.eval, work.final_eval_left_out) == (0, 0.0, False)
    assert work.train == 3e8 * pretrain["train"]["batch_size"] * pretrain["train"]["max_steps"]
    assert plan({}, pretrain) is None


def test_throughput_is_this_machines_and_prefers_runs_of_this_size(ren_home: Path) -> None:
    store = Store(ren_home)
    small = [finished(store, f"small-{i}", pflops=1.0 + i, seconds=1000.0, per_sample=1e8) for i in range(3)]
    big = finished(store, "big", pflops=50.0, seconds=1000.0, per_sample=1e10)
    finished(store, "elsewhere", host="other-box", pflops=99.0, per_sample=1e8)
    finished(store, "running", status="running", pflops=99.0, per_sample=1e8)
    records = store.list_runs()

    like_small = measured_throughput(records, HOST, 1.2e8)
    assert like_small is not None and like_small.similar and like_small.runs == 3
    assert like_small.flops_per_s == sorted(run_flops_per_s(r) for r in small)[1]  # the median
    assert like_small.basis() == "from 3 finished runs of this size on this machine"

    like_big = measured_throughput(records, HOST, 1e10 * SIMILAR * 0.99)
    assert like_big is not None and like_big.runs == 1 and like_big.flops_per_s == run_flops_per_s(big)

    unlike = measured_throughput(records, HOST, 1e12)  # no run of this size: every run here
    assert unlike is not None and not unlike.similar and unlike.runs == 4
    assert unlike.basis() == "from 4 finished runs on this machine"
    assert measured_throughput(records, "a-new-box", 1e8) is None


def test_throughput_keeps_to_the_device_of_the_newest_run(ren_home: Path) -> None:
    store = Store(ren_home)
    finished(store, "old-cpu", device="cpu: Xeon", pflops=0.01, ended_at=1_000.0)
    gpu = finished(store, "new-gpu", pflops=5.0, ended_at=2_000.0)
    measured = measured_throughput(store.list_runs(), HOST, 1.5e8)
    assert measured is not None and measured.runs == 1 and measured.flops_per_s == run_flops_per_s(gpu)
    assert measured.device == "1x NVIDIA H100 80GB HBM3"


def test_runs_without_compute_are_not_timed(ren_home: Path) -> None:
    store = Store(ren_home)
    bare = canned_run(store, "old-store-run")
    assert run_flops_per_s(bare) is None
    assert measured_throughput(store.list_runs(), bare.host or "", 1e8) is None


def test_eta_and_the_side_panel(ren_home: Path) -> None:
    store = Store(ren_home)
    run = finished(store, "timed", pflops=2.0, seconds=400.0, per_sample=1.5e8)
    config = preset_config()
    flops = {"forward": 5e7, "train": 1.5e8, "eval": 5e7,
             "text_len": {"train": 11.7, "eval": 12.0, "source": "the lengths of 4,096 easy-VQA questions"}}
    work = plan(flops, config)
    measured = measured_throughput(store.list_runs(), HOST, flops["train"])
    eta = eta_seconds(work, measured)
    assert eta == pytest.approx(work.total / run_flops_per_s(run))  # type: ignore[union-attr,operator]
    assert eta_seconds(work, None) is None and eta_seconds(None, measured) is None

    lines = compute_lines(flops, config, lambda per_sample: measured)
    assert "  text        ≈ 11.7 tokens" in lines and "  training    150 MFLOP" in lines
    assert any(line.startswith("  evaluation  ") and line.endswith("(3x)") for line in lines)
    assert "from 1 finished run of this size on this machine" in " ".join(line.strip() for line in lines)
    unmeasured = compute_lines({**flops, "text_len": {**flops["text_len"], "source": "at most data.max_text_len"}},
                               config, lambda per_sample: None)
    assert "  time        -" in unmeasured and "  text        ≤ 11.7 tokens" in unmeasured
    assert "no finished run on this machine to time it by" in " ".join(line.strip() for line in unmeasured)
