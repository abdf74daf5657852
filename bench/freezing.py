"""Freezing: FLOPs, step time and peak memory of a training step for each freeze setting.

    .venv/bin/python bench/freezing.py [--repeats 15] [--steps 3] [--quick]
    python3 bench/freezing.py --device cuda [--dtype bf16] [--preset NAME] [--results FILE] [--json FILE]

For each preset (the freezing study's two-tower pretraining, its towers ``ren:easyvqa-vit`` and
``ren:easyvqa-bert`` built with random weights of the same architecture, so nothing is trained
first; and ``presets/easyvqa_pretrain.toml``) and each freeze setting (none, vision, text, both,
and the bottom half of each tower: its embeddings and the first half of its layers), the model is
built as the trainer builds it: the same seed, ``engine.freeze.apply_freeze`` with the setting's
``freeze.groups``, the trainer's AdamW (``engine.train.build_optimizer``: trainable parameters only, fused), and the
trainer's step (``engine.train._pretrain_step`` forward, ``backward()``, gradient clipping,
``optimizer.step()``, ``zero_grad``) on the same pre-fetched batches.

- FLOPs per step: ``engine.compute.FlopMeter`` over one step (forward and backward counted apart;
  matmuls, convolutions and attention, as ``flop_counter`` counts them). Autograd runs only what the
  trainable parameters need, so these are the FLOPs the step performs, and
  theoretical saving = 1 - FLOPs(setting) / FLOPs(none).
- Step time: ``--steps`` steps per call, the settings called round-robin ``--repeats`` times with
  rotating order (``bench/_results.alternate``), so load on a shared machine hits all alike; the
  median over calls of the mean step time, both the process's CPU time (``time.process_time``) and
  wall time (split into forward, backward and optimizer: clip + step + zero_grad). With one torch
  thread CPU time is the step's compute, and it stays steady when other work shares the cores, where
  wall time swings several-fold; so measured saving = 1 - cpu(setting) / cpu(none) is the one judged,
  the wall figures are shown next to it. The target is measured / theoretical >= 0.8 for the
  whole-tower settings (vision, text, both).
- Peak memory: a fresh interpreter per setting builds the same model and batches, then resets its
  peak resident set size (``/proc/self/clear_refs`` = 5, Linux) and runs ``--steps`` steps; the
  step's memory is peak RSS (``VmHWM``) less the RSS before the first step: activations kept for
  backward, gradients, AdamW state (created by the first step) and allocator workspace. CPU tensors
  are invisible to ``tracemalloc``, and a fresh process keeps one setting's freed arena pages from
  hiding the next one's peak.

On a GPU (``--device cuda``, ``bench/gpu_check.sh``) the default preset is the paper's pair,
``presets/electra_deit_two_tower_pretrain.toml`` with both towers random (ELECTRA-small and DeiT-tiny
configs, so no weights are needed; batch 256, bf16 autocast as the preset sets it); step times are wall
times with the device synchronised around each phase (process CPU time measures launches there, not work),
so the judged saving is the wall one; and the step's memory is CUDA's peak allocation during ``--steps``
steps over what was allocated before them (weights, AdamW state and any kept gradients), in the same
process. The section is ``freezing_gpu`` (of ``--results``, default ``bench/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import RESULTS, alternate, median, table, write_section  # noqa: E402

RANDOM_TOWERS = ['model.vision.source="random"', 'model.text.source="random"']
PRESETS: dict[str, tuple[Path, list[str]]] = {
    "easyvqa_two_tower_pretrain_short (random towers)": (
        REPO / "presets" / "studies" / "easyvqa_two_tower_pretrain_short.toml", RANDOM_TOWERS),
    "easyvqa_pretrain": (REPO / "presets" / "easyvqa_pretrain.toml", []),
}
CPU_PRESETS = tuple(PRESETS)
# the paper's pair with random towers of the real configs (the hub's config.json, from its cache)
PRESETS["electra_deit_two_tower_pretrain (random towers)"] = (
    REPO / "presets" / "electra_deit_two_tower_pretrain.toml", RANDOM_TOWERS)
GPU_PRESETS = ("electra_deit_two_tower_pretrain (random towers)",)
WHOLE_TOWER = ("vision", "text", "both")
TARGET = 0.8
_INDEXED = re.compile(r"^(?P<head>[^\[]+)\[(?P<index>\d+)\]$")


def settings(group_names: list[str]) -> dict[str, tuple[str, ...]]:
    """Freeze setting -> ``freeze.groups``: none, whole towers, and each tower's bottom half (the groups
    before its first layer, then layers ``[0:n//2]`` of its ``n``)."""
    out: dict[str, tuple[str, ...]] = {"none": (), "vision": ("vision",), "text": ("text",),
                                       "both": ("text", "vision")}
    for tower in ("vision", "text"):
        names = [n for n in group_names if n.split(".")[0].split("[")[0] == tower]
        layers = [n for n in names if _INDEXED.match(n)]
        if len(layers) < 2:
            continue
        first = names.index(layers[0])
        head = _INDEXED.match(layers[0])["head"]
        out[f"{tower} bottom half"] = (*names[:first], f"{head}[0:{len(layers) // 2}]")
    return out


def cache_dir() -> Path:
    from engine.store import default_root

    return default_root() / "cache"


class Bench:
    """One preset's data, pre-fetched batches and step, shared by its settings."""

    def __init__(self, preset: Path, overrides: list[str], batch: int, n_batches: int, device: str = "cpu",
                 dtype: str | None = None) -> None:
        import contextlib

        import torch
        from torch.utils.data import DataLoader

        from engine.config import load_preset
        from engine.data.pipeline import build_data
        from engine.train import EpochSampler, _finetune_step, _identity, _pretrain_step

        self.cfg = load_preset(preset, [*overrides, f"train.batch_size={batch}"])
        self.data = build_data(self.cfg, cache_dir=cache_dir())
        loader = DataLoader(self.data.train, batch_size=batch, sampler=EpochSampler(len(self.data.train), 0),
                            collate_fn=_identity, drop_last=True)
        batches = iter(loader)
        self.device = torch.device(device)
        self.batches = [{k: v.to(self.device) if hasattr(v, "to") else v for k, v in next(batches).items()}
                        for _ in range(n_batches)]
        self.step_fn = _pretrain_step if self.cfg.objectives else _finetune_step
        self.torch = torch
        # the forward's precision: --dtype, else the preset's (as the trainer runs it on this device)
        self.dtype = dtype or ("bf16" if self.cfg.train.mixed_precision == "bf16" else "fp32")
        self.autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16)) if self.dtype == "bf16"
                         else contextlib.nullcontext)
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if device == "cuda" else (lambda: None)
        self.group_names = list(self.model().groups())

    def model(self) -> Any:
        """The preset's model, with the same initial weights each time."""
        from engine.models import build_model

        self.torch.manual_seed(self.cfg.run.seed)
        model = build_model(self.cfg, vocab_size=self.data.vocab_size, num_answers=self.data.num_answers)
        return model.to(self.device)

    def side(self, groups: tuple[str, ...]) -> Side:

        from engine.config import FreezeConfig
        from engine.freeze import apply_freeze
        from engine.train import build_optimizer

        model = self.model()
        report = apply_freeze(model, FreezeConfig(groups=groups))
        model.train()
        o = self.cfg.optim
        optimizer = build_optimizer(model, o, self.device)
        return Side(self, model, optimizer, report.trainable, report.total)


