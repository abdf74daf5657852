"""The training engine, in accelerate's plain style.

``train(cfg, store, run_id)`` is :func:`setup` (build -> ``accelerator.prepare``),
:func:`fit` (loop under ``accelerator.accumulate`` -> evaluate with
``gather_for_metrics`` -> checkpoint) and :func:`finish` (final scores, weights).
The same code runs on a CPU, one GPU, or many processes started by
``accelerate launch`` (only the main process writes to the store).

Run this module as ``python -m engine.train RUN_ID [--resume]`` to train a run
that is already in the store; ``ren run`` does that for you.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import GradientAccumulationPlugin, TorchDynamoPlugin, parse_flag_from_env, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Sampler

from engine import objectives as O
from engine import tasks as T
from engine.compute import (
    DeviceInfo,
    FlopMeter,
    StepTimer,
    compute_record,
    compute_series,
    device_sync,
    peak_memory_mb,
)
from engine.config import OptimConfig, RunConfig, check_processes, config_from_dict
from engine.data.images import ItemDraws
from engine.data.pipeline import DataBundle, build_data
from engine.display import bucket_means
from engine.errors import ConfigError, RenError, StoreBusy, StoreError, oom_message
from engine.freeze import FreezeReport, apply_freeze
from engine.models import VLModel, build_model
from engine.models.compiling import compile_model
from engine.runs import FINAL_WEIGHTS
from engine.store import MetricsWriter, Store, atomic_write_text, follow_umask, json_text
from engine.tracking import (
    Guarded,
    RunIdentity,
    TrackedWriter,
    build_trackers,
    save_tracker_ids,
)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ANSWERS = "answers.json"  # what the task head's outputs mean, by index (the VQA vocabulary), for `ren eval task`
INDEX_UPDATE_S = 5.0
# Devices with torch's fused AdamW kernel (one kernel over all parameters; Hugging Face Trainer's default
# optimizer since torch 2.8): 4.7x faster than the per-tensor loop for 9M parameters on one CPU thread.
_FUSED_ADAMW_DEVICES = ("cuda", "cpu")
TRACE = 24  # points in a run record's loss sparkline


class Reporter(Protocol):
    """Where progress goes (a rich bar in a terminal, log lines otherwise)."""

    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


@dataclass
class TrainState:
    """What a checkpoint needs beyond accelerate's model/optimizer state."""

    step: int = 0
    epoch: int = 0
    batches_into_epoch: int = 0
    samples_seen: int = 0
    best_scores: dict[str, float] | None = None
    pflops: float = 0.0  # cumulative training compute (1e15 FLOPs), over all processes
    eval_pflops: float = 0.0
    train_seconds: float = 0.0  # wall time in the training loop, evaluations excluded

    def count_step(self, batch_size: int, train_flops: float | None, seconds: float) -> None:
        """One more optimizer step, of ``batch_size`` samples at ``train_flops`` each, ``seconds`` into training."""
        self.step += 1
        self.batches_into_epoch += 1
        self.samples_seen += batch_size
        self.pflops += (train_flops or 0.0) * batch_size / 1e15
        self.train_seconds = seconds


class EpochSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch): resuming at epoch e,
    batch b replays exactly the order an uninterrupted run would have used.

    The trainer sets the epoch with :meth:`use_epoch`, on purpose not ``set_epoch``: accelerate's
    prepared loader calls ``set_epoch`` on its sampler with its own count of ``iter()`` calls, which
    restarts at 0 in a resumed process (and the loader ``skip_first_batches`` returns counts apart
    from it), so it would replay epoch 0's order in every later epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def seed_of(*key: object) -> int:
    """A 64-bit seed that is a pure function of ``key`` (as :func:`engine.objectives.micro_batch_seed`)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest(), "little")


def seed_global_generators(seed: int, device: torch.device) -> None:
    """Seed torch's global generators that a forward on ``device`` draws from: the CPU's and ``device``'s
    (the current one of its kind, which accelerate sets to the process's). Not ``torch.manual_seed``: it also
    queues a seeding of every backend not yet initialised, with a stack trace each time (0.5 ms on a CPU
    machine with a CUDA build of torch, against 1 us for the CPU generator)."""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)


def use_epoch(loader: DataLoader, sampler: EpochSampler, epoch: int) -> None:
    """Seed every random draw of the data in epoch ``epoch`` by (run seed, epoch) alone, whatever this process
    drew before: the sampler's order; the loader's own generator, from which each ``iter()`` draws the base
    seed of its workers' generators (without one of its own it would draw from torch's global generator,
    which dropout uses); and the training set's augmentation (:class:`~engine.data.images.ItemDraws`)."""
    sampler.use_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed_of("loader", sampler.seed, epoch))
    if isinstance(loader.dataset, ItemDraws):
        loader.dataset.use_epoch(sampler.seed, epoch)


def epochs(loader: DataLoader, sampler: EpochSampler, state: TrainState, accelerator: Accelerator,
           accum: int) -> Iterator[Iterable[Any]]:
    """Each epoch's micro batches from where ``state`` stands: the epoch's draws set (:func:`use_epoch`), past
    the micro batches of the optimizer steps it already took. Once an epoch is used up (the next one asked for),
    ``state`` moves on to the next epoch."""
    while True:
        use_epoch(loader, sampler, state.epoch)
        skip = state.batches_into_epoch * accum
        yield accelerator.skip_first_batches(loader, skip) if skip else loader
        state.epoch += 1
        state.batches_into_epoch = 0


