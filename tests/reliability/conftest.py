"""Helpers of the fault tests: the real ``ren`` entry point in a child process, and a tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REN = [sys.executable, "-c", "from engine.cli import main; main()"]


def spawn_ren(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``ren ARGS`` as a user would, with its output captured (unbuffered)."""
    return subprocess.Popen([*REN, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


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
