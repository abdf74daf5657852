"""Freezing: FLOPs, step time and peak memory of a training step for each freeze setting.

    .venv/bin/python bench/freezing.py [--repeats 15] [--steps 3] [--quick]

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

from bench._results import alternate, median, table, write_section  # noqa: E402

RANDOM_TOWERS = ['model.vision.source="random"', 'model.text.source="random"']
PRESETS: dict[str, tuple[Path, list[str]]] = {
    "easyvqa_two_tower_pretrain_short (random towers)": (
        REPO / "presets" / "studies" / "easyvqa_two_tower_pretrain_short.toml", RANDOM_TOWERS),
    "easyvqa_pretrain": (REPO / "presets" / "easyvqa_pretrain.toml", []),
}
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

    def __init__(self, preset: Path, overrides: list[str], batch: int, n_batches: int) -> None:
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
        self.batches = [next(batches) for _ in range(n_batches)]
        self.step_fn = _pretrain_step if self.cfg.objectives else _finetune_step
        self.torch = torch
        self.group_names = list(self.model().groups())

    def model(self) -> Any:
        """The preset's model, with the same initial weights each time."""
        from engine.models import build_model

        self.torch.manual_seed(self.cfg.run.seed)
        return build_model(self.cfg, vocab_size=self.data.vocab_size, num_answers=self.data.num_answers)

    def side(self, groups: tuple[str, ...]) -> Side:
        import torch

        from engine.config import FreezeConfig
        from engine.freeze import apply_freeze
        from engine.train import build_optimizer

        model = self.model()
        report = apply_freeze(model, FreezeConfig(groups=groups))
        model.train()
        o = self.cfg.optim
        optimizer = build_optimizer(model, o, torch.device("cpu"))
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
        t0 = time.perf_counter()
        with count("forward", batch):
            loss, _ = b.step_fn(self.model, batch, cfg, b.data, gen)
        t1 = time.perf_counter()
        with count("backward", batch):
            loss.backward()
        t2 = time.perf_counter()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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


def run_preset(name: str, batch: int, steps: int, repeats: int,
               memory: tuple[str, ...] | None) -> tuple[list[list[object]], dict[str, Any]]:
    """The table rows of one preset (and the raw figures); ``memory``: the settings whose memory is
    measured (None: all)."""
    from engine.compute import FlopMeter

    path, overrides = PRESETS[name]
    bench = Bench(path, overrides, batch, n_batches=max(steps, 4))
    setups = settings(bench.group_names)
    sides = {s: bench.side(groups) for s, groups in setups.items()}
    flops: dict[str, tuple[float, float]] = {}
    for s, side in sides.items():
        meter = FlopMeter()
        side.step(meter)  # counted, and warms up (AdamW state is created here)
        flops[s] = (meter.forward * batch, meter.backward * batch)
    times = alternate({s: (lambda side=side: side.timed_call(steps)) for s, side in sides.items()}, repeats)
    mem = {s: measure_memory(name, s, batch, steps) for s in sides if memory is None or s in memory}

    t_none, c_none, f_none = median(times["none"]), median(sides["none"].cpu), sum(flops["none"])
    rows: list[list[object]] = []
    raw: dict[str, Any] = {}
    for s, side in sides.items():
        t, c = median(times[s]), median(side.cpu)
        fwd, bwd, opt = (median([split[i] for split in side.splits]) for i in range(3))
        theory = 1 - sum(flops[s]) / f_none
        wall_saving, cpu_saving = 1 - t / t_none, 1 - c / c_none
        ratio = cpu_saving / theory if theory > 0 else None
        wall_ratio = wall_saving / theory if theory > 0 else None
        verdict = ("met" if ratio is not None and ratio >= TARGET else "MISSED") if s in WHOLE_TOWER else "-"
        rows.append([
            s, ", ".join(setups[s]) or "-", f"{side.trainable / 1e6:.2f} / {side.total / 1e6:.2f}",
            f"{flops[s][0] / 1e9:.2f} / {flops[s][1] / 1e9:.2f}", f"{theory:.1%}",
            f"{c * 1e3:.0f}", f"{cpu_saving:.1%}", "-" if ratio is None else f"{ratio:.2f}",
            f"{t * 1e3:.0f} ({fwd * 1e3:.0f} / {bwd * 1e3:.0f} / {opt * 1e3:.0f})",
            f"{wall_saving:.1%}" + ("" if wall_ratio is None else f" ({wall_ratio:.2f})"),
            f"{mem[s]:.0f}" if s in mem else "-", verdict,
        ])
        raw[s] = {"groups": setups[s], "trainable": side.trainable, "gflops_fwd": flops[s][0] / 1e9,
                  "gflops_bwd": flops[s][1] / 1e9, "theoretical_saving": theory, "cpu_ms": c * 1e3,
                  "wall_ms": t * 1e3, "fwd_bwd_opt_wall_ms": [fwd * 1e3, bwd * 1e3, opt * 1e3],
                  "cpu_saving": cpu_saving, "wall_saving": wall_saving, "ratio": ratio,
                  "step_memory_mib": mem.get(s), "wall_ms_per_call": [x * 1e3 for x in times[s]],
                  "cpu_ms_per_call": [x * 1e3 for x in side.cpu]}
    return rows, raw


HEADERS = ["setting", "freeze.groups", "trainable / total params (M)", "GFLOPs fwd / bwd per step",
           "theoretical saving", "step CPU ms", "measured saving (CPU)", "measured / theoretical",
           "step wall ms (fwd / bwd / opt)", "wall saving (/ theoretical)", "step memory MiB", "target >= 0.8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="round-robin rounds over the settings")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed call")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, prints only (never writes RESULTS.md)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", nargs=2, metavar=("PRESET", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.steps)
        return
    if args.quick:
        args.repeats, args.steps, args.batch = 2, 1, args.batch or 8
    sections = []
    for name, (path, _) in PRESETS.items():
        from engine.config import load_preset

        batch = args.batch or load_preset(path, PRESETS[name][1]).train.batch_size
        rows, raw = run_preset(name, batch, args.steps, args.repeats,
                               memory=("none", "both") if args.quick else None)
        text = f"### {name}, batch {batch}\n\n{table(HEADERS, rows)}"
        print(text + "\n")
        print(json.dumps(raw, indent=1))
        sections.append(text)
    if args.quick:
        return
    body = (
        f"Per setting: FLOPs of one training step (`FlopMeter`), median step time over {args.repeats} "
        f"round-robin calls of {args.steps} steps each, as process CPU time (judged: steady under the machine's "
        "other load) and wall time (forward / backward / optimizer split), and the step's "
        "peak memory (peak RSS growth over the steps in a fresh process per setting: activations, gradients, "
        f"AdamW state, workspace). {torch.get_num_threads()} torch thread(s), fp32, CPU (no GPU available). "
        "Theoretical saving = 1 - FLOPs/FLOPs(none); measured saving = 1 - cpu/cpu(none); target: measured / "
        f"theoretical >= {TARGET} for vision, text, both.\n\n" + "\n\n".join(sections)
    )
    write_section("freezing", "Freezing: step time and memory per freeze setting", body)


if __name__ == "__main__":
    main()
