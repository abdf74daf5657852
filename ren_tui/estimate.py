"""Compose's run total and time estimate, as pure functions: the compute a config will spend (the model
inspector's FLOPs per sample times the samples it trains and evaluates on) and how long that takes at the
training throughput this machine's finished runs measured."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.store import RunRecord

SIMILAR = 1.5
"""A finished run counts as the same size when its measured training FLOPs per sample are within this
factor of the estimate: the throughput a machine reaches depends on the model's size."""


@dataclass(frozen=True)
class Plan:
    """What a config will compute, in FLOPs: ``train`` (every step), ``eval`` (the evaluations during
    training whose size is known: ``data.eval_max_samples`` each), ``evals`` (how many), and whether the
    final evaluation (the whole eval split: its size is the data's) is left out."""

    train: float
    eval: float
    evals: int
    final_eval_left_out: bool

    @property
    def total(self) -> float:
        return self.train + self.eval


@dataclass(frozen=True)
class Throughput:
    """Training FLOP/s measured by finished runs: the median over ``runs`` runs on ``device``; ``similar``
    when they are runs of about this size."""

    flops_per_s: float
    runs: int
    device: str
    similar: bool

    def basis(self) -> str:
        """What the time estimate is based on, in words."""
        runs = f"{self.runs} finished run{'s' * (self.runs != 1)}"
        return f"from {runs} {'of this size ' if self.similar else ''}on this machine"


def plan(flops_per_sample: Mapping[str, Any], config: Mapping[str, Any]) -> Plan | None:
    """The compute of a run of ``config`` (a config dict) from the inspector's ``flops_per_sample``
    (None when it has no training figure). Evaluations happen every ``train.eval_every`` steps before
    the last when finetuning; each covers ``data.eval_max_samples`` samples, or the whole eval split,
    whose size is unknown here (then none are counted)."""
    per_sample = flops_per_sample.get("train")
    if not per_sample:
        return None
    train = config.get("train", {})
    steps, batch = int(train.get("max_steps", 1000)), int(train.get("batch_size", 64))
    finetune = config.get("task") is not None and config.get("objectives") is None
    evals, samples = 0, config.get("data", {}).get("eval_max_samples")
    if finetune:
        evals = (steps - 1) // int(train.get("eval_every", 500))
    eval_flops = float(flops_per_sample.get("eval") or 0.0)
    counted = evals if samples else 0
    return Plan(train=float(per_sample) * batch * steps, eval=eval_flops * (samples or 0) * counted,
                evals=counted, final_eval_left_out=finetune)


def run_flops_per_s(record: RunRecord) -> float | None:
    """A run's training FLOP/s over its whole training time: cumulative compute / training seconds."""
    compute = record.compute or {}
    pflops, seconds = compute.get("pflops"), compute.get("train_seconds")
    if not isinstance(pflops, (int, float)) or not isinstance(seconds, (int, float)) or pflops <= 0 or seconds <= 0:
        return None
    return pflops * 1e15 / seconds


def measured_throughput(records: Sequence[RunRecord], host: str, train_flops_per_sample: float | None
                        ) -> Throughput | None:
    """The training throughput of this machine (``host``): the median FLOP/s of its finished runs on the
    device of the newest one, preferring runs whose measured training FLOPs per sample are within
    :data:`SIMILAR` of ``train_flops_per_sample``; None when no finished run here measured one."""
    timed = [(r, rate) for r in records if r.status == "finished" and r.host == host
             and (rate := run_flops_per_s(r)) is not None]
    if not timed:
        return None

    def size_like(record: RunRecord) -> bool:
        measured = (record.compute.get("flops_per_sample") or {}).get("train")
        return bool(train_flops_per_sample and measured) and \
            1 / SIMILAR <= measured / train_flops_per_sample <= SIMILAR

    similar = [pair for pair in timed if size_like(pair[0])]
    pool = similar or timed
    newest = max(pool, key=lambda pair: pair[0].ended_at or 0.0)[0]
    device = _device(newest)
    rates = [rate for r, rate in pool if _device(r) == device]
    return Throughput(statistics.median(rates), len(rates), device, bool(similar))


def _device(record: RunRecord) -> str:
    compute = record.compute or {}
    return f"{compute.get('processes', 1)}x {compute.get('device') or record.device or '?'}"


def eta_seconds(work: Plan | None, throughput: Throughput | None) -> float | None:
    """Seconds to compute ``work`` at ``throughput`` (None when either is unknown)."""
    if work is None or throughput is None or throughput.flops_per_s <= 0:
        return None
    return work.total / throughput.flops_per_s