class StepLog:
    """The logged values between logged steps: each micro batch's summed on the device (one sync when
    logged), the samples/s since the last logged step, this session's loss trace, and the interval of
    the run record's progress updates."""

    def __init__(self, samples_seen: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.losses: list[float] = []  # every logged loss of this session, for the record's sparkline
        self.samples_per_s: float | None = None  # at the last logged step
        self._t_last, self._samples_last, self._t_index = time.perf_counter(), samples_seen, 0.0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        """One micro batch's logged values."""
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def flush(self, accelerator: Accelerator, samples_seen: int, *, lr: float, epoch: float) -> dict[str, float]:
        """A logged step's metrics: the means since the last flush over every process's micro batches (the
        loop's only device sync), ``lr``, samples/s and ``epoch``; the sums start again."""
        now = time.perf_counter()
        metrics = _mean_over_processes(accelerator, self.sums, self.count)
        metrics["lr"] = lr
        metrics["samples_per_s"] = (samples_seen - self._samples_last) / max(now - self._t_last, 1e-9)
        metrics["epoch"] = epoch
        self.sums, self.count, self._t_last, self._samples_last = {}, 0, now, samples_seen
        self.samples_per_s = metrics["samples_per_s"]
        self.losses.append(metrics["loss"])
        return metrics

    def restart_clock(self) -> None:
        """Time from now on counts towards samples/s (an evaluation's does not)."""
        self._t_last = time.perf_counter()

    def index_due(self) -> bool:
        """Whether the run record is due a progress update (every INDEX_UPDATE_S at most: the shared index
        is rewritten whole); if so, the interval starts again at the last flush."""
        if self._t_last - self._t_index < INDEX_UPDATE_S:
            return False
        self._t_index = self._t_last
        return True

    def trace(self) -> list[float]:
        """The loss sparkline of the run record."""
        return bucket_means(self.losses, TRACE)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def param_groups(model: VLModel, *, lr: float, weight_decay: float, head_lr_mult: float,
                 fusion_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings tables; learning-rate multipliers
    for heads and fusion layers. Poolers follow their architecture's reference (``pooler_lr`` of the
    encoder): METER gives its cross-modal poolers the cross-modal rate, ViLT its pooler the base rate."""
    pooler_mult = fusion_lr_mult if getattr(model.encoder, "pooler_lr", "base") == "fusion" else 1.0
    buckets: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for group_name, modules in model.groups().items():
        mult = 1.0
        if group_name.startswith("heads."):
            mult = head_lr_mult
        elif group_name == "pooler":
            mult = pooler_mult
        elif group_name.startswith("fusion."):
            mult = fusion_lr_mult
        for module in modules:
            for pname, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                no_decay = p.ndim < 2 or "norm" in pname.lower() or isinstance(module, torch.nn.Embedding)
                buckets.setdefault((mult, 0.0 if no_decay else weight_decay), []).append(p)
    return [
        {"params": params, "lr": lr * mult, "base_lr": lr * mult, "weight_decay": wd}
        for (mult, wd), params in buckets.items()
    ]


def _micro_batch(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(per-process micro batch, accumulation steps) that make up the global batch."""
    check_processes(cfg.train, world)  # `ren run` checked it for --gpus; a launch elsewhere may differ
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // world)
    return micro, cfg.train.batch_size // (micro * world)


def build_accelerator(cfg: RunConfig, trackers: Callable[[], list[Guarded]] | None = None
                      ) -> tuple[Accelerator, int, int]:
    """The run's Accelerator, built with the gradient accumulation that makes up the global batch over its
    processes, and (micro batch, accumulation steps). cpu=True without CUDA: processes started by
    `accelerate launch` then train together over gloo instead of each alone. ``trackers`` makes the
    main process's experiment trackers (``log_with``)."""
    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")  # as AcceleratorState reads it
    state = PartialState(cpu=cpu)  # the process group, which the Accelerator then shares
    micro, accum = _micro_batch(cfg, state.num_processes)
    # the plugin rather than gradient_accumulation_steps=: that one gives way to $ACCELERATE_GRADIENT_ACCUMULATION_STEPS
    accumulation = GradientAccumulationPlugin(num_steps=accum)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_plugin=accumulation,
                              # no compile by accelerate (it would follow $ACCELERATE_DYNAMO_BACKEND): train.compile
                              # compiles in place (compile_model), keeping the parameter names
                              dynamo_plugin=TorchDynamoPlugin(backend="no"),
                              log_with=trackers() if trackers and state.is_main_process else None)
    return accelerator, micro, accum


def _run_identity(cfg: RunConfig, run_dir: Path, run_id: str) -> RunIdentity:
    """What the run's trackers are told about it."""
    return RunIdentity(run_id=run_id, name=cfg.run.name, host=socket.gethostname(), store=str(run_dir.resolve()),
                       stage=cfg.stage, kind=cfg.model.kind, tags=cfg.run.tags, notes=cfg.run.notes)


def _run_trackers(cfg: RunConfig, identity: RunIdentity, store: Store, reporter: Reporter, resume: bool
                  ) -> Callable[[], list[Guarded]]:
    """What makes the run's ``[tracking]`` trackers (called on the main process only)."""
    run_dir = store.run_dir(identity.run_id)

    def make() -> list[Guarded]:
        return build_trackers(cfg.tracking, identity, run_dir, store.root, lambda text: reporter.message(
            f"[ren] {text}"), resume_step=_checkpoint_step(run_dir) if resume else None)
    return make


def _start_trackers(cfg: RunConfig, accelerator: Accelerator, identity: RunIdentity, run_dir: Path,
                    writer: MetricsWriter, reporter: Reporter) -> TrackedWriter:
    """Start the trackers with the resolved config as hyper-parameters; the writer that feeds them."""
    accelerator.init_trackers(cfg.tracking.project, config=identity.hparams(cfg.to_dict()))
    save_tracker_ids(run_dir, accelerator.trackers)
    return TrackedWriter(writer, accelerator, warn=lambda text: reporter.message(f"[ren] {text}"))


