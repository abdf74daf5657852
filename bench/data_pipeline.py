"""Data pipeline: the training loader's samples/s alone against the training step's consumption rate.

    .venv/bin/python bench/data_pipeline.py [--repeats 3] [--quick]

Two data sets, each loaded by the ``DataLoader`` that ``engine.train.train`` builds (the run's
``EpochSampler``, ``collate_fn=_identity`` over the data set's ``__getitems__``, ``drop_last``,
``data.num_workers`` worker processes):

- easy-VQA with ``presets/quickstart.toml`` (its images are decoded once into memory; the config
  allows no loader workers there, so only ``num_workers = 0``, its default, is measured);
- a ViLT-layout VQAv2 arrow fixture (``tests/arrow_fixtures.write_vqav2``: real JPEG bytes, made
  with PIL, at 640x480 as COCO's photos mostly are) read with ``presets/vqav2_finetune.toml``
  (train = ``train+trainable_val``, RandAugment, 224 px, ELECTRA-small + DeiT-tiny towers with random
  weights of the same architecture: only their configs and ELECTRA's tokenizer are read, from a copy
  of ``tests/fixtures/hf_cache``, offline), at ``num_workers`` 0 and the preset's 8.

Loader side: one call iterates a fresh loader iterator for ``--loader-batches`` batches (at most one
epoch), worker start-up included (workers are not persistent, so training pays it every epoch), and
returns samples/s, and also samples per CPU-second of the process and its workers. Step side: one
call runs the trainer's step (``_finetune_step`` forward, ``backward()``, gradient clipping, AdamW
step, ``zero_grad``; under CPU bf16 autocast where the preset says ``mixed_precision = "bf16"``, as
accelerate runs it) on pre-fetched batches and returns samples/s. The sides alternate
(``bench/_results.alternate``); medians and loader / step (> 1: the loader is not the bottleneck).
Per CPU-second, the ratio says how many cores of training one core of loading feeds (wall rates on
a shared machine swing with the other load; CPU time much less). The step batch is the preset's,
capped at ``--batch`` (256 is more than one CPU thread trains in reasonable time; the per-sample
loader cost does not depend on it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402

RANDOM_TOWERS = ['model.vision.source="random"', 'model.text.source="random"']


def offline_hub(cache: Path) -> None:
    """Copy the test hub cache (configs and tokenizers of the shipped GPU presets' towers) to ``cache`` and
    set it as the offline ``HF_HUB_CACHE``, before anything imports ``huggingface_hub``."""
    shutil.copytree(REPO / "tests" / "fixtures" / "hf_cache", cache, dirs_exist_ok=True)
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def write_fixture(root: Path, rows: int) -> int:
    """ViLT's ``vqav2_{train,trainable_val,rest_val}.arrow`` with ``rows`` training images (3 questions each);
    returns the encoded bytes of one image."""
    from tests.arrow_fixtures import write_vqav2

    size = (640, 480)
    train = write_vqav2(root, "train", n=rows, image_size=size)
    write_vqav2(root, "trainable_val", n=max(1, rows // 5), start=rows, image_size=size)
    write_vqav2(root, "rest_val", n=max(1, rows // 5), start=rows + rows // 5, image_size=size)
    return len(train.rows[0]["image"])


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Pipeline:
    """A preset's training data, its loader as the trainer builds it, and its training step."""

    def __init__(self, preset: Path, overrides: list[str], batch: int) -> None:
        import torch

        from engine.config import load_preset
        from engine.data.pipeline import build_data
        from engine.models import build_model
        from engine.store import default_root
        from engine.train import _finetune_step, _pretrain_step, build_optimizer

        cfg = load_preset(preset, overrides)
        self.batch = min(batch, cfg.train.batch_size)
        self.cfg = load_preset(preset, [*overrides, f"train.batch_size={self.batch}"])
        cache = Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else default_root() / "cache"
        self.data = build_data(self.cfg, cache_dir=cache)
        torch.manual_seed(self.cfg.run.seed)
        self.model = build_model(self.cfg, vocab_size=self.data.vocab_size, num_answers=self.data.num_answers).train()
        o = self.cfg.optim
        self.optimizer = build_optimizer(self.model, o, torch.device("cpu"))
        self.step_fn = _pretrain_step if self.cfg.objectives else _finetune_step
        self.steps_done = 0
        self.epoch = 0
        self.batches: list[Any] = []
        self.cpu_rates: dict[str, list[float]] = {}  # samples per CPU-second, by side

    def loader(self, workers: int) -> Any:
        from torch.utils.data import DataLoader

        from engine.train import EpochSampler, _identity

        sampler = EpochSampler(len(self.data.train), self.cfg.run.seed)
        sampler.use_epoch(self.epoch)
        self.epoch += 1  # each call reads a different permutation, as successive epochs do
        return DataLoader(self.data.train, batch_size=self.batch, sampler=sampler, collate_fn=_identity,
                          drop_last=True, num_workers=workers)

    def loader_rate(self, workers: int, max_batches: int) -> float:
        """Samples/s of a fresh loader iterator over ``max_batches`` batches (or one epoch), start-up included;
        records samples per CPU-second of this process and its (joined) workers."""
        start, cpu = time.perf_counter(), _cpu_seconds()
        samples = 0
        batches = iter(self.loader(workers))
        for i, batch in enumerate(batches):
            samples += int(batch["input_ids"].shape[0])
            if i + 1 >= max_batches:
                break
        wall = time.perf_counter() - start
        del batches  # shuts the workers down and joins them, so their CPU time is counted
        self.cpu_rates.setdefault(f"loader, {workers} workers", []).append(samples / (_cpu_seconds() - cpu))
        return samples / wall

    def prefetch(self, n: int) -> None:
        batches = iter(self.loader(0))
        self.batches = [next(batches) for _ in range(n)]

    def step_rate(self, steps: int) -> float:
        """Samples/s of ``steps`` training steps on the pre-fetched batches."""
        import torch

        cfg = self.cfg
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.mixed_precision == "bf16"
                    else contextlib.nullcontext())
        samples = 0
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = self.batches[self.steps_done % len(self.batches)]
            gen = torch.Generator().manual_seed(cfg.run.seed * 7_919 + self.steps_done * 131)
            with autocast:
                loss, _ = self.step_fn(self.model, batch, cfg, self.data, gen)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            samples += int(batch["input_ids"].shape[0])
            self.steps_done += 1
        wall = time.perf_counter() - start
        self.cpu_rates.setdefault("step", []).append(samples / (time.process_time() - cpu))
        return samples / wall


