"""Shared by the benchmarks: alternating side-by-side timing, the machine's description, and
``bench/RESULTS.md``, where each benchmark rewrites only its own section.

A section is delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; it carries the
command that produced it and the machine it ran on, so sections measured on different days (or on
a GPU machine) stay honest about where their numbers come from.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
_HEADER = (
    "# Benchmark results\n\n"
    "Measured by the scripts in `bench/`; each section is rewritten by the script named in it and says\n"
    "which machine it ran on. Times are medians over alternating repetitions (both sides measured\n"
    "back to back in one process, so load on a shared machine hits both alike); ratios are of medians.\n"
)


def alternate(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each side once per round, ``repeats`` rounds, rotating which side goes first; each call
    returns its own measurement (seconds, or a rate). Returns every side's measurements."""
    names = list(sides)
    out: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            out[name].append(sides[name]())
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes (``sync``: e.g. ``torch.cuda.synchronize``, before and after)."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> str:
    """One line: CPU, cores, memory, GPU when given, library versions, load average, date."""
    import torch

    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    if (gib := _memory_gib()) is not None:
        parts.append(f"{gib:.0f} GiB")
    if device:
        parts.append(device)
    elif torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    else:
        parts.append("no GPU")
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("transformers", "timm", "textual"):
        module = sys.modules.get(name)
        if module is not None:
            versions.append(f"{name} {module.__version__}")
    parts.append(", ".join(versions))
    try:
        parts.append("load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    except OSError:
        pass
    parts.append(dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return "; ".join(parts)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, *, device: str | None = None,
                  path: Path = RESULTS) -> None:
    """Replace (or append) section ``name`` of RESULTS.md: its title, the command that ran, the
    machine, then ``body`` (Markdown)."""
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *_relative_argv()])
    section = (f"<!-- bench:{name} -->\n## {title}\n\n`{command}`\n\nMachine: {machine(device)}\n\n"
               f"{body.strip()}\n<!-- /bench:{name} -->")
    _put_section(path, name, section)


def _section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)


def _put_section(path: Path, name: str, section: str) -> None:
    """Replace section ``name`` of ``path`` with ``section`` (whole, markers included), or append it."""
    text = path.read_text() if path.exists() else _HEADER
    pattern = _section_pattern(name)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def merge_sections(source: Path, target: Path = RESULTS) -> list[str]:
    """Copy every section of ``source`` (a file the benchmarks wrote with ``--results``, e.g. the GPU
    check's ``RESULTS.gpu.md``) into ``target``, each replacing its namesake or appended; returns their
    names. Sections of ``target`` that ``source`` does not hold are left as they are."""
    text = source.read_text()
    names = re.findall(r"<!-- bench:([\w.-]+) -->", text)
    for name in names:
        _put_section(target, name, _section_pattern(name).search(text).group(0))
    return names


def _relative_argv() -> list[str]:
    script = Path(sys.argv[0]).resolve()
    try:
        first = str(script.relative_to(REPO))
    except ValueError:
        first = sys.argv[0]
    return [first, *sys.argv[1:]]


def params(module: Any) -> int:
    """Parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())


def time_steps(sides: dict[str, Callable[[], None]], repeats: int, steps: int,
               sync: Callable[[], None] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Each side's training step, ``steps`` at a time, alternating over ``repeats`` rounds after one warm-up
    call each (allocator, optimizer state). Returns the medians of the wall seconds and of the process CPU
    seconds per step, by side; with one thread the CPU time is the work done, whatever share of a core a
    shared machine left the process. ``sync`` (a GPU's synchronize) runs before and after each timed call, so
    the wall time covers the queued device work; the CPU time then means little (launches and waiting)."""
    for step in sides.values():
        step()
    cpu: dict[str, list[float]] = {name: [] for name in sides}

    def measured(name: str, step: Callable[[], None]) -> Callable[[], float]:
        def side() -> float:
            start = time.process_time()
            wall = timed(lambda: [step() for _ in range(steps)], sync) / steps
            cpu[name].append((time.process_time() - start) / steps)
            return wall
        return side

    walls = alternate({name: measured(name, step) for name, step in sides.items()}, repeats)
    return ({name: median(v) for name, v in walls.items()}, {name: median(v) for name, v in cpu.items()})


