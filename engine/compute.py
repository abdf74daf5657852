"""Compute accounting: FLOPs per sample, device peak FLOP/s, step-time split, peak memory.

FLOPs are counted once per run with ``torch.utils.flop_counter`` (:class:`FlopMeter`, plus
:data:`CPU_ATTENTION_FORMULAS` for the CPU attention kernel it lacks), the peak comes from a vendor table
or the fastest of :data:`PEAK_REPEATS` timed matmuls (:func:`device_peak`), and :class:`StepTimer` splits
step time. What is measured and why: docs/queue-and-store.md, "Compute accounting", and
docs/PROTOCOLS.md, "Compute accounting".
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.store import atomic_write_text

PHASES = ("data", "forward", "backward", "optimizer")
DTYPES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> dtype name
PEAK_CACHE = "peak_flops_v2.json"
"""v2: best of repeats, in the dtype that ran (v1's medians in the requested dtype are not reused)."""
PEAK_WARMUP = 2
PEAK_REPEATS = 10


# --- FLOPs ----------------------------------------------------------------------------


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Q K^T, then (softmax) V, of ``(B, H, L, D)`` shapes."""
    b, h, lq, d = query
    lk, dv = key[2], value[3]
    return 2 * b * h * lq * lk * (d + dv)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The scores recomputed (Q K^T, a flash-style kernel), then dP = dO V^T, dV = P^T dO,
    dQ = dS K, dK = dS^T Q: 2.5x the forward, as ``flop_counter`` counts the GPU kernels."""
    b, h, lq, d = query
    lk, dv = key[2], value[3]
    return 2 * b * h * lq * lk * (d + dv + dv + d + d)


CPU_ATTENTION_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that prints nothing and also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)


def batch_samples(batch: Mapping[str, Any]) -> int:
    """Samples in a training or evaluation batch (rows of its ``input_ids``)."""
    return int(batch["input_ids"].shape[0])


class FlopMeter:
    """FLOPs per sample of the run's first training step (``forward``, ``backward``) and
    first evaluation batch (``eval``), each counted once: wrap the step's parts in
    :meth:`count`; after the first time it is a no-op."""

    def __init__(self) -> None:
        self.forward: float | None = None
        self.backward: float | None = None
        self.eval: float | None = None
        self.tokens_per_sample: float | None = None

    @property
    def done(self) -> bool:
        """Whether the training step has been measured (later steps run uncounted)."""
        return self.forward is not None and self.backward is not None

    @property
    def train(self) -> float | None:
        """Forward + backward FLOPs per training sample."""
        return self.forward + self.backward if self.done else None

    @contextlib.contextmanager
    def count(self, kind: str, batch: Mapping[str, Any]) -> Iterator[None]:
        """Count what runs inside as ``kind`` ("forward", "backward" or "eval") of ``batch``."""
        if getattr(self, kind) is not None:
            yield
            return
        # a compiled model runs this one counted pass eagerly: the counter sees the operators eager mode runs
        with torch.compiler.set_stance("force_eager"), flop_counter() as counter:
            yield
        samples = batch_samples(batch)
        setattr(self, kind, counter.get_total_flops() / samples)
        if kind == "forward" and "attention_mask" in batch:
            self.tokens_per_sample = float(batch["attention_mask"].sum()) / samples

    def per_sample(self) -> dict[str, float]:
        """Contract 1's ``flops_per_sample``: the measured figures only."""
        out = {k: getattr(self, k) for k in ("forward", "backward", "train", "eval")}
        return {k: float(v) for k, v in out.items() if v is not None}