class Side:
    """A model frozen one way, its optimizer, and the trainer's step over the shared batches."""

    def __init__(self, bench: Bench, model: Any, optimizer: Any, trainable: int, total: int) -> None:
        self.bench, self.model, self.optimizer = bench, model, optimizer
        self.trainable, self.total = trainable, total
        self.steps_done = 0
        self.splits: list[tuple[float, float, float]] = []
        self.cpu: list[float] = []

    def step(self, meter: Any = None) -> tuple[float, float, float]:
        """One training step as ``engine.train.train`` runs it; (forward, backward, optimizer) seconds."""
        import contextlib

        torch, cfg, b = self.bench.torch, self.bench.cfg, self.bench
        batch = b.batches[self.steps_done % len(b.batches)]
        gen = torch.Generator().manual_seed(cfg.run.seed * 7_919 + self.steps_done * 131)
        count = meter.count if meter is not None else (lambda *_: contextlib.nullcontext())
        b.sync()
        t0 = time.perf_counter()
        with count("forward", batch), b.autocast():
            loss, _ = b.step_fn(self.model, batch, cfg, b.data, gen)
        b.sync()
        t1 = time.perf_counter()
        with count("backward", batch):
            loss.backward()
        b.sync()
        t2 = time.perf_counter()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        b.sync()
        t3 = time.perf_counter()
        self.steps_done += 1
        return t1 - t0, t2 - t1, t3 - t2

    def timed_call(self, steps: int) -> float:
        """Mean wall seconds per step over ``steps`` steps (their phase split is kept in ``splits``, the
        process's mean CPU seconds per step in ``cpu``)."""
        cpu = time.process_time()
        parts = [self.step() for _ in range(steps)]
        self.cpu.append((time.process_time() - cpu) / steps)
        mean = tuple(sum(p[i] for p in parts) / steps for i in range(3))
        self.splits.append(mean)  # type: ignore[arg-type]
        return sum(mean)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(preset_name: str, setting: str, batch: int, steps: int) -> None:
    """Run in a fresh interpreter: print the step's peak RSS growth (MiB) for one setting as JSON."""
    import torch

    torch.set_num_threads(1)
    path, overrides = PRESETS[preset_name]
    bench = Bench(path, overrides, batch, n_batches=steps)
    side = bench.side(settings(bench.group_names)[setting])
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        side.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}))