def vqa_inputs(*, batch: int, text_len: int, vocab: int, image: int, answers: int, cls_id: int | None = None,
               seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """Token ids padded to varied lengths (row 0 full), their mask, images and soft VQA targets (three
    answers a row, scored 1, 0.6 and 0.3); ``cls_id`` starts every row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, text_len), generator=g)
    lengths = torch.randint(text_len // 4, text_len + 1, (batch,), generator=g)
    lengths[0] = text_len
    mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    if cls_id is not None:
        ids[:, 0] = cls_id
    pixels = torch.randn(batch, 3, image, image, generator=g)
    targets = torch.zeros(batch, answers)
    for row in range(batch):
        picks = torch.randint(0, answers, (3,), generator=g)
        targets[row, picks] = torch.tensor([1.0, 0.6, 0.3])
    return ids, mask, pixels, targets


TARGET_RATIO = 1.2  # ren / reference samples/s, issue 7's target for both step-throughput comparisons


def step_result(size: Any, ren: Any, ref: Any, wall: dict[str, float], cpu: dict[str, float],
                flops: dict[str, float] | None = None, peak: float | None = None) -> dict:
    """One size row of a step-throughput comparison, from :func:`time_steps`'s medians; with ``flops`` (each
    side's FLOPs per training step, :func:`step_flops`) and the matmul ``peak`` (FLOP/s), also each side's
    achieved FLOP/s and its MFU (achieved / peak)."""
    out = {"size": size, "ren_params": params(ren), "ref_params": params(ref), "ren_s": wall["ren"],
           "ref_s": wall["ref"], "ratio": wall["ref"] / wall["ren"], "ren_cpu": cpu["ren"], "ref_cpu": cpu["ref"],
           "cpu_ratio": cpu["ref"] / cpu["ren"]}
    if flops is not None:
        for side in ("ren", "ref"):
            out[f"{side}_flops"] = flops[side]
            out[f"{side}_achieved"] = flops[side] / wall[side]
            if peak:
                out[f"{side}_mfu"] = flops[side] / wall[side] / peak
        out["peak_flops"] = peak
    return out


def _verdict(ratio: float) -> str:
    return "met" if ratio >= TARGET_RATIO else "missed"


def throughput_table(results: list[dict], ren_side: str, ref_side: str, ref_short: str) -> str:
    """The table of :func:`step_result` rows: two lines per size, ren's with the ratios. Rows measured with
    FLOP accounting (``--device``) give each side's GFLOPs per step, achieved TFLOP/s and MFU instead of the
    CPU time, which on a GPU counts launches and waiting, not work."""
    accounted = bool(results) and "ren_flops" in results[0]
    rows = []
    for r in results:
        size = r["size"]
        for side, name, ratio in (("ren", ren_side, f"**{r['ratio']:.2f}** ({_verdict(r['ratio'])})"),
                                  ("ref", ref_side, "1.00")):
            row = [size.label() if side == "ren" else "", name, f"{r[f'{side}_params']:,}",
                   f"{r[f'{side}_s'] * 1e3:.1f}"]
            if accounted:
                mfu = r.get(f"{side}_mfu")
                row += [f"{size.batch / r[f'{side}_s']:.1f}", ratio, f"{r[f'{side}_flops'] / 1e9:.1f}",
                        f"{r[f'{side}_achieved'] / 1e12:.2f}", "-" if mfu is None else f"{mfu:.1%}"]
            else:
                cpu_ratio = f"{r['cpu_ratio']:.2f} ({_verdict(r['cpu_ratio'])})" if side == "ren" else "1.00"
                row += [f"{r[f'{side}_cpu'] * 1e3:.1f}", f"{size.batch / r[f'{side}_s']:.1f}", ratio, cpu_ratio]
            rows.append(row)
    if accounted:
        return table(["sizes", "side", "params", "step ms (median)", "samples/s",
                      f"ratio ren/{ref_short} (target >= {TARGET_RATIO})", "GFLOPs / step", "achieved TFLOP/s",
                      "MFU (of measured matmul peak)"], rows)
    return table(["sizes", "side", "params", "step ms (median)", "CPU ms/step (median)", "samples/s",
                  f"ratio ren/{ref_short} (target >= {TARGET_RATIO})", "CPU-time ratio"], rows)


@dataclass(frozen=True)
class Runtime:
    """Where a step-throughput comparison runs, the same for both sides: ``device`` ("cpu", "cuda") and the
    ``dtype`` of the forward ("fp32", or "bf16": fp32 weights and optimizer under bf16 autocast, as ren's
    trainer (accelerate's ``mixed_precision = "bf16"``) and the Hugging Face Trainer (``bf16=True``) both
    train). ``accounted``: count each side's FLOPs per step and report achieved FLOP/s and MFU against a
    matmul peak measured on the same device and dtype (what ``--device`` asks for)."""

    device: str = "cpu"
    dtype: str = "fp32"
    accounted: bool = False

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    def autocast(self) -> Any:
        import contextlib

        import torch

        if self.dtype == "bf16":
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> Callable[[], None] | None:
        import torch

        return torch.cuda.synchronize if self.device == "cuda" else None

    def describe(self, threads: int) -> str:
        precision = "bf16 autocast over fp32 weights" if self.dtype == "bf16" else "fp32"
        if self.device == "cuda":
            import torch

            return f"{precision} on {torch.cuda.get_device_name()}"
        return f"{precision} on CPU with {threads} thread(s)"


@functools.cache
def matmul_peak(rt: Runtime) -> float:
    """The matmul peak FLOP/s of ``rt``'s device in its dtype, measured here (``engine.compute``'s square
    matmuls on random data, the fastest of the timed ones): on a GPU at 8192 (the size that fills an H100/H200)
    after 10 warm-ups, best of 50 (a matmul there takes about 1.4 ms); on a CPU as ``ren`` measures it."""
    from engine.compute import measure_matmul_peak

    if rt.device == "cuda":
        return measure_matmul_peak(rt.torch_device, rt.dtype, repeats=50, warmup=10, max_size=8192)
    return measure_matmul_peak(rt.torch_device, rt.dtype, repeats=3)


def step_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step`` (a full training step), as ``ren`` counts them
    (``engine.compute.flop_counter``: matmuls, convolutions and attention, forward and backward)."""
    from engine.compute import flop_counter

    with flop_counter() as counter:
        step()
    return float(counter.get_total_flops())


def compared(threads: int, repeats: int, steps: int, ref_short: str, rt: Runtime = Runtime()) -> str:
    """What both step-throughput comparisons time, and how."""
    if rt.accounted:
        timing = ("Step times are wall times with the device synchronised before and after each call. GFLOPs / "
                  "step are each side's own, counted by `engine.compute.flop_counter` over one step (forward "
                  "and backward); achieved TFLOP/s = GFLOPs / step time; MFU = achieved / the "
                  f"{rt.dtype} matmul peak measured in the same process on the same device "
                  "(`bench/_results.matmul_peak`). A side that skips work (ren's last layer computes only the "
                  "rows its head reads) does fewer FLOPs per sample, so its samples/s ratio can exceed its MFU "
                  "ratio.")
    else:
        timing = ("CPU ms/step is the process's CPU time per step\n(`time.process_time`): with one thread it is "
                  "the work done, however much of a core the shared\nmachine left the process, so on a loaded "
                  "machine the CPU-time ratio is the steadier of the two.")
    return f"""What is compared: one full training step (forward, the VQA loss (BCE on soft targets times the
number of answers, as ViLT trains it), backward, fused AdamW step on both sides (ren's trainer and the
Hugging Face Trainer default), zero_grad) on the same inputs for both sides (text rows padded to
different lengths, so both apply a key mask), random init, {rt.describe(threads)}. Sides
alternate, {repeats} rounds of {steps} steps each after one warm-up step; ratio = ren samples/s /
{ref_short} samples/s, of the medians. {timing}"""


def throughput_main(doc: str, name: str, title: str, sizes: tuple[Any, ...], quick_sizes: tuple[Any, ...],
                    measure: Callable[[Any, int, int, Runtime], dict],
                    report: Callable[[list[dict], int, int, int, Runtime], str], reference: str,
                    gpu_sizes: tuple[Any, ...] = ()) -> None:
    """The command line of a step-throughput comparison: ``--repeats``, ``--steps``, ``--threads``,
    ``--quick``, and ``--device``/``--dtype``/``--batch`` for a GPU (or a bf16 dry run on a CPU), ``--results``
    and ``--json``. Measures each size row with ``measure(size, repeats, steps, runtime)`` (a dict with
    ``ren_s``, ``ref_s``, ``ratio``, ``cpu_ratio``) and rewrites section ``name`` after every row, so a
    stopped run still leaves what it measured. With ``--device`` the section is ``NAME_gpu`` (its own, next to
    the CPU one), the sizes ``gpu_sizes`` on CUDA, and each side's FLOPs, TFLOP/s and MFU are reported.
    ``--quick`` runs tiny sizes and writes no section unless ``--results`` names a file (never
    bench/RESULTS.md by default)."""
    import argparse
    import dataclasses
    import json

    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds; prints only")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="run both sides there with FLOP accounting (TFLOP/s, MFU); section NAME_gpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="the forward's precision for both sides (default: bf16 on cuda, else fp32)")
    parser.add_argument("--batch", type=int, default=None, help="override every size row's batch")
    parser.add_argument("--results", type=Path, default=None,
                        help="the Markdown file to write the section into (default bench/RESULTS.md; with --quick "
                             "only when given)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    rt = Runtime(device, args.dtype or ("bf16" if device == "cuda" else "fp32"), accounted=args.device is not None)
    rows = quick_sizes if args.quick else (gpu_sizes or sizes) if device == "cuda" else sizes
    if args.batch:
        rows = [dataclasses.replace(size, batch=args.batch) for size in rows]
    repeats = 3 if args.quick else args.repeats
    steps = 1 if args.quick else args.steps
    section, heading = (f"{name}_gpu", f"{title} ({'GPU' if device == 'cuda' else 'CPU'}, {rt.dtype})") \
        if rt.accounted else (name, title)
    write = args.results is not None or not args.quick
    results: list[dict] = []
    body = ""
    for size in rows:
        r = measure(size, repeats, steps, rt)
        mfu = (f", MFU ren {r['ren_mfu']:.1%} / {reference} {r['ref_mfu']:.1%}" if "ren_mfu" in r else "")
        print(f"{size.label()}: ren {r['ren_s'] * 1e3:.1f} ms, {reference} {r['ref_s'] * 1e3:.1f} ms, ratio "
              f"{r['ratio']:.2f} (CPU time {r['cpu_ratio']:.2f}){mfu}", flush=True)
        results.append(r)
        body = report(results, args.threads, repeats, steps, rt)
        if len(results) < len(rows):
            body += f"\n\n(Partial: {len(results)} of {len(rows)} size rows measured so far.)"
        if write:
            write_section(section, heading, body, path=args.results or RESULTS)
        if args.json:
            raw = [{**row, "size": dataclasses.asdict(row["size"]), "label": row["size"].label()}
                   for row in results]
            args.json.write_text(json.dumps({"section": section, "device": device, "dtype": rt.dtype,
                                             "rows": raw}, indent=1, default=str))
    print(body)


def seeded_pair(rt: Runtime, build_ren: Callable[[], Any], build_ref: Callable[[], Any]) -> tuple[Any, Any]:
    """ren's model and the reference, each built from seed 0 on ``rt``'s device (initialised there: fast on
    a GPU)."""
    import torch

    with rt.torch_device:
        torch.manual_seed(0)
        ren = build_ren()
        torch.manual_seed(0)
        ref = build_ref()
    return ren, ref


def training_steps(ren: Any, ren_loss: Callable[[], Any], ref: Any, ref_loss: Callable[[], Any],
                   rt: Runtime = Runtime()) -> tuple[Callable[[], None], Callable[[], None]]:
    """One full training step each (loss under ``rt``'s autocast, backward, optimizer step, zero_grad), with
    each side's own optimizer: ren's trainer's (``engine.train.build_optimizer``: its parameter groups, fused
    AdamW) against the Hugging Face Trainer's default (fused AdamW over every parameter since torch 2.8)."""
    import torch

    from engine.config import OptimConfig
    from engine.train import build_optimizer

    def step_of(loss: Callable[[], Any], optimizer: Any) -> Callable[[], None]:
        def step() -> None:
            with rt.autocast():
                value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    ren_opt = build_optimizer(ren, OptimConfig(lr=1e-4, weight_decay=0.0), rt.torch_device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    return step_of(ren_loss, ren_opt), step_of(ref_loss, ref_opt)


if __name__ == "__main__":
    # python3 bench/_results.py merge SOURCE [TARGET]: SOURCE's sections into TARGET (default bench/RESULTS.md)
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "merge":
        sys.exit("usage: python3 bench/_results.py merge SOURCE [TARGET]")
    merged = merge_sections(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else RESULTS)
    print(f"merged {len(merged)} section(s): {', '.join(merged) or '-'}")
