"""Achieved FLOP/s of a training step against the machine's matmul peak (the physical ceiling).

    .venv/bin/python bench/flops_utilisation.py [PRESET] [--set KEY=VALUE ...] [--steps 5] [--repeats 5] [--quick]

Builds the preset's model (random weights) and its data as the trainer does, counts the
FLOPs of one training step with ``engine.compute.FlopMeter`` (forward and backward under
separate ``flop_counter`` contexts), then alternates (``bench/_results.alternate``, ``--repeats``
rounds) two measurements so load on a shared machine hits both alike: ``--steps`` uncounted
training steps (the trainer's ``_pretrain_step``/``_finetune_step`` forward, backward, gradient
clipping, the trainer's AdamW step (``engine.train.build_optimizer``)) and the peak. It reports, as medians:

- ``flops_per_step``: forward + backward FLOPs of one step (the batch's samples x FLOPs/sample);
- ``step_s``: seconds per training step;
- ``achieved_flops``: flops_per_step / step_s;
- ``peak_flops``: on a CPU, ``engine.compute.measure_matmul_peak`` (a square matmul grown until
  one takes 50 ms) in the step's dtype with the same thread count; on CUDA, the step runs under
  bf16 autocast and the peak is the vendor's dense bf16 figure from ``engine.compute.table_peak``
  (a measured bf16 matmul for a GPU not in the table);
- ``utilisation``: achieved / peak, what ``ren show`` reports for a run on this machine.

On a CPU the same three are also given in process CPU time (``time.process_time``, one torch
thread): the step's CPU seconds, and a 2048x2048 matmul's CPU seconds for the peak. Wall times on
a shared machine swing with the other load (the alternation spreads that over both sides); CPU
times stay near what an idle core does.

Without a PRESET it measures ``presets/quickstart.toml`` and the freezing study's pretraining
(``presets/studies/easyvqa_two_tower_pretrain_short.toml``, its towers random with the same
architecture as ``ren:easyvqa-vit``/``ren:easyvqa-bert``) and writes its section of
``bench/RESULTS.md``; with a PRESET, or ``--quick``, it only prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402

RANDOM_TOWERS = ['model.vision.source="random"', 'model.text.source="random"']
DEFAULTS = [
    ("quickstart", REPO / "presets" / "quickstart.toml", []),
    ("easyvqa_two_tower_pretrain_short (random towers)",
     REPO / "presets" / "studies" / "easyvqa_two_tower_pretrain_short.toml", RANDOM_TOWERS),
]


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def cpu_time_matmul_peak(dtype: str, *, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an ``n``x``n`` matmul on the CPU in process CPU time (the median of ``repeats``)."""
    import torch

    g = torch.Generator().manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a, b = (torch.randn(n, n, generator=g).to(torch_dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        torch.mm(a, b)
        seconds.append(time.process_time() - start)
    return 2 * n**3 / median(seconds)


def measure(preset: Path, overrides: list[str], *, steps: int, repeats: int, batch: int | None) -> dict[str, Any]:
    """One preset's FLOPs per step, step time, peak and utilisation (medians over ``repeats`` rounds)."""
    import torch
    from torch.utils.data import DataLoader

    from engine.compute import FlopMeter, device_label, measure_matmul_peak, table_peak
    from engine.config import load_preset
    from engine.data.pipeline import build_data
    from engine.models import build_model
    from engine.store import default_root
    from engine.train import EpochSampler, _finetune_step, _identity, _pretrain_step, build_optimizer

    cfg = load_preset(preset, [*overrides, *([f"train.batch_size={batch}"] if batch else [])])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # the dtype the step runs in, as under accelerate: bf16 autocast, or none (accelerate runs no fp16
    # autocast on a CPU, so fp16 trains in fp32 there and its peak is the fp32 one)
    dtype = "bf16" if cuda or cfg.train.mixed_precision == "bf16" else "fp32"
    data = build_data(cfg, cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_root() / "cache")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers).to(device).train()
    o = cfg.optim
    optimizer = build_optimizer(model, o, device)
    step_fn = _pretrain_step if cfg.objectives else _finetune_step
    loader = DataLoader(data.train, batch_size=cfg.train.batch_size, sampler=EpochSampler(len(data.train), 0),
                        collate_fn=_identity, drop_last=True)
    batches = iter(loader)
    prefetched = [_to(next(batches), device) for _ in range(min(steps, 4))]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    meter = FlopMeter()
    done = [0]
    cpu_steps: list[float] = []

    def step() -> None:
        batch = prefetched[done[0] % len(prefetched)]
        gen = torch.Generator().manual_seed(cfg.run.seed * 7_919 + done[0] * 131)
        with meter.count("forward", batch), autocast:
            loss, _ = step_fn(model, batch, cfg, data, gen)
        with meter.count("backward", batch):
            loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done[0] += 1

    def step_seconds() -> float:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        sync()
        cpu_steps.append((time.process_time() - cpu) / steps)
        return (time.perf_counter() - start) / steps

    step()  # counted (and warms up)
    name = device_label(device)
    vendor = table_peak(name, dtype) if cuda else None
    sides = {"step": step_seconds}
    if vendor is None:
        sides["peak"] = lambda: measure_matmul_peak(device, dtype, repeats=3)
    if not cuda:
        sides["peak_cpu_time"] = lambda: cpu_time_matmul_peak(dtype)
    rounds = alternate(sides, repeats)
    step_s = median(rounds["step"])
    peak = vendor if vendor is not None else median(rounds["peak"])
    flops_per_step = meter.train * cfg.train.batch_size
    cpu_time: dict[str, float] = {}
    if not cuda:
        step_cpu, peak_cpu = median(cpu_steps), median(rounds["peak_cpu_time"])
        cpu_time = {"step_cpu_s": step_cpu, "achieved_flops_cpu_time": flops_per_step / step_cpu,
                    "peak_flops_cpu_time": peak_cpu, "utilisation_cpu_time": flops_per_step / step_cpu / peak_cpu}
    return {
        "preset": str(preset.relative_to(REPO)) if preset.is_relative_to(REPO) else str(preset),
        "overrides": overrides, "model": cfg.model.kind, "batch": cfg.train.batch_size, "device": name,
        "dtype": dtype, "threads": torch.get_num_threads(), "flops_per_sample": meter.per_sample(),
        "flops_per_step": flops_per_step, "step_s": step_s, "achieved_flops": flops_per_step / step_s,
        "peak_flops": peak, "peak_source": "vendor table" if vendor is not None else "measured matmul",
        "utilisation": flops_per_step / step_s / peak, **cpu_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", help="measure this preset only (prints, writes nothing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of step timing and peak")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, prints only (never writes RESULTS.md)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.batch = 1, 1, args.batch or 8

    import torch

    torch.set_num_threads(args.threads)
    cases = ([(args.preset, Path(args.preset).resolve(), args.overrides)] if args.preset
             else [(name, path, [*extra, *args.overrides]) for name, path, extra in DEFAULTS])
    rows, results = [], []
    for name, path, overrides in cases:
        r = measure(path, overrides, steps=args.steps, repeats=args.repeats, batch=args.batch)
        print(json.dumps(r, indent=1))
        results.append(r)
        unit, scale = ("GFLOP/s", 1e9) if r["device"].startswith("cpu") else ("TFLOP/s", 1e12)
        cpu = ([f"{r['step_cpu_s'] * 1e3:.0f}", f"{r['achieved_flops_cpu_time'] / scale:.2f} {unit}",
                f"{r['peak_flops_cpu_time'] / scale:.2f} {unit}", f"{r['utilisation_cpu_time']:.1%}"]
               if "step_cpu_s" in r else ["-"] * 4)
        rows.append([name, r["device"], r["dtype"], r["threads"], r["batch"], f"{r['flops_per_step'] / 1e9:.2f}",
                     f"{r['step_s'] * 1e3:.0f}", f"{r['achieved_flops'] / scale:.2f} {unit}",
                     f"{r['peak_flops'] / scale:.2f} {unit} ({r['peak_source']})", f"{r['utilisation']:.1%}", *cpu])
    text = table(["preset", "device", "dtype", "threads", "batch", "GFLOPs / step", "step wall ms", "achieved (wall)",
                  "peak (wall)", "utilisation (wall)", "step CPU ms", "achieved (CPU time)",
                  "peak (CPU time, 2048² matmul)", "utilisation (CPU time)"], rows)
    print(text)
    if args.quick or args.preset:
        return
    gpu = any(not r["device"].startswith("cpu") for r in results)
    note = ("" if gpu else "No GPU was available: these are CPU figures (fp32 against a measured fp32 matmul of the "
            "same thread count; and the same in process CPU time, which the machine's other load disturbs far "
            "less). On CUDA the script runs the step under bf16 autocast and reports achieved TFLOP/s "
            "against the device's dense bf16 peak from `engine.compute.GPU_PEAKS`.\n\n")
    body = (
        f"{note}FLOPs per step from `FlopMeter` (matmuls, convolutions, attention: 2 per multiply-add; elementwise "
        f"ops, norms, softmax and the optimizer are not counted). Medians of {args.repeats} alternating rounds of "
        f"{args.steps} training steps and one peak measurement.\n\n" + text
    )
    write_section("flops_utilisation", "Utilisation: achieved FLOP/s of a training step against the peak", body)


if __name__ == "__main__":
    main()
