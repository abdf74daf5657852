"""Tiny training runs that finish in seconds on a CPU: easy-VQA configs (a one-tower finetune, a two-tower
pretraining, a one-tower preset file) and a run created in the store for them; a run stored as finished
without training, for code that reads finished runs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from engine.config import RunConfig, config_from_dict
from engine.store import Store
from engine.train import SilentReporter


def tiny_finetune(cache: Path, **train: int) -> dict:
    """A one-tower easy-VQA finetuning config of 20 steps; ``train`` overrides its [train] keys."""
    return {
        "run": {"name": "tiny-ft", "seed": 0},
        "model": {"kind": "one_tower", "backbone": {
            "modality": "vision", "hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 16, "image_size": 32}},
        "task": {"name": "vqa"},
        "data": {"max_text_len": 16, "eval_max_samples": 256, "cache_dir": str(cache)},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
        "train": {"max_steps": 20, "batch_size": 16, "log_every": 5, "eval_every": 10,
                  "checkpoint_every": 10, "keep_checkpoints": 2, "cpu_threads": 1, **train},
    }


def tiny_pretrain(cache: Path) -> dict:
    """A two-tower easy-VQA pretraining config (MLM, ITM, ITC) of 6 steps."""
    return {
        "run": {"name": "tiny-pt", "seed": 0},
        "model": {"kind": "two_tower",
                  "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_positions": 32},
                  "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 16, "image_size": 32},
                  "fusion": {"layers": 1, "hidden_size": 32, "heads": 2}},
        "objectives": {"mlm": {"weight": 1.0}, "itm": {"weight": 0.5}, "itc": {"weight": 0.25}},
        "data": {"max_text_len": 16, "cache_dir": str(cache)},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 3, "cpu_threads": 1},
    }


def start(store: Store, raw: dict) -> tuple[RunConfig, str]:
    """Create the stored run of config ``raw``, ready to train: (its config, its id)."""
    cfg = config_from_dict(raw)
    record = store.create_run(name=cfg.run.name, stage=cfg.stage, kind=cfg.model.kind,
                              config=cfg.to_dict(), max_steps=cfg.train.max_steps)
    return cfg, record.id


def finished_run(store: Store, raw: dict, seed: int = 0) -> str:
    """A run of config ``raw`` stored as finished without training: final weights of its model with every
    tensor moved off its initial value (norms and biases too, so a tensor that failed to load shows), and the
    meaning of its task head's outputs as training stores it. Returns its id."""
    import torch
    from safetensors.torch import save_file

    from engine.data.pipeline import build_tokenizer, task_answers
    from engine.models import build_model
    from engine.train import ANSWERS, FINAL_WEIGHTS

    cfg, run_id = start(store, raw)
    answers = task_answers(cfg) if cfg.task is not None else None
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size=len(build_tokenizer(cfg)), num_answers=len(answers) if answers else None)
    noise = torch.Generator().manual_seed(seed)
    weights = {name: (t + 0.05 * torch.randn(t.shape, generator=noise) if t.is_floating_point() else t).contiguous()
               for name, t in model.state_dict().items()}
    run_dir = store.run_dir(run_id)
    save_file(weights, str(run_dir / FINAL_WEIGHTS))
    if answers is not None:
        (run_dir / ANSWERS).write_text(json.dumps(answers))
    store.mark_ended(run_id, "finished")
    return run_id


def tiny_preset(path: Path, cache: Path, **train: int) -> Path:
    """Write a one-tower easy-VQA finetuning preset small enough to train in seconds on a CPU."""
    settings = {"max_steps": 12, "batch_size": 16, "log_every": 1, "eval_every": 1000, "checkpoint_every": 4,
                "keep_checkpoints": 2, "cpu_threads": 1, **train}
    path.write_text(
        '[run]\nname = "fault"\nseed = 0\n'
        '[model]\nkind = "one_tower"\n'
        '[model.backbone]\nmodality = "vision"\nhidden_size = 32\nlayers = 1\nheads = 2\npatch_size = 16\n'
        "image_size = 32\n"
        '[task]\nname = "vqa"\n'
        f'[data]\nmax_text_len = 16\neval_max_samples = 2048\ncache_dir = "{cache}"\n'
        "[optim]\nlr = 1e-3\nwarmup_ratio = 0.1\n"
        "[train]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())
    )
    return path


class TermAt(SilentReporter):
    """Sends this process SIGTERM when ``step`` is logged, as `ren cancel` would."""

    def __init__(self, step: int) -> None:
        self.at = step

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class Messages(SilentReporter):
    """A reporter that keeps the messages a run reports."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)