def init_weights_from(model: VLModel, source: str, store: Store) -> tuple[list[str], list[str], list[str]]:
    """Load ``run:<id>`` (that run's final or latest weights) or a directory/file.
    Image position tables trained at another image size are resized to this model's;
    other tensors that differ (e.g. MLM head -> VQA head) are skipped.
    Returns (missing, skipped, resized) tensor names."""
    from safetensors.torch import load_file

    from engine.models.resize import adapt_state_dict

    if source.startswith("run:"):
        run_dir = store.run_dir(store.get_run(source[4:]).id)
        path = run_dir / FINAL_WEIGHTS
        if not path.exists():
            latest = latest_checkpoint(run_dir)
            if latest is None:
                raise RenError(f"train.init_from = {source!r}: that run has no weights yet.")
            path = latest / FINAL_WEIGHTS
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / FINAL_WEIGHTS
        if not path.exists():
            raise RenError(f"train.init_from = {source!r}: {path} does not exist.")
    own = model.state_dict()
    state, resized = adapt_state_dict(load_file(str(path)), own)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    result = model.load_state_dict(usable, strict=False)
    if not usable:
        raise RenError(f"train.init_from = {source!r}: no weights in {path} fit this model.")
    return list(result.missing_keys), [k for k in state if k not in usable], resized


def describe_init(source: str, missing: list[str], skipped: list[str], resized: list[str], shown: int = 6) -> str:
    """The line a run prints after :func:`init_weights_from`. New heads and skipped heads are expected
    (pretraining heads -> a task head); encoder tensors that stayed as built are named, since they
    mean the weights do not fully fit this encoder."""
    line = (f"initialised from {source} ({len(missing)} new, {len(skipped)} skipped, "
            f"{len(resized)} resized tensors{': ' + ', '.join(resized) if resized else ''})")
    unfit = [k for k in skipped if not k.startswith("heads.")]
    absent = [k for k in missing if not k.startswith("heads.")]
    for names, what in ((absent, "not in the weights, left as initialised"),
                        (unfit, "in the weights but not fitting this model, ignored")):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            line += f"; WARNING: {len(names)} encoder tensor(s) {what}: {', '.join(names[:shown])}{more}"
    return line


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0 without one): where a resume starts again."""
    ckpt = latest_checkpoint(run_dir)
    return json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else 0


def _save_checkpoint(s: Session) -> None:
    """accelerate ``save_state`` into a temp dir, then an atomic rename and pointer update,
    so a kill at any instant leaves the previous checkpoint usable. The metrics logged up
    to this step are flushed first: a run resumed from the checkpoint keeps them."""
    accelerator, run_dir, state, writer = s.accelerator, s.run_dir, s.state, s.writer
    if writer:
        writer.flush()
    root = run_dir / CHECKPOINTS
    name = f"step_{state.step:08d}"
    tmp = root / f".tmp_{name}"
    if accelerator.is_main_process:  # also the temp dirs of saves killed part way
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json_text(state.__dict__, tmp / "trainer_state.json"))
            follow_umask(tmp)  # safetensors writes the weights 0600
            final = root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as exc:  # how torch and safetensors report failed writes
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous.name} is unchanged" if previous else "there is no earlier one"
        raise StoreError(
            f"Cannot save the checkpoint of step {state.step} in {root}: {_write_error(exc)}; {kept}. "
            f"Free disk space or make the store writable, then continue with `ren run --resume {run_dir.name}`."
        ) from exc
    if accelerator.is_main_process:
        atomic_write_text(root / LATEST, name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-s.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_error(exc: BaseException) -> str:
    """A failed write in words: the OS reason when there is one (e.g. "No space left on device")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc} (a full disk or a read-only store gives this)"