def measure(name: str, pipe: Pipeline, workers: list[int], *, steps: int, loader_batches: int,
            repeats: int) -> tuple[list[list[object]], dict[str, Any]]:
    """Table rows (one per worker count) for one data set, and the raw rates."""
    pipe.prefetch(min(steps, 4))
    pipe.step_rate(1)  # warm-up (AdamW state, allocator)
    sides = {f"loader, {w} workers": (lambda w=w: pipe.loader_rate(w, loader_batches)) for w in workers}
    sides["step"] = lambda: pipe.step_rate(steps)
    rates = alternate(sides, repeats)
    step, step_cpu = median(rates["step"]), median(pipe.cpu_rates["step"])
    epoch_batches = len(pipe.data.train) // pipe.batch
    rows: list[list[object]] = []
    for w in workers:
        key = f"loader, {w} workers"
        loader, loader_cpu = median(rates[key]), median(pipe.cpu_rates[key])
        ratio = loader / step
        rows.append([name, w, pipe.batch, min(loader_batches, epoch_batches), f"{loader:.1f}", f"{step:.1f}",
                     f"{ratio:.1f}", "met" if ratio > 1 else "MISSED (loader-bound)", f"{loader_cpu:.1f}",
                     f"{step_cpu:.1f}", f"{loader_cpu / step_cpu:.1f}"])
    return rows, {"wall": rates, "cpu": pipe.cpu_rates}


HEADERS = ["data set (preset)", "num_workers", "batch", "batches per loader call", "loader samples/s",
           "step samples/s", "loader / step", "target > 1", "loader samples per CPU-s", "step samples per CPU-s",
           "loader / step per CPU-s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the loader and step sides")
    parser.add_argument("--rows", type=int, default=200, help="training images of the ViLT fixture (3 questions each)")
    parser.add_argument("--batch", type=int, default=32, help="cap on the preset's batch size")
    parser.add_argument("--loader-batches", type=int, default=40, help="batches per loader call (at most an epoch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, prints only (never writes RESULTS.md)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rows, args.batch, args.loader_batches = 1, 24, 8, 4
    rows: list[list[object]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ren-bench-vilt-") as tmp:
        offline_hub(Path(tmp) / "hf_cache")
        import torch

        torch.set_num_threads(args.threads)
        arrows = Path(tmp) / "arrows"
        image_bytes = write_fixture(arrows, args.rows)
        cases = [
            ("easy-VQA (quickstart)", REPO / "presets" / "quickstart.toml", [], 5 if not args.quick else 1),
            ("ViLT VQAv2 arrow (vqav2_finetune)", REPO / "presets" / "vqav2_finetune.toml",
             [*RANDOM_TOWERS, f'data.root="{arrows}"'], 1),
        ]
        for name, preset, overrides, steps in cases:
            pipe = Pipeline(preset, overrides, args.batch)
            workers = sorted({0, min(pipe.cfg.data.num_workers, 2) if args.quick else pipe.cfg.data.num_workers})
            r, rates = measure(name, pipe, workers, steps=steps, loader_batches=args.loader_batches,
                               repeats=args.repeats)
            rows += r
            raw[name] = {"train_samples": len(pipe.data.train), "mixed_precision": pipe.cfg.train.mixed_precision,
                         "rates": rates}
    text = table(HEADERS, rows)
    print(text)
    print(json.dumps(raw, indent=1))
    if args.quick:
        return
    body = (
        f"Samples/s, medians of {args.repeats} alternating rounds; {torch.get_num_threads()} torch thread(s) for the "
        "step, CPU only (no GPU available). Loader: a fresh iterator of the trainer's DataLoader per call, worker "
        "start-up included. Step: forward + backward + clip + AdamW on pre-fetched batches (the ViLT preset's "
        "bf16 autocast on CPU, as accelerate applies it). Per CPU-second: samples per CPU-second of the loader process "
        "and its workers, or of the (one-thread) step. The ViLT fixture: "
        f"{args.rows} + {args.rows // 5} training images of 640x480 ({image_bytes / 1024:.0f} KB JPEG each, "
        "synthetic: flat colours compress and decode faster than photos), 3 questions each, RandAugment, "
        "224 px. On a GPU the step is two to three orders of magnitude faster while each loader worker "
        "stays at its CPU rate, so the ratio here says the CPU trainer is not loader-bound, not that a GPU "
        "would not be: divide a GPU's step samples/s by the per-worker loader rate for the cores it needs.\n\n"
        + text
    )
    write_section("data_pipeline", "Data pipeline: loader rate against the training step's consumption", body)


if __name__ == "__main__":
    main()
