"""What ``train.compile`` buys: training throughput eager against compiled, and what the compile costs.

    .venv/bin/python bench/compile_speed.py [--repeats 3] [--steps 80] [--threads 2] [--quick]

Each side trains the easy-VQA two-tower finetune (``presets/base/easyvqa_two_tower.toml`` sizes, random
init, no evaluation during training) in this process, in alternation: eager; compiled block by block
(``compile_regions = true``, the default); the whole model compiled. Throughput is the steady state: the median
of the ``samples_per_s`` the run logged over its last half (every 10 steps), after the compile; the compile's
cost is the run's wall time minus eager's for the same steps. Each compiled run starts with an empty inductor
cache of its own (``TORCHINDUCTOR_CACHE_DIR``), so each pays its whole compile, as a first run on a machine
does. ``--quick``: a few steps, printed only (never writes RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402
from engine.config import load_preset  # noqa: E402
from engine.data.easyvqa import load_easy_vqa  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.train import train  # noqa: E402

SIDES = {"eager": [], "compiled blocks": ["train.compile=true"],
         "compiled whole model": ["train.compile=true", "train.compile_regions=false"]}


def one_run(root: Path, cache: Path, side: str, args: argparse.Namespace, walls: dict[str, list[float]]) -> float:
    """Train once as ``side``; the steady-state samples per second."""
    store = Store(root / side.replace(" ", "-"))
    overrides = [f"data.cache_dir={str(cache)!r}", f"train.max_steps={args.steps}", "train.log_every=10",
                 "train.eval_every=100000", "train.checkpoint_every=100000", f"train.cpu_threads={args.threads}",
                 "data.eval_max_samples=64", "run.name='bench'", "task.name='vqa'", *SIDES[side]]
    cfg = load_preset(REPO / "presets" / "base" / "easyvqa_two_tower.toml", overrides)
    record = store.create_run(name=cfg.run.name, stage=cfg.stage, kind=cfg.model.kind, config=cfg.to_dict(),
                              max_steps=cfg.train.max_steps)
    if cfg.train.compile:  # pay the whole compile, as a first run does: a new, empty inductor cache
        import torch._dynamo

        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / f"inductor-{len(walls[side])}-{side.replace(' ', '-')}")
    began = time.perf_counter()
    train(cfg, store, record.id)
    walls[side].append(time.perf_counter() - began)
    rates = [value for _, value in store.series(record.id, "samples_per_s")]
    return median(rates[len(rates) // 2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few steps; print only, never write RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 20
    with tempfile.TemporaryDirectory(prefix="ren-bench-compile-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        load_easy_vqa(cache)
        walls: dict[str, list[float]] = {side: [] for side in SIDES}
        rates = alternate({side: lambda side=side: one_run(root, cache, side, args, walls) for side in SIDES},
                          args.repeats)
    eager, eager_wall = median(rates["eager"]), median(walls["eager"])
    rows = [[side, f"{median(rates[side]):.1f}", f"{median(rates[side]) / eager:.3f}",
             f"{median(walls[side]) - eager_wall:+.1f}", " ".join(f"{r:.1f}" for r in rates[side])]
            for side in SIDES]
    body = (f"The easy-VQA two-tower finetune (presets/base/easyvqa_two_tower.toml), random init, batch 64, "
            f"{args.steps} steps on {args.threads} CPU thread(s); {args.repeats} alternating repeats in one process. "
            "samples/s: the median of the rates logged over the run's second half (compiled: after the compile); "
            "compile cost: the run's wall time minus eager's, each compiled run with an empty inductor cache.\n\n"
            + table(["side", "samples/s (median)", "vs eager", "compile cost s (median)", "samples/s each"], rows))
    print(body)
    if not args.quick:
        write_section("compile_speed", "torch.compile: training throughput against eager", body)


if __name__ == "__main__":
    main()