def _save_weights(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write the final weights all or nothing; a failed write becomes a StoreError."""
    from safetensors.torch import save_file

    tmp, path = run_dir / f".{FINAL_WEIGHTS}.tmp", run_dir / FINAL_WEIGHTS
    try:
        save_file(weights, str(tmp))
        follow_umask(tmp)  # safetensors writes 0600: the other users of a shared store could not read it
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(
            f"Cannot write the final weights {path}: {_write_error(exc)}; the run's last checkpoint holds the "
            f"trained state. Free disk space or make the store writable, then `ren run --resume {run_dir.name}` "
            "writes them."
        ) from exc


class Diverged(RenError):
    """The losses stayed NaN or infinite for ``train.max_nonfinite_steps`` optimizer steps in a row."""


_NONFINITE_WORDS = {1: "nan", 2: "inf", 3: "-inf"}


class NonfiniteGuard:
    """Counts the optimizer steps in a row whose losses (the logged ``loss*`` values) were NaN or infinite
    on any process, and says when ``limit`` (``train.max_nonfinite_steps``; 0: never) is reached.

    Each micro batch's losses become codes on the device (0 finite, 1 NaN, 2 +inf, 3 -inf), a step keeps
    the largest of its micro batches', so the loop adds no device sync. :meth:`check` gathers the steps
    since the last check from every process (the largest code of each): all processes read the same history
    and stop at the same step, whichever one diverged, and none waits in a collective the others left. Every
    process must call it at the same steps (where metrics are logged, before a checkpoint)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keys: list[str] = []
        self._step: torch.Tensor | None = None  # this step's codes, per key
        self._pending: list[torch.Tensor] = []  # the codes of each step since the last check
        self._streak, self._since, self._what = 0, 0, {}

    def observe(self, parts: dict[str, torch.Tensor]) -> None:
        """One micro batch's logged values (those named ``loss*`` are watched)."""
        if not self.limit:
            return
        if not self.keys:
            self.keys = [k for k in parts if k.startswith("loss")]
        values = torch.stack([parts[k].detach().float().reshape(()) for k in self.keys])
        codes = torch.where(values.isnan(), 1,
                            torch.where(values == math.inf, 2, torch.where(values == -math.inf, 3, 0)))
        self._step = codes if self._step is None else torch.maximum(self._step, codes)

    def end_step(self) -> None:
        if self._step is not None:
            self._pending.append(self._step)
            self._step = None

    def check(self, accelerator: Accelerator, step: int) -> None:
        """Raise :class:`Diverged` when the steps up to ``step`` (1-based) end ``limit`` non-finite ones in a row."""
        if not self._pending:
            return
        history = torch.stack(self._pending)
        self._pending = []
        if accelerator.num_processes > 1:
            history = accelerator.gather(history[None]).amax(0)
        first = step - len(history) + 1
        for offset, codes in enumerate(history.tolist()):
            if not any(codes):
                self._streak = 0
                continue
            self._streak += 1
            if self._streak == 1:
                self._since = first + offset
                self._what = {k: _NONFINITE_WORDS[c] for k, c in zip(self.keys, codes) if c}
        if self._streak >= self.limit:
            raise Diverged(
                f"{self._describe()} at step {self._since}, and the losses stayed NaN or infinite for "
                f"{self._streak} steps in a row (train.max_nonfinite_steps = {self.limit}): the run diverged. Lower "
                "optim.lr, set optim.grad_clip or use bf16 rather than fp16, then start it again.")

    def _describe(self) -> str:
        """``"loss_mlm and loss were nan"``, ``"loss was inf"``."""
        by_kind: dict[str, list[str]] = {}
        for key, word in self._what.items():
            by_kind.setdefault(word, []).append(key)
        return ", ".join(f"{' and '.join(keys)} {'was' if len(keys) == 1 else 'were'} {word}"
                         for word, keys in by_kind.items())


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next step. A second
    SIGINT (Ctrl-C twice) gives up at once; repeated SIGTERMs do not, because a
    cancel reaches a rank both directly and through ``accelerate launch``."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def build_optimizer(model: torch.nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """The trainer's AdamW over the trainable parameters (:func:`param_groups`), fused where torch has the
    kernel for ``device``."""
    return torch.optim.AdamW(
        param_groups(model, lr=o.lr, weight_decay=o.weight_decay, head_lr_mult=o.head_lr_mult,
                     fusion_lr_mult=o.fusion_lr_mult),
        lr=o.lr, betas=o.betas, eps=o.eps, fused=device.type in _FUSED_ADAMW_DEVICES,
    )


@dataclass(frozen=True)
class Session:
    """One session of a run (a fresh start or a resume), as :func:`setup` builds it: the prepared
    model, optimizer and loaders, and the state and accounting that :func:`fit` and :func:`finish` update."""

    cfg: RunConfig
    store: Store
    run_id: str
    run_dir: Path
    reporter: Reporter
    accelerator: Accelerator
    micro: int  # per-process micro batch
    accum: int  # micro batches per optimizer step
    data: DataBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    train_dl: DataLoader
    eval_dl: DataLoader
    state: TrainState
    flops: FlopMeter
    timer: StepTimer
    info: DeviceInfo | None  # main process only
    writer: MetricsWriter | TrackedWriter | None  # main process only

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: RunConfig, store: Store, run_id: str, *, resume: bool, reporter: Reporter) -> Session:
    """Build the run (accelerator, data, model, optimizer, loaders), ``accelerator.prepare`` it, load its
    latest checkpoint when ``resume``, and mark it running."""
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    run_dir = store.run_dir(run_id)
    identity = _run_identity(cfg, run_dir, run_id) if cfg.tracking.log_with else None
    accelerator, micro, accum = build_accelerator(
        cfg, _run_trackers(cfg, identity, store, reporter, resume) if identity else None)
    set_seed(cfg.run.seed)
    data = build_data(cfg, cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else store.root / "cache")
    if cfg.task and data.answers is not None and accelerator.is_main_process:
        atomic_write_text(run_dir / ANSWERS, json_text(data.answers, run_dir / ANSWERS))
    model, freeze_report = _build_model(cfg, data, store, run_dir, resume, reporter)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device)
    sampler = EpochSampler(len(data.train), cfg.run.seed)
    train_dl, eval_dl = _loaders(cfg, data, sampler, micro)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    state = _resumed_state(accelerator, run_dir, reporter) if resume else TrainState(best_scores={})
    main = accelerator.is_main_process
    flops = FlopMeter()  # counts the first step and the first evaluation batch
    info = (DeviceInfo.detect(accelerator.device, accelerator.mixed_precision, accelerator.num_processes,
                              store.root / "cache", autocast=accelerator.autocast()) if main else None)
    accelerator.wait_for_everyone()  # a CPU peak is measured once per machine, with the other processes idle
    timer = StepTimer(sync=device_sync(accelerator.device), micro_batches=accum, seconds=state.train_seconds)
    if main:
        versions = session_versions(store.get_run(run_id).versions, software_versions(), state.step)
        store.mark_running(run_id, pid=os.getpid(), host=socket.gethostname(), device=_device_name(accelerator),
                           params=freeze_report.to_dict(), max_steps=cfg.train.max_steps,
                           compute=_compute(info, flops, timer, state, None, accelerator.device), versions=versions)
    writer: MetricsWriter | TrackedWriter | None = store.metrics_writer(run_id) if main else None
    if writer:
        writer.rewind(state.step)
        if identity and accelerator.log_with:
            writer = _start_trackers(cfg, accelerator, identity, run_dir, writer, reporter)
    return Session(cfg, store, run_id, run_dir, reporter, accelerator, micro, accum, data, model, optimizer, sampler,
                   train_dl, eval_dl, state, flops, timer, info, writer)


def _build_model(cfg: RunConfig, data: DataBundle, store: Store, run_dir: Path, resume: bool,
                 reporter: Reporter) -> tuple[VLModel, FreezeReport]:
    """The model with its ``train.init_from`` weights and ``freeze`` applied, and the freeze report."""
    model = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers)
    # a resumed run loads its own checkpoint; one resumed before its first checkpoint (a retry)
    # starts from init_from like a fresh run
    if cfg.train.init_from and not (resume and latest_checkpoint(run_dir) is not None):
        reporter.message(describe_init(cfg.train.init_from, *init_weights_from(model, cfg.train.init_from, store)))
    freeze_report = apply_freeze(model, cfg.freeze)
    if freeze_report.trainable == 0:
        raise ConfigError("freeze.groups freezes every parameter; nothing would train.")
    if cfg.train.compile:
        compiled = compile_model(model, mode=cfg.train.compile_mode, regions=cfg.train.compile_regions)
        reporter.message(f"compiling {'the whole model' if compiled == [''] else f'{len(compiled)} blocks'} with "
                         f"torch.compile (mode {cfg.train.compile_mode}): the first steps are slower")
    return model, freeze_report


def _loaders(cfg: RunConfig, data: DataBundle, sampler: EpochSampler, micro: int) -> tuple[DataLoader, DataLoader]:
    """The training loader (micro batches in ``sampler``'s order) and the evaluation loader, each with a
    generator of its own (the training loader's seeded at every epoch by :func:`use_epoch`), so that creating
    their iterators never draws from torch's global generator."""
    workers = cfg.data.num_workers
    train_dl = DataLoader(data.train, batch_size=micro, sampler=sampler, collate_fn=_identity, drop_last=True,
                          num_workers=workers, generator=torch.Generator())
    eval_dl = DataLoader(data.eval, batch_size=max(micro, 256), collate_fn=_identity, num_workers=workers,
                         generator=torch.Generator().manual_seed(seed_of("eval loader", cfg.run.seed)))
    if len(train_dl) == 0:
        raise ConfigError(
            f"train.batch_size = {cfg.train.batch_size} is larger than the training set "
            f"({len(data.train)} samples)."
        )
    return train_dl, eval_dl


def _resumed_state(accelerator: Accelerator, run_dir: Path, reporter: Reporter) -> TrainState:
    """The state of the run's latest checkpoint, loaded with its model and optimizer; a fresh state if it has none."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return TrainState(best_scores={})
    accelerator.load_state(str(ckpt))
    reporter.message(f"resumed from {ckpt.name}")
    return TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))


def fit(s: Session, log: StepLog) -> str:
    """The loop: each micro batch under ``accelerator.accumulate``, and after each optimizer step its log,
    evaluation and checkpoint. Returns "finished" at ``train.max_steps``, or "cancelled" (after a
    checkpoint) when a signal asked it to stop."""
    cfg, accelerator, state = s.cfg, s.accelerator, s.state
    if state.step >= cfg.train.max_steps:
        return "finished"
    guard = NonfiniteGuard(cfg.train.max_nonfinite_steps)
    micro_index = 0  # micro batch within the optimizer step; every step (and a resumed run) starts at 0
    s.model.train()
    with _StopFlag() as stop:
        for batch in _train_batches(s):
            s.timer.start(sampled=_logs(state.step + 1, cfg), warm=s.flops.done)
            with accelerator.accumulate(s.model):
                parts = _train_micro_batch(s, batch, micro_index)
            micro_index = 0 if accelerator.sync_gradients else micro_index + 1
            s.timer.mark("optimizer")
            guard.observe(parts)
            log.add(parts)
            if not accelerator.sync_gradients:
                continue
            guard.end_step()
            state.count_step(cfg.train.batch_size, s.flops.train, s.timer.seconds)
            if _logs(state.step, cfg):
                log_step(s, log, guard)
            maybe_evaluate(s, log)
            stopping = _should_stop(accelerator, stop)
            if stopping:
                _save_checkpoint(s)
                return "cancelled"
            maybe_checkpoint(s, guard)
            if state.step >= cfg.train.max_steps:
                break
    return "finished"


def _train_batches(s: Session) -> Iterator[Any]:
    """The training micro batches of every epoch from where the run stands, each epoch's timed as it arrives."""
    return itertools.chain.from_iterable(
        map(s.timer.batches, epochs(s.train_dl, s.sampler, s.state, s.accelerator, s.accum)))


def _train_micro_batch(s: Session, batch: dict[str, torch.Tensor], micro_index: int) -> dict[str, torch.Tensor]:
    """Forward and backward of micro batch ``micro_index`` of the step, then :func:`optimizer_step`; returns
    its logged values."""
    cfg, step, process = s.cfg, s.state.step, s.accelerator.process_index
    step_fn = _pretrain_step if cfg.objectives else _finetune_step
    gen = torch.Generator().manual_seed(O.micro_batch_seed(cfg.run.seed, step, micro_index, process))
    # What draws from torch's global generators inside the forward (dropout) draws from a seed of this micro
    # batch alone, as fairseq's Trainer._set_seed seeds them by (seed, update) "so that we get reproducible
    # results when resuming from checkpoints": the global generators' state when a checkpoint is saved (which
    # accelerate's save_state keeps) no longer matters, nor what drew from them since (docs/PROTOCOLS.md,
    # "Exact resume").
    seed_global_generators(seed_of("forward", cfg.run.seed, step, micro_index, process), s.accelerator.device)
    with s.flops.count("forward", batch):
        loss, parts = step_fn(s.model, batch, cfg, s.data, gen)
    s.timer.mark("forward")
    with s.flops.count("backward", batch):
        s.accelerator.backward(loss)
    s.timer.mark("backward")
    optimizer_step(s)
    return parts


def optimizer_step(s: Session) -> None:
    """Clip the gradients, set the scheduled learning rate, step and zero them: the prepared optimizer
    only steps on the last micro batch of the step (``accelerator.sync_gradients``)."""
    if s.accelerator.sync_gradients and s.cfg.optim.grad_clip:
        s.accelerator.clip_grad_norm_(s.model.parameters(), s.cfg.optim.grad_clip)
    factor = _scheduled(s.cfg, s.state.step)
    for group in s.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def _scheduled(cfg: RunConfig, step: int) -> float:
    """The run's learning-rate multiplier at optimizer step ``step`` (0-based)."""
    return lr_factor(step, cfg.train.max_steps, int(cfg.optim.warmup_ratio * cfg.train.max_steps), cfg.optim.schedule)


def log_step(s: Session, log: StepLog, guard: NonfiniteGuard) -> None:
    """Write the metrics of the step just taken (main process; the run record's progress every
    INDEX_UPDATE_S), report them, and stop a diverged run."""
    cfg, state = s.cfg, s.state
    metrics = log.flush(s.accelerator, state.samples_seen, lr=cfg.optim.lr * _scheduled(cfg, state.step - 1),
                        epoch=state.epoch + state.batches_into_epoch / len(s.train_dl) * s.accum)
    if s.writer:
        compute = _compute(s.info, s.flops, s.timer, state, metrics["samples_per_s"], s.accelerator.device)
        s.writer.log(state.step, **metrics, **compute_series(compute))
        if log.index_due():
            with contextlib.suppress(StoreBusy):  # progress only: the next interval retries
                s.store.update_run(s.run_id, step=state.step, loss_trace=log.trace(), compute=compute)
    s.reporter.step(state.step, metrics)
    guard.check(s.accelerator, state.step)


def maybe_evaluate(s: Session, log: StepLog) -> None:
    """Evaluate the task every ``train.eval_every`` steps (the last step's evaluation is :func:`finish`'s)."""
    cfg, step = s.cfg, s.state.step
    if not cfg.task or step % cfg.train.eval_every or step >= cfg.train.max_steps:
        return
    with s.timer.paused():
        scores = evaluate(s.model, s.eval_dl, s.accelerator, cfg.data.eval_max_samples, cfg.task.name, flops=s.flops)
    _record_scores(s, scores)
    s.model.train()
    log.restart_clock()  # evaluation time is not training throughput


def maybe_checkpoint(s: Session, guard: NonfiniteGuard) -> None:
    """Save a checkpoint every ``train.checkpoint_every`` steps, unless the run diverged."""
    if s.state.step % s.cfg.train.checkpoint_every == 0:
        guard.check(s.accelerator, s.state.step)  # no diverged weights over the last good ones
        _save_checkpoint(s)


def finish(s: Session, log: StepLog, status: str, error: str | None) -> dict[str, float]:
    """End the session: a finished run's final evaluation (:func:`validate`), last checkpoint and weights;
    then the run record's trace, scores, compute and ``status``. Returns the final scores."""
    final: dict[str, float] = {}
    test: dict[str, float] = {}
    if status == "finished":
        if s.cfg.task:
            final, test = validate(s)
        if s.state.step % s.cfg.train.checkpoint_every:  # not saved at this step yet
            _save_checkpoint(s)
        state_dict = s.accelerator.get_state_dict(s.model)  # every process: FSDP/DeepSpeed gather their shards
        if s.main:
            _save_weights(s.run_dir, {k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    test_scores = {f"test/{k}": v for k, v in test.items() if k != "eval_samples"}
    if isinstance(s.writer, TrackedWriter):
        s.writer.summary(s.state.step, test_scores)
    _close_writer(s, status)
    if s.main:
        trace = {"loss_trace": log.trace()} if log.losses else {}
        tested = {"test_scores": test_scores} if test_scores else {}
        s.store.update_run(s.run_id, step=s.state.step, **trace, **({"final_scores": final} if final else {}),
                           **tested, compute=_compute(s.info, s.flops, s.timer, s.state, log.samples_per_s,
                                                      s.accelerator.device))
        s.store.mark_ended(s.run_id, status, error=error)
    return final


def validate(s: Session) -> tuple[dict[str, float], dict[str, float]]:
    """The final scores on the whole eval split, then on the test split (once, after every choice was made
    on the eval split; empty without one)."""
    assert s.cfg.task is not None
    final = evaluate(s.model, s.eval_dl, s.accelerator, None, s.cfg.task.name, flops=s.flops)
    _record_scores(s, final, final=True)
    test: dict[str, float] = {}
    if s.data.test is not None:
        loader = s.accelerator.prepare(DataLoader(s.data.test, batch_size=max(s.micro, 256), collate_fn=_identity))
        test = evaluate(s.model, loader, s.accelerator, None, s.cfg.task.name, flops=s.flops)
        s.state.eval_pflops += (s.flops.eval or 0.0) * test["eval_samples"] / 1e15
        s.reporter.message(_format_scores(s.state.step, test, final=True, split="test"))
    return final, test


def train(cfg: RunConfig, store: Store, run_id: str, *, resume: bool = False,
          reporter: Reporter | None = None) -> dict[str, float]:
    """Train run ``run_id`` (already created in ``store``) and return its final scores: :func:`setup`,
    :func:`fit`, :func:`finish`. A failure after setup is recorded on the run and raised; Ctrl-C cancels."""
    reporter = reporter or SilentReporter()
    s = setup(cfg, store, run_id, resume=resume, reporter=reporter)
    log = StepLog(s.state.samples_seen)
    reporter.start(cfg.train.max_steps, s.state.step)
    error = None
    try:
        status = fit(s, log)
        if status == "cancelled":  # a cancel (SIGTERM) or one Ctrl-C, after a checkpoint: say so on the record
            error = (f"stopped at step {s.state.step} when asked to (a cancel or Ctrl-C), after saving its "
                     f"checkpoint; a retry or `ren run --resume {run_id}` continues it")
    except KeyboardInterrupt:
        status, error = "cancelled", "interrupted"
    except Exception as exc:  # record the failure, then re-raise for the caller
        _record_failure(exc, s, log)
        reporter.stop()
        raise
    reporter.stop()
    try:
        return finish(s, log, status, error)
    except Exception as exc:
        _record_failure(exc, s, log)
        raise


VERSIONED = ("torch", "transformers", "timm", "accelerate")


def software_versions() -> dict[str, str]:
    """The versions a run trains with: python, ren (and the commit of its source, when that is a git
    checkout), torch, transformers, timm, accelerate."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    out = {"python": platform.python_version(), "ren": installed("ren")}
    source = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            out["ren_commit"] = commit.stdout.strip()
    return {**out, **{name: installed(name) for name in VERSIONED}}


def session_versions(earlier: tuple[dict[str, Any], ...], now: dict[str, str], step: int
                     ) -> tuple[dict[str, Any], ...]:
    """A run's versions once a session starting at ``step`` runs with ``now``: the earlier sessions', plus
    ``now`` when it differs from the last of them."""
    if earlier and {k: v for k, v in earlier[-1].items() if k != "from_step"} == now:
        return earlier
    return (*earlier, {"from_step": step, **now})


def _close_writer(s: Session, status: str) -> None:
    """Close the main process's metrics writer; trackers hear how the run ended (``status``)."""
    if isinstance(s.writer, TrackedWriter):
        s.writer.close(status)
    elif s.writer:
        s.writer.close()


def _record_failure(exc: Exception, s: Session, log: StepLog) -> None:
    """Mark the run failed with the reason, and record the step it reached and its loss trace. When the store
    itself refuses writes (a full disk), the points it cannot take are given up and the record, if it cannot
    be written, is left "running" (shown as crashed once the process is gone): ``exc`` is what counts."""
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.OutOfMemoryError):
        error = oom_message(batch_size=s.cfg.train.batch_size, micro_batch_size=s.micro,
                            processes=s.accelerator.num_processes, where=_device_name(s.accelerator))
    with contextlib.suppress(StoreError):
        _close_writer(s, "failed")
    if s.main:
        with contextlib.suppress(StoreError):
            s.store.update_run(s.run_id, step=s.state.step, loss_trace=log.trace())
        with contextlib.suppress(StoreError):
            s.store.mark_ended(s.run_id, "failed", error=error)


def _logs(step: int, cfg: RunConfig) -> bool:
    """Whether optimizer step ``step`` (1-based) writes training metrics."""
    return step % cfg.train.log_every == 0 or step == cfg.train.max_steps


def _compute(info: DeviceInfo | None, flops: FlopMeter, timer: StepTimer, state: TrainState,
             samples_per_s: float | None, device: torch.device) -> dict[str, Any]:
    """The run record's compute accounting as it stands (main process: ``info`` is set)."""
    assert info is not None
    return compute_record(info, flops=flops, samples_per_s=samples_per_s, step_split=timer.split(),
                          peak_memory=peak_memory_mb(device), pflops=state.pflops, eval_pflops=state.eval_pflops,
                          train_seconds=state.train_seconds)


def _should_stop(accelerator: Accelerator, stop: _StopFlag) -> bool:
    """Whether to stop after this step; with several processes they agree (any one
    signalled stops all at the same step, so the checkpoint's collectives line up)."""
    if accelerator.num_processes == 1:
        return stop.signal is not None
    if stop.signal is not None:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def _mean_over_processes(accelerator: Accelerator, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-step averages of the logged step metrics over every process's micro batches."""
    keys = sorted(sums)
    stacked = torch.stack([sums[k].float() for k in keys]) / count
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(keys, stacked.tolist()))


def _identity(batch: Any) -> Any:
    return batch


def _device_name(accelerator: Accelerator) -> str:
    device = accelerator.device
    n = accelerator.num_processes
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{n}x {name}" if n > 1 else name
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    return f"{n}x {cpu}" if n > 1 else cpu


def _pretrain_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig,
                   data: DataBundle, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward over row blocks: MLM rows (masked text, true images), then ITM rows
    (clean text, about half the images swapped) or, without ITM, clean pairs for ITC.
    ITC pairs the clean texts with the true images of the batch. ITM negatives and ITC
    compare against the batch gathered over every process; pairs with equal caption keys (the
    data set's ``text_keys`` where it has them, else equal tokens) count as the same pair (never an
    ITM negative, an ITC positive)."""
    obj = cfg.objectives
    assert obj is not None
    ids, mask, pix, image_ids = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_ids"]
    b = ids.shape[0]
    keys = batch["text_keys"] if "text_keys" in batch else O.text_keys(ids, mask)  # the data's meaning, else tokens
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
    if obj.mlm:
        masked, mlm_labels = O.mask_tokens(
            ids, batch["word_ids"], mask_prob=obj.mlm.mask_prob, whole_word=obj.mlm.whole_word,
            mask_id=data.mask_token_id, vocab_size=data.vocab_size, num_special=data.num_special_tokens,
            generator=gen,
        )
        blocks.append((masked, pix))
    if obj.itm:
        hard_logits = None
        if obj.itm.negatives == "hard":
            with torch.no_grad():
                emb = model(ids, mask, pix, towers_only=True).itc
                hard_logits = emb.scale * emb.text @ O.gather(emb.image).T
        itm_pix, itm_labels, unpaired = O.itm_pairs(pix, image_ids, keys, negative_ratio=obj.itm.negative_ratio,
                                                    generator=gen, hard_logits=hard_logits)
        blocks.append((ids, itm_pix))
    elif obj.itc:
        blocks.append((ids, pix))
    n_mlm = b if obj.mlm else 0
    all_ids = torch.cat([block[0] for block in blocks])
    mlm_positions = None
    if obj.mlm:
        mlm_positions = torch.zeros(all_ids.shape, dtype=torch.bool, device=ids.device)
        mlm_positions[:b] = mlm_labels != O.IGNORE
    out = model(all_ids, mask.repeat(len(blocks), 1), torch.cat([block[1] for block in blocks]),
                mlm_positions=mlm_positions, itm_rows=slice(n_mlm, n_mlm + b) if obj.itm else None,
                itc=bool(obj.itc))
    parts: dict[str, tuple[torch.Tensor, float]] = {}
    if obj.mlm:
        parts["mlm"] = (O.mlm_loss(out.logits["mlm"], mlm_labels[mlm_positions[:b]]), obj.mlm.weight)
    if obj.itm:
        parts["itm"] = (O.itm_loss(out.logits["itm"], itm_labels), obj.itm.weight)
    if obj.itc:
        emb, texts = out.itc, slice(n_mlm, n_mlm + b)  # clean texts
        if obj.mlm or not obj.itm:  # rows 0..b show the true images
            itc = O.gathered_itc_loss(emb.text[texts], emb.image[:b], emb.scale, image_ids, keys)
        else:  # only the ITM rows exist: keep their matched pairs
            itc = O.gathered_itc_loss(emb.text[texts], emb.image[texts], emb.scale, image_ids, keys,
                                      valid=itm_labels.bool())
        parts["itc"] = (itc, obj.itc.weight)
    loss = sum(weight * value for value, weight in parts.values())
    logged = {f"loss_{name}": value.detach() for name, (value, _) in parts.items()}
    logged["loss"] = loss.detach()
    if obj.itm:  # share of pairs that drew a negative but had no valid one in the gathered batch
        logged["itm_unpaired"] = unpaired.detach().float() / b
    return loss, logged


def task_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task head's logits; an NLVR2 batch brings its two images as pixel_values_0/1,
    a RefCOCO batch its candidate boxes."""
    if "boxes" in batch:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], task=True,
                    boxes=batch["boxes"], box_mask=batch["box_mask"])
    elif "pixel_values_1" in batch:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values_0"], task=True,
                    pair_pixel_values=batch["pixel_values_1"])
    else:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], task=True)
    return out.logits["task"]


