"""Achieved FLOP/s of a training step against this CPU's measured matmul peak.

    .venv/bin/python bench/flops_utilisation.py [PRESET] [--set KEY=VALUE ...] [--steps 20] [--repeats 5]

Builds the preset's model (random weights) and its data as the trainer does, counts the
FLOPs of one training step with ``engine.compute.FlopMeter`` (forward and backward under
separate ``flop_counter`` contexts), then times ``--steps`` uncounted steps (forward,
backward, AdamW step) and reports, as medians:

- ``flops_per_step``: forward + backward FLOPs of one step (the batch's samples x FLOPs/sample);
- ``step_s``: seconds per training step;
- ``achieved_flops``: flops_per_step / step_s;
- ``peak_flops``: ``engine.compute.measure_matmul_peak`` (the median of ``--repeats`` square
  fp32 matmuls, grown until one takes 50 ms) with the same thread count;
- ``utilisation``: achieved / peak, what ``ren show`` reports for a run on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", default=str(REPO / "presets" / "quickstart.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from engine.compute import FlopMeter, cpu_name, measure_matmul_peak
    from engine.config import load_preset
    from engine.data.pipeline import build_data
    from engine.models import build_model
    from engine.train import _finetune_step, _identity, _pretrain_step

    cfg = load_preset(Path(args.preset), args.overrides)
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    data = build_data(cfg, cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(tempfile.mkdtemp()))
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_fn = _pretrain_step if cfg.objectives else _finetune_step
    loader = DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=_identity,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    meter = FlopMeter()

    def step() -> None:
        batch = next(batches)
        gen = torch.Generator().manual_seed(0)
        with meter.count("forward", batch):
            loss, _ = step_fn(model, batch, cfg, data, gen)
        with meter.count("backward", batch):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # counted (and warms up)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops_per_step = meter.train * cfg.train.batch_size
    peak = measure_matmul_peak(torch.device("cpu"), "fp32", repeats=args.repeats)
    print(json.dumps({
        "preset": str(args.preset), "model": cfg.model.kind, "batch": cfg.train.batch_size,
        "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "flops_per_sample": meter.per_sample(), "flops_per_step": flops_per_step,
        "step_s": step_s, "achieved_flops": flops_per_step / step_s, "peak_flops": peak,
        "utilisation": flops_per_step / step_s / peak,
    }, indent=1))


if __name__ == "__main__":
    main()
