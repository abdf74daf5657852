"""Stored runs as a freeze study records them, without training: a pretraining per (variant, seed) with
its compute, and a finetune of it with its score."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import load_preset
from engine.runs import create_run
from engine.store import RunRecord, Store
from tests.helpers.paths import PRESETS

PRE = PRESETS / "studies" / "easyvqa_two_tower_pretrain_short.toml"
FT = PRESETS / "studies" / "easyvqa_vqa_finetune_short.toml"
T0 = 1_700_000_000.0


@dataclass(frozen=True)
class Plan:
    """What one (variant, seed) recorded: pretraining compute and the finetune's final score."""

    pflops: float | None  # None: the pretraining has no compute record
    wall_s: float
    device_hours: float
    peak_mb: float
    trainable: int
    score: float | None  # None: the finetune is still running


PLANS = {
    ("none", 0): Plan(10.0, 100.0, 0.05, 900.0, 1_000_000, 0.80),
    ("none", 1): Plan(10.0, 120.0, 0.06, 1100.0, 1_000_000, 0.84),
    ("vision", 0): Plan(6.0, 66.0, 0.03, 700.0, 600_000, 0.78),
    ("vision", 1): Plan(6.0, 66.0, 0.036, 700.0, 600_000, 0.79),
    ("both", 0): Plan(3.0, 33.0, 0.015, 500.0, 250_000, 0.70),
    ("both", 1): Plan(None, 33.0, 0.0, 0.0, 250_000, None),
}
FT_PFLOPS = 1.0  # each finetune's own compute at its last step (400)


def record_pretrain(store: Store, name: str, seed: int, plan: Plan, *, overrides: tuple[str, ...] = (),
                    study: dict | None = None, status: str = "finished") -> RunRecord:
    """Store the short two-tower pretraining ``name`` as having run to its end (or to ``status``) with
    ``plan``'s compute, trainable parameters and loss curve."""
    cfg = load_preset(PRE, [f"run.seed={seed}", f"run.name={name}", *overrides])
    record = create_run(store, cfg, str(PRE))
    start = T0 + len(store.list_runs()) * 1000
    compute = {} if plan.pflops is None else {
        "pflops": plan.pflops, "device_hours": plan.device_hours, "peak_memory_mb": plan.peak_mb,
        "flops_per_sample": {"forward": 1e9, "backward": 2e9, "train": 3e9, "eval": 1e9}, "device": "cpu: test",
        "dtype": "fp32", "processes": 1, "train_seconds": plan.wall_s}
    ended = {"ended_at": start + plan.wall_s} if status == "finished" else {}
    store.update_run(record.id, status=status, started_at=start, step=cfg.train.max_steps, study=study, compute=compute,
                     params={"total": 1_000_000, "trainable": plan.trainable,
                             "frozen": 1_000_000 - plan.trainable, "groups": {}}, **ended)
    with store.metrics_writer(record.id) as writer:
        for step in range(100, 700, 100):
            extra = {} if plan.pflops is None else {"compute/pflops": plan.pflops * step / 600}
            writer.log(step, loss=6.0 - step / 200 - plan.trainable / 1e6, **extra)
    return store.get_run(record.id)


def record_finetune(store: Store, parent: RunRecord, seed: int, score: float | None, *,
                    study: dict | None = None) -> RunRecord:
    """Store a finetune of ``parent`` (initialised from it) that finished with ``score``, or is still running
    at step 200 when ``score`` is None."""
    cfg = load_preset(FT, [f"run.seed={seed}", f"run.name={parent.name}/easy-vqa",
                           f'train.init_from="run:{parent.id}"'])
    record = create_run(store, cfg, str(FT))
    start = T0 + len(store.list_runs()) * 1000
    if score is None:
        store.update_run(record.id, status="running", started_at=start, step=200, study=study)
    else:
        store.update_run(record.id, status="finished", started_at=start, ended_at=start + 50.0, step=400,
                         study=study, final_scores={"vqa_score": score, "eval_samples": 600.0},
                         best_scores={"eval/vqa_score": score})
    with store.metrics_writer(record.id) as writer:
        for step in range(100, 500 if score is not None else 300, 100):
            writer.log(step, loss=2.0 - step / 400, **{"compute/pflops": FT_PFLOPS * step / 400})
            if step % 200 == 0 and score is not None:
                writer.log(step, **{"eval/vqa_score": score - (0.05 if step == 200 else 0.0)})
    return store.get_run(record.id)