# --- device peaks -----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no sparsity) vendor peaks of one GPU model, FLOP/s per dtype. ``tf32`` is
    the tensor-core rate of fp32 matmuls when TF32 is allowed; ``fp32`` the CUDA-core rate."""

    pattern: str  # regex searched (case-insensitively) in torch.cuda.get_device_name()
    fp32: float
    tf32: float
    bf16: float
    fp16: float


T = 1e12
# Vendor datasheet figures; datasheets print tensor rates "with sparsity", which are halved
# here to the dense rate. Ordered so that a more specific name matches first. Where a line
# names a page, the figures were checked against it.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    # NVIDIA H100/H200 datasheets (Hopper): SXM FP32 67, TF32 989*, BF16/FP16 1,979*;
    # PCIe FP32 51, TF32 756*, BF16/FP16 1,513*; NVL FP32 60, TF32 835*, BF16/FP16 1,671*
    # (* = with sparsity; "specifications 1/2 lower without sparsity"): the H100 datasheet table at
    # archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html; H200 = H100 SXM compute with HBM3e
    # (glennklockwood.com/garden/processors/h100: BF16 matrix 989.4, TF32 494.7, FP32 66.9).
    GpuPeak(r"\bH100\b.*\bPCIe\b", 51 * T, 378 * T, 756 * T, 756 * T),
    GpuPeak(r"\b(H100|H200)\b.*\bNVL\b", 60 * T, 417.5 * T, 835.5 * T, 835.5 * T),
    GpuPeak(r"\b(H100|H200|GH200)\b", 67 * T, 494.7 * T, 989.4 * T, 989.4 * T),
    # NVIDIA A100 datasheet (SXM4 and PCIe alike): FP32 19.5, TF32 156, BF16/FP16 312 (dense);
    # nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    GpuPeak(r"\bA100\b", 19.5 * T, 156 * T, 312 * T, 312 * T),
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5 (125*), BF16/FP16 125 (250*).
    GpuPeak(r"\bA10\b", 31.2 * T, 62.5 * T, 125 * T, 125 * T),
    # NVIDIA L40S datasheet: FP32 91.6, TF32 183 (366*), BF16/FP16 362 (733*);
    # L40: FP32 90.5, TF32 90.5 (181*), BF16/FP16 181 (362*) (the L40/L40S datasheet table as
    # reproduced at mullet.se/product.html?product_id=355414).
    GpuPeak(r"\bL40S\b", 91.6 * T, 183 * T, 362 * T, 362 * T),
    GpuPeak(r"\bL40\b", 90.5 * T, 90.5 * T, 181 * T, 181 * T),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242* (store.sourcecode.com spec sheet).
    GpuPeak(r"\bL4\b", 30.3 * T, 60 * T, 121 * T, 121 * T),
    # NVIDIA RTX A6000 datasheet: FP32 38.7, tensor (FP16/BF16) 309.7* -> 154.8; TF32 half of that
    # (llmperf.net/categories/gpu/Nvidia-A6000-GPUs, after Microway's Ampere comparison).
    GpuPeak(r"\bRTX A6000\b", 38.7 * T, 77.4 * T, 154.8 * T, 154.8 * T),
    # Tesla V100 datasheet: SXM2 FP32 15.7 / tensor 125, PCIe 14 / 112, V100S 16.4 / 130. Volta has
    # no BF16 or TF32 tensor cores: bf16 and tf32 get the FP32 rate (developer.nvidia.com/programming-
    # tensor-cores-cuda-9-0: "up to 125 Tensor TFLOPS").
    GpuPeak(r"\bV100S\b", 16.4 * T, 16.4 * T, 16.4 * T, 130 * T),
    GpuPeak(r"\bV100\b.*\bSXM", 15.7 * T, 15.7 * T, 15.7 * T, 125 * T),
    GpuPeak(r"\bV100\b", 14 * T, 14 * T, 14 * T, 112 * T),
    # GeForce (Ampere GA102 / Ada AD102 whitepapers), tensor rates with FP32 accumulate (what
    # PyTorch uses): RTX 3090 FP32 35.6, FP16/BF16 71 (142*), TF32 35.6; RTX 4090 FP32 82.6,
    # FP16/BF16 165.2 (330.3*), TF32 82.6 (waredb.com/processor/nvidia-geforce-rtx-4090).
    GpuPeak(r"\bRTX 3090\b(?! Ti)", 35.6 * T, 35.6 * T, 71 * T, 71 * T),
    GpuPeak(r"\bRTX 4090\b(?! D)", 82.6 * T, 82.6 * T, 165.2 * T, 165.2 * T),
)


def table_peak(device_name: str, dtype: str, *, tf32: bool = False) -> float | None:
    """The vendor peak FLOP/s of a GPU named ``device_name`` for ``dtype`` ("fp32", "bf16",
    "fp16"), or None for a GPU not in :data:`GPU_PEAKS`. fp32 uses the TF32 tensor-core rate
    only when ``tf32`` (PyTorch keeps fp32 matmuls off TF32 unless told otherwise)."""
    for peak in GPU_PEAKS:
        if re.search(peak.pattern, device_name, flags=re.IGNORECASE):
            return peak.tf32 if dtype == "fp32" and tf32 else getattr(peak, dtype)
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def device_label(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"cpu: <model name>"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}"


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(autocast: contextlib.AbstractContextManager[Any], device: torch.device) -> str:
    """The dtype ("fp32", "bf16", "fp16") a matmul on ``device`` yields inside ``autocast``, the context the
    training's forward runs in (``accelerator.autocast()``): what ran, whatever precision was asked for."""
    ones = torch.ones(2, 2, device=device)
    with autocast:
        out = torch.mm(ones, ones)
    return {value: key for key, value in _TORCH_DTYPES.items()}[out.dtype]