def _finetune_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig,
                   data: DataBundle, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    task = cfg.task.name
    logits = task_logits(model, batch)
    loss = T.task_loss(task, logits, batch["labels"], cfg.task.loss)
    with torch.no_grad():
        score = T.task_score(task, logits, batch["labels"], batch.get("boxes")).mean()
    return loss, {"loss": loss.detach(), f"train_{T.METRICS[task]}": score}


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation batch: the task head's logits and each sample's score (what :func:`evaluate` averages):
    the official VQA accuracy where the batch brings ``official_scores``, else the task's score."""
    logits = task_logits(model, batch)
    return logits, T.task_score(task, logits, batch.get("official_scores", batch["labels"]), batch.get("boxes"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator,
             max_samples: int | None, task: str = "vqa", *, flops: FlopMeter | None = None) -> dict[str, float]:
    """The task's metric (VQA score or accuracy) over the eval loader (all processes,
    gathered once per batch). ``model`` is the prepared model, so sharded
    (FSDP/DeepSpeed) models evaluate too. ``flops`` counts the first batch's forward."""
    was_training = model.training
    model.eval()
    total, n, official = 0.0, 0, True
    for batch in loader:
        official = official and "official_scores" in batch
        with flops.count("eval", batch) if flops else contextlib.nullcontext():
            scores = score_batch(model, batch, task)[1]
        scores = accelerator.gather_for_metrics(scores)
        total += float(scores.sum())
        n += scores.numel()
        if max_samples and n >= max_samples:
            break
    model.train(was_training)
    return {T.metric_name(task, official and n > 0): total / max(n, 1), "eval_samples": float(n)}


def _record_scores(s: Session, scores: dict[str, float], final: bool = False) -> None:
    """An evaluation on the eval split: its compute, the best scores so far, its metrics (main process), its line."""
    state, split = s.state, s.cfg.data.eval_split
    state.eval_pflops += (s.flops.eval or 0.0) * scores["eval_samples"] / 1e15
    metric = {f"eval/{k}": v for k, v in scores.items() if k != "eval_samples"}
    best = dict(state.best_scores or {})
    for k, v in metric.items():
        if math.isfinite(v):  # a NaN score is in the metrics (as null), never the best
            best[k] = max(best.get(k, -math.inf), v)
    state.best_scores = best
    if s.writer:
        s.writer.log(state.step, **metric)
        s.writer.flush()
        s.store.update_run(s.run_id, best_scores=best, eval_split=split)
    s.reporter.message(_format_scores(state.step, scores, final=final, split=split))


def _format_scores(step: int, scores: dict[str, float], final: bool = False, split: str | None = None) -> str:
    label = ("final" if final else f"step {step}") + (f" ({split})" if split else "")
    return f"{label}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in scores.items() if k != "eval_samples"
    ) + f" on {int(scores.get('eval_samples', 0))} samples"


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.train RUN_ID [--resume]``: train a run stored in ``$REN_HOME``."""
    import argparse

    from engine.jobs.runner import install_output_guard

    parser = argparse.ArgumentParser(prog="python -m engine.train")
    parser.add_argument("run_id")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    install_output_guard()  # a queued run's trainer outlives its runner (engine.jobs.runner)
    store = Store()
    record = store.get_run(args.run_id)
    cfg = config_from_dict(record.config, source=f"run {record.id}")
    from engine.progress import make_reporter

    train(cfg, store, record.id, resume=args.resume, reporter=make_reporter())
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (about a second with torch loaded): the
    run's record, metrics and weights are already on disk, and a queued run waits on it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())