def measure_memory(preset_name: str, setting: str, batch: int, steps: int) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", preset_name, setting,
           "--batch", str(batch), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {preset_name} / {setting} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["step_mib"])


def cuda_step_memory(side: Side, steps: int) -> float:
    """MiB CUDA allocates at its peak during ``steps`` steps of ``side`` over what was allocated before them."""
    import torch

    side.bench.sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        side.step()
    side.bench.sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_preset(name: str, batch: int, steps: int, repeats: int, memory: tuple[str, ...] | None,
               device: str = "cpu", dtype: str | None = None) -> tuple[list[list[object]], dict[str, Any]]:
    """The table rows of one preset (and the raw figures); ``memory``: the settings whose memory is
    measured (None: all). On CUDA the judged saving is the wall time's, and memory is CUDA's peak."""
    from engine.compute import FlopMeter

    path, overrides = PRESETS[name]
    bench = Bench(path, overrides, batch, n_batches=max(steps, 4), device=device, dtype=dtype)
    setups = settings(bench.group_names)
    sides = {s: bench.side(groups) for s, groups in setups.items()}
    flops: dict[str, tuple[float, float]] = {}
    for s, side in sides.items():
        meter = FlopMeter()
        side.step(meter)  # counted, and warms up (AdamW state is created here)
        flops[s] = (meter.forward * batch, meter.backward * batch)
    times = alternate({s: (lambda side=side: side.timed_call(steps)) for s, side in sides.items()}, repeats)
    if device == "cuda":
        mem = {s: cuda_step_memory(side, steps) for s, side in sides.items() if memory is None or s in memory}
    else:
        mem = {s: measure_memory(name, s, batch, steps) for s in sides if memory is None or s in memory}
    cuda = device == "cuda"

    t_none, c_none, f_none = median(times["none"]), median(sides["none"].cpu), sum(flops["none"])
    rows: list[list[object]] = []
    raw: dict[str, Any] = {}
    for s, side in sides.items():
        t, c = median(times[s]), median(side.cpu)
        fwd, bwd, opt = (median([split[i] for split in side.splits]) for i in range(3))
        theory = 1 - sum(flops[s]) / f_none
        wall_saving, cpu_saving = 1 - t / t_none, 1 - c / c_none
        judged = wall_saving if cuda else cpu_saving  # on a GPU the CPU time is launches and waiting
        ratio = judged / theory if theory > 0 else None
        wall_ratio = wall_saving / theory if theory > 0 else None
        verdict = ("met" if ratio is not None and ratio >= TARGET else "MISSED") if s in WHOLE_TOWER else "-"
        rows.append([
            s, ", ".join(setups[s]) or "-", f"{side.trainable / 1e6:.2f} / {side.total / 1e6:.2f}",
            f"{flops[s][0] / 1e9:.2f} / {flops[s][1] / 1e9:.2f}", f"{theory:.1%}",
            f"{c * 1e3:.0f}", f"{judged:.1%}", "-" if ratio is None else f"{ratio:.2f}",
            f"{t * 1e3:.0f} ({fwd * 1e3:.0f} / {bwd * 1e3:.0f} / {opt * 1e3:.0f})",
            f"{wall_saving:.1%}" + ("" if wall_ratio is None else f" ({wall_ratio:.2f})"),
            f"{mem[s]:.0f}" if s in mem else "-", verdict,
        ])
        raw[s] = {"groups": setups[s], "trainable": side.trainable, "gflops_fwd": flops[s][0] / 1e9,
                  "gflops_bwd": flops[s][1] / 1e9, "theoretical_saving": theory, "cpu_ms": c * 1e3,
                  "wall_ms": t * 1e3, "fwd_bwd_opt_wall_ms": [fwd * 1e3, bwd * 1e3, opt * 1e3],
                  "cpu_saving": cpu_saving, "wall_saving": wall_saving, "ratio": ratio,
                  "judged_saving": judged, "dtype": bench.dtype, "device": device,
                  "step_memory_mib": mem.get(s), "wall_ms_per_call": [x * 1e3 for x in times[s]],
                  "cpu_ms_per_call": [x * 1e3 for x in side.cpu]}
    return rows, raw