def best_seconds(run: Callable[[], Any], *, sync: Callable[[], None], warmup: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, after ``warmup`` untimed ones (caches, thread pools
    and clocks up to speed). The fastest, not the median: load from other processes only slows a call, so
    the minimum is the least disturbed measurement (the advice of Python's ``timeit``)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        run()
        sync()
        times.append(clock() - start)
    return min(times)


def measure_matmul_peak(device: torch.device, dtype: str, *, repeats: int = PEAK_REPEATS, warmup: int = PEAK_WARMUP,
                        max_size: int = 4096, clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of square matmuls in ``dtype`` on ``device`` (:func:`best_seconds` of ``repeats``), with the
    process's thread count; the size doubles from 512 until one matmul takes 50 ms."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 512
    while True:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=device).to(_TORCH_DTYPES[dtype])
        b = torch.randn(n, n, generator=g, device=device).to(_TORCH_DTYPES[dtype])
        matmul = functools.partial(torch.mm, a, b)
        if best_seconds(matmul, sync=sync, warmup=1, repeats=1, clock=clock) >= 0.05 or n >= max_size:
            break
        n *= 2
    seconds = best_seconds(matmul, sync=sync, warmup=warmup, repeats=repeats, clock=clock)
    return 2 * n**3 / seconds


def device_peak(device: torch.device, dtype: str, cache_dir: Path) -> tuple[float, str]:
    """(peak FLOP/s, source) of one device: the vendor table for a known GPU ("table"), else a
    measured matmul peak ("measured"), cached in ``cache_dir`` by device (CPU model name and
    thread count) and dtype, so each machine measures it once."""
    name = device_label(device)
    if device.type == "cuda":
        peak = table_peak(name, dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
        if peak is not None:
            return peak, "table"
    key = f"{name}|{torch.get_num_threads()} threads|{dtype}" if device.type == "cpu" else f"{name}|{dtype}"
    path = cache_dir / PEAK_CACHE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key]), "measured"
    peak = measure_matmul_peak(device, dtype)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**cached, key: peak}, indent=1))
    return peak, "measured"


# --- time and memory ---------------------------------------------------------------------


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What makes host timings true on ``device``: ``torch.cuda.synchronize`` on CUDA, else nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


