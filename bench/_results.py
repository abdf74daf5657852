"""Shared by the benchmarks: alternating side-by-side timing, the machine's description, and
``bench/RESULTS.md``, where each benchmark rewrites only its own section.

A section is delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; it carries the
command that produced it and the machine it ran on, so sections measured on different days (or on
a GPU machine) stay honest about where their numbers come from.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
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
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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


def time_steps(sides: dict[str, Callable[[], None]], repeats: int, steps: int
               ) -> tuple[dict[str, float], dict[str, float]]:
    """Each side's training step, ``steps`` at a time, alternating over ``repeats`` rounds after one warm-up
    call each (allocator, optimizer state). Returns the medians of the wall seconds and of the process CPU
    seconds per step, by side; with one thread the CPU time is the work done, whatever share of a core a
    shared machine left the process."""
    for step in sides.values():
        step()
    cpu: dict[str, list[float]] = {name: [] for name in sides}

    def measured(name: str, step: Callable[[], None]) -> Callable[[], float]:
        def side() -> float:
            start = time.process_time()
            wall = timed(lambda: [step() for _ in range(steps)]) / steps
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


def step_result(size: Any, ren: Any, ref: Any, wall: dict[str, float], cpu: dict[str, float]) -> dict:
    """One size row of a step-throughput comparison, from :func:`time_steps`'s medians."""
    return {"size": size, "ren_params": params(ren), "ref_params": params(ref), "ren_s": wall["ren"],
            "ref_s": wall["ref"], "ratio": wall["ref"] / wall["ren"], "ren_cpu": cpu["ren"], "ref_cpu": cpu["ref"],
            "cpu_ratio": cpu["ref"] / cpu["ren"]}


def _verdict(ratio: float) -> str:
    return "met" if ratio >= TARGET_RATIO else "missed"


def throughput_table(results: list[dict], ren_side: str, ref_side: str, ref_short: str) -> str:
    """The table of :func:`step_result` rows: two lines per size, ren's with the ratios."""
    rows = []
    for r in results:
        size = r["size"]
        rows.append([size.label(), ren_side, f"{r['ren_params']:,}", f"{r['ren_s'] * 1e3:.1f}",
                     f"{r['ren_cpu'] * 1e3:.1f}", f"{size.batch / r['ren_s']:.1f}",
                     f"**{r['ratio']:.2f}** ({_verdict(r['ratio'])})",
                     f"{r['cpu_ratio']:.2f} ({_verdict(r['cpu_ratio'])})"])
        rows.append(["", ref_side, f"{r['ref_params']:,}", f"{r['ref_s'] * 1e3:.1f}",
                     f"{r['ref_cpu'] * 1e3:.1f}", f"{size.batch / r['ref_s']:.1f}", "1.00", "1.00"])
    return table(["sizes", "side", "params", "step ms (median)", "CPU ms/step (median)", "samples/s",
                  f"ratio ren/{ref_short} (target >= {TARGET_RATIO})", "CPU-time ratio"], rows)


def compared(threads: int, repeats: int, steps: int, ref_short: str) -> str:
    """What both step-throughput comparisons time, and how."""
    return f"""What is compared: one full training step (forward, the VQA loss (BCE on soft targets times the
number of answers, as ViLT trains it), backward, fused AdamW step on both sides (ren's trainer and the
Hugging Face Trainer default), zero_grad) on the same inputs for both sides (text rows padded to
different lengths, so both apply a key mask), random init, fp32 on CPU with {threads} thread(s). Sides
alternate, {repeats} rounds of {steps} steps each after one warm-up step; ratio = ren samples/s /
{ref_short} samples/s, of the medians. CPU ms/step is the process's CPU time per step
(`time.process_time`): with one thread it is the work done, however much of a core the shared
machine left the process, so on a loaded machine the CPU-time ratio is the steadier of the two."""


def throughput_main(doc: str, name: str, title: str, sizes: tuple[Any, ...], quick_sizes: tuple[Any, ...],
                    measure: Callable[[Any, int, int], dict], report: Callable[[list[dict], int, int, int], str],
                    reference: str) -> None:
    """The command line of a step-throughput comparison: ``--repeats``, ``--steps``, ``--threads``,
    ``--quick``. Measures each size row with ``measure(size, repeats, steps)`` (a dict with ``ren_s``,
    ``ref_s``, ``ratio``, ``cpu_ratio``) and rewrites section ``name`` after every row, so a stopped run
    still leaves what it measured; ``--quick`` prints only."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds; prints only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = quick_sizes if args.quick else sizes
    repeats = 3 if args.quick else args.repeats
    steps = 1 if args.quick else args.steps
    results: list[dict] = []
    body = ""
    for size in rows:
        r = measure(size, repeats, steps)
        print(f"{size.label()}: ren {r['ren_s'] * 1e3:.1f} ms, {reference} {r['ref_s'] * 1e3:.1f} ms, ratio "
              f"{r['ratio']:.2f} (CPU time {r['cpu_ratio']:.2f})", flush=True)
        results.append(r)
        body = report(results, args.threads, repeats, steps)
        if len(results) < len(rows):
            body += f"\n\n(Partial: {len(results)} of {len(rows)} size rows measured so far.)"
        if not args.quick:
            write_section(name, title, body)
    print(body)


def training_steps(ren: Any, ren_loss: Callable[[], Any], ref: Any, ref_loss: Callable[[], Any]
                   ) -> tuple[Callable[[], None], Callable[[], None]]:
    """One full training step each (loss, backward, optimizer step, zero_grad), with each side's own
    optimizer: ren's trainer's (``engine.train.build_optimizer``: its parameter groups, fused AdamW) against
    the Hugging Face Trainer's default (fused AdamW over every parameter since torch 2.8)."""
    import torch

    from engine.config import OptimConfig
    from engine.train import build_optimizer

    def step_of(loss: Callable[[], Any], optimizer: Any) -> Callable[[], None]:
        def step() -> None:
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    ren_opt = build_optimizer(ren, OptimConfig(lr=1e-4, weight_decay=0.0), torch.device("cpu"))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    return step_of(ren_loss, ren_opt), step_of(ref_loss, ref_opt)