HEADERS = ["setting", "freeze.groups", "trainable / total params (M)", "GFLOPs fwd / bwd per step",
           "theoretical saving", "step CPU ms", "measured saving (CPU)", "measured / theoretical",
           "step wall ms (fwd / bwd / opt)", "wall saving (/ theoretical)", "step memory MiB", "target >= 0.8"]
GPU_HEADERS = [*HEADERS[:6], "measured saving (wall)", *HEADERS[7:10], "step peak CUDA MiB (over resident)",
               HEADERS[11]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="round-robin rounds over the settings")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed call")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, prints only (writes a section only where --results names a file)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="train there (section freezing_gpu; on cuda the paper's pair by default)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="the forward's precision (default: the preset's train.mixed_precision)")
    parser.add_argument("--preset", action="append", choices=tuple(PRESETS), default=None,
                        help="measure this preset (repeatable; default: the easy-VQA pair, on cuda the paper's)")
    parser.add_argument("--results", type=Path, default=None, help="write the section here (default "
                        "bench/RESULTS.md; with --quick only when given)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--memory-child", nargs=2, metavar=("PRESET", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.steps)
        return
    device = args.device or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.quick:
        args.repeats, args.steps, args.batch = 2, 1, args.batch or 8
    names = args.preset or (GPU_PRESETS if device == "cuda" else CPU_PRESETS)
    sections, raws = [], {}
    for name in names:
        from engine.config import load_preset

        path, overrides = PRESETS[name]
        batch = args.batch or load_preset(path, overrides).train.batch_size
        rows, raw = run_preset(name, batch, args.steps, args.repeats,
                               memory=("none", "both") if args.quick and device == "cpu" else None,
                               device=device, dtype=args.dtype)
        dtype = next(iter(raw.values()))["dtype"]
        text = f"### {name}, batch {batch}, {dtype}\n\n{table(GPU_HEADERS if device == 'cuda' else HEADERS, rows)}"
        print(text + "\n")
        print(json.dumps(raw, indent=1))
        sections.append(text)
        raws[name] = {"batch": batch, "settings": raw}
    if args.json:
        args.json.write_text(json.dumps({"device": device, "presets": raws}, indent=1, default=str))
    if args.quick and args.results is None:
        return
    if args.device is None:
        body = (
            f"Per setting: FLOPs of one training step (`FlopMeter`), median step time over {args.repeats} "
            f"round-robin calls of {args.steps} steps each, as process CPU time (judged: steady under the "
            "machine's other load) and wall time (forward / backward / optimizer split), and the step's "
            "peak memory (peak RSS growth over the steps in a fresh process per setting: activations, gradients, "
            f"AdamW state, workspace). {torch.get_num_threads()} torch thread(s), fp32, CPU (no GPU available). "
            "Theoretical saving = 1 - FLOPs/FLOPs(none); measured saving = 1 - cpu/cpu(none); target: measured / "
            f"theoretical >= {TARGET} for vision, text, both.\n\n" + "\n\n".join(sections)
        )
        write_section("freezing", "Freezing: step time and memory per freeze setting", body,
                      path=args.results or RESULTS)
        return
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    memory = ("CUDA's peak allocation during the steps over what was allocated before them (activations, "
              "gradients, workspace; the weights and AdamW state are resident)" if device == "cuda" else
              "peak RSS growth in a fresh process (quick runs: none and both only)")
    body = (
        f"On {where}. Per setting: FLOPs of one training step (`FlopMeter`), median wall step time over "
        f"{args.repeats} round-robin calls of {args.steps} steps each, the device synchronised around each phase "
        f"(forward / backward / optimizer split), and the step's memory: {memory}. Theoretical saving = 1 - "
        "FLOPs/FLOPs(none); measured saving = 1 - wall/wall(none) (on a GPU the process's CPU time counts "
        f"launches, not work); target: measured / theoretical >= {TARGET} for vision, text, both.\n\n"
        + "\n\n".join(sections)
    )
    write_section("freezing_gpu", f"Freezing on the GPU: step time and memory per freeze setting ({where})", body,
                  path=args.results or RESULTS)


if __name__ == "__main__":
    main()