class StepTimer:
    """Training wall time, and the step split into data wait, forward, backward, optimizer.

    Iterate the loader through :meth:`batches` (the time spent fetching each batch is its
    data wait), call :meth:`start` at the top of each micro-batch and :meth:`mark` after
    each phase. Only sampled micro-batches are timed (the trainer samples its logged
    steps); on them the device is synchronised before and after each phase, so
    asynchronous GPU work lands in the phase that queued it and the other steps run
    unsynchronised. Without a ``sync`` (a CPU) every micro-batch is timed. :attr:`seconds` counts
    training time since construction (plus ``seconds`` already trained), excluding spans
    inside :meth:`paused`.
    """

    def __init__(self, *, sync: Callable[[], None] | None = None, micro_batches: int = 1,
                 seconds: float = 0.0) -> None:
        self.sync = sync
        self.micro_batches = micro_batches
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._timed = 0
        self._data = 0.0
        self._on = False
        self._t = 0.0
        self._trained = seconds
        self._since: float | None = time.perf_counter()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """``loader``'s batches, timing how long each takes to arrive."""
        it = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._data = time.perf_counter() - start
            yield batch

    def start(self, sampled: bool, warm: bool = True) -> None:
        """A micro-batch begins; time it if ``sampled`` (every one without a device sync),
        never while not ``warm`` (a step slowed by FLOP counting is not representative)."""
        self._on = warm and (sampled or self.sync is None)
        if self._on:
            if self.sync:
                self.sync()
            self._sums["data"] += self._data
            self._timed += 1
            self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """``phase`` ("forward", "backward", "optimizer") of the current micro-batch ended."""
        if self._on:
            if self.sync:
                self.sync()
            now = time.perf_counter()
            self._sums[phase] += now - self._t
            self._t = now

    def split(self) -> dict[str, float]:
        """Mean seconds per optimizer step in each phase over the timed micro-batches."""
        if not self._timed:
            return {}
        return {k: v / self._timed * self.micro_batches for k, v in self._sums.items()}

    @property
    def seconds(self) -> float:
        """Training seconds so far."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._trained + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside does not count as training (evaluation)."""
        self._trained = self.seconds
        self._since = None
        try:
            yield
        finally:
            self._since = time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA's max allocated on ``device``, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# --- the record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What a run trains on: device name, the dtype its matmuls ran in (``dtype``) and the one
    ``train.mixed_precision`` asked for (``requested_dtype``), processes, and the per-device peak in ``dtype``."""

    device: str
    dtype: str
    processes: int
    peak_flops: float | None = None
    peak_source: str | None = None
    requested_dtype: str | None = None

    @classmethod
    def detect(cls, device: torch.device, mixed_precision: str, processes: int, cache_dir: Path, *,
               autocast: contextlib.AbstractContextManager[Any]) -> DeviceInfo:
        """This process's device; ``mixed_precision`` as accelerate names it ("no", "bf16", "fp16");
        ``autocast`` the context the training's forward runs in (``accelerator.autocast()``)."""
        dtype = autocast_dtype(autocast, device)
        peak, source = device_peak(device, dtype, cache_dir)
        return cls(device_label(device), dtype, processes, peak, source, DTYPES.get(mixed_precision, "fp32"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "processes": self.processes}
        if self.requested_dtype is not None:
            out["requested_dtype"] = self.requested_dtype
        if self.peak_flops is not None:
            out.update(peak_flops=self.peak_flops, peak_source=self.peak_source)
        return out


def compute_record(info: DeviceInfo, *, flops: FlopMeter, samples_per_s: float | None,
                   step_split: Mapping[str, float], peak_memory: float | None, pflops: float,
                   eval_pflops: float, train_seconds: float) -> dict[str, Any]:
    """Contract 1's ``RunRecord.compute`` dict. ``samples_per_s`` (over all processes) is that
    of the last logged interval; ``pflops``/``eval_pflops``/``train_seconds`` are cumulative."""
    out = info.to_dict()
    per_sample = flops.per_sample()
    if per_sample:
        out["flops_per_sample"] = per_sample
    if flops.tokens_per_sample is not None:
        out["tokens_per_sample"] = flops.tokens_per_sample
    if samples_per_s is not None:
        out["samples_per_s"] = samples_per_s
        if flops.tokens_per_sample is not None:
            out["tokens_per_s"] = flops.tokens_per_sample * samples_per_s
        if flops.train is not None:
            out["achieved_flops"] = flops.train * samples_per_s
            if info.peak_flops:
                out["utilisation"] = out["achieved_flops"] / (info.peak_flops * info.processes)
    if step_split:
        out["step_split_s"] = dict(step_split)
    if peak_memory is not None:
        out["peak_memory_mb"] = peak_memory
    out["pflops"] = pflops
    if eval_pflops:
        out["eval_pflops"] = eval_pflops
    out["train_seconds"] = train_seconds
    out["device_hours"] = train_seconds * info.processes / 3600
    return out


def compute_series(record: Mapping[str, Any]) -> dict[str, float]:
    """The ``compute/*`` metric series of a compute record, for the metrics writer."""
    out = {"compute/pflops": record["pflops"], "compute/device_hours": record["device_hours"]}
    if "utilisation" in record:
        out["compute/utilisation"] = record["utilisation"]
    return out

