"""The work behind each ``ren`` command. Only the store façade touches run data."""

from __future__ import annotations

import _thread
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine import faults
from engine.cli import jsonout
from engine.config import RunConfig, check_processes, config_from_dict, load_preset
from engine.display import (
    eval_split_of,
    format_duration,
    format_run_scores,
    format_scores,
    format_steps,
    format_versions,
    si,
    terminal_safe,
)
from engine.errors import EXIT_FAILED_RUN, RenError, oom_message
from engine.inspector import model_summary
from engine.runs import check_init_from, create_run, resolve_init_from, resume_point, stored_config, trained_now
from engine.store import RunRecord, Store, process_start_time

console = Console()
err_console = Console(stderr=True)


class _Owner:
    """The runs this ``ren run`` process trains, and what ends them. Each is marked "running" with this
    process's pid before anything else happens (data, model, imports), so a run killed at any moment is seen
    as crashed once the pid is gone, never left "created"; an exception before the trainer records an outcome
    marks it failed with the error, and Ctrl-C marks it cancelled. Ctrl-C raises KeyboardInterrupt until the
    interruption is being recorded, after which further presses are ignored: twice in a row exits as once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.runs: list[str] = []
        self._default_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        self._default_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def close(self) -> None:
        """Give back the SIGINT handler and the unraisable hook (for callers that go on, such as tests); after
        an interruption SIGINT stays ignored while the process exits."""
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._default_sigint)
        sys.unraisablehook = self._default_hook

    def _on_sigint(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        """A Ctrl-C that lands in a finaliser (``__del__``) cannot propagate there, and Python would print
        "Exception ignored in ... Traceback" and go on: deliver it again a moment later, from another thread,
        once the finaliser has returned, where it can stop the run."""
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            again = threading.Timer(0.05, _thread.interrupt_main)
            again.daemon = True
            again.start()
        else:
            self._default_hook(unraisable)

    def claim(self, run_id: str) -> None:
        claimed = self.store.transition(
            run_id, ("created", "failed", "cancelled", "crashed"), status="running", pid=os.getpid(),
            pid_started=process_start_time(os.getpid()), host=socket.gethostname(), started_at=time.time(),
            ended_at=None, error=None, launched_at=None, runner_pid=None, runner_started=None, devices=(),
            cancel_requested_at=None)
        if claimed is None:
            raise RenError(f"run {run_id} is {self.store.get_run(run_id).status} now: another ren process took it "
                           "over meanwhile.")
        self.runs.append(run_id)
        faults.at("run:claimed")

    def end(self, status: str, why: Callable[[RunRecord], str]) -> list[RunRecord]:
        """Mark every run this process still holds (running under its pid) ``status``; returns them."""
        ended = []
        for run_id in self.runs:
            with contextlib.suppress(RenError):
                record = self.store.get_run(run_id)
                done = self.store.transition(run_id, ("running",), {"pid": os.getpid()}, status=status,
                                             error=why(record), ended_at=time.time())
                if done is not None:
                    ended.append(done)
        return ended

    def interrupted(self) -> None:
        """After Ctrl-C: record it, say what happened, exit 130 (no traceback)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        faults.at("run:interrupted")
        ended = self.end("cancelled", lambda r: "interrupted (Ctrl-C) " + (
            "before its first step" if not r.step else f"at step {r.step}") + "; `ren run --resume` continues it")
        err_console.print("interrupted" + "".join(f"; run {r.id} recorded as cancelled ({r.error})" for r in ended),
                          soft_wrap=True, highlight=False, markup=False)
        sys.exit(130)


def _failure(exc: Exception) -> Callable[[RunRecord], str]:
    reason = str(exc) if isinstance(exc, RenError) else f"{type(exc).__name__}: {exc}"
    return lambda r: reason


def run(preset: Path | None, overrides: list[str], *, resume: str | None, name: str | None, gpus: int) -> None:
    if gpus < 1:
        raise RenError(f"--gpus {gpus}: a run needs at least one GPU (or CPU process).")
    store = Store()
    owner = _Owner(store)
    try:
        if resume:
            if preset is not None or overrides:
                raise RenError("--resume continues a stored run with its stored config; drop the preset and --set.")
            record, cfg = stored_config(store, resume)
            console.print(f"resuming [bold]{record.id}[/] {resume_point(store, record.id)}")
        else:
            if preset is None:
                raise RenError("give a preset file (e.g. `ren run presets/quickstart.toml`) or --resume RUN_ID.")
            if name:
                overrides = [*overrides, f"run.name={json.dumps(name)}"]
            cfg = load_preset(preset, overrides)
            check_processes(cfg.train, gpus)
            train_upstream = trained_now(store, lambda c, run_id: _train_here(c, owner, run_id, resume=False),
                                         say=console.print)
            cfg = resolve_init_from(cfg, preset, store, train_upstream)
            check_init_from(store, cfg)
            record = create_run(store, cfg, str(preset))
            console.print(f"run [bold]{record.id}[/] ({cfg.stage}, {cfg.model.kind}) in {store.run_dir(record.id)}")
        if gpus > 1 or cfg.distributed.strategy != "ddp":
            _launch_distributed(cfg, owner, record.id, gpus, resume=bool(resume))
        else:
            _train_here(cfg, owner, record.id, resume=bool(resume))
    except KeyboardInterrupt:
        owner.interrupted()
    finally:
        owner.close()


def _train_here(cfg: RunConfig, owner: _Owner, run_id: str, *, resume: bool) -> None:
    store = owner.store
    owner.claim(run_id)
    t0 = time.time()
    try:
        from engine.progress import make_reporter
        from engine.train import train

        scores = train(cfg, store, run_id, resume=resume, reporter=make_reporter(console))
    except Exception as exc:
        owner.end("failed", _failure(exc))  # the trainer records its own failures; this is for the rest
        if resume:
            _refused_checkpoint(exc, store, run_id)
        _out_of_memory(exc, cfg, store, run_id)
        raise
    final = store.get_run(run_id)
    named = [format_scores(scores, split=eval_split_of(final))] if scores else []
    named += [format_scores(final.test_scores)] if final.test_scores else []
    console.print(f"[bold]{final.status}[/] {final.id} in {time.time() - t0:.0f}s" + "".join(f"  {s}" for s in named),
                  soft_wrap=True)  # one line, whatever the terminal's width, for scripts that read it


def _out_of_memory(exc: Exception, cfg: RunConfig, store: Store, run_id: str) -> None:
    """A :class:`RenError` saying what to change when ``exc`` is a CUDA out-of-memory failure: the batch does
    not fit, which a setting fixes, so the user gets the paragraph the run was recorded with, not a traceback."""
    import torch

    if not isinstance(exc, torch.OutOfMemoryError):
        return
    recorded = store.get_run(run_id).error or ""
    if not recorded.startswith("CUDA out of memory on"):  # it failed before the trainer's loop (moving the model)
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "the device"
        recorded = oom_message(batch_size=cfg.train.batch_size, micro_batch_size=cfg.train.micro_batch_size,
                               processes=1, where=where)
        store.update_run(run_id, error=recorded)
    raise RenError(f"run {run_id} failed: {recorded}") from None


def _refused_checkpoint(exc: Exception, store: Store, run_id: str) -> None:
    """A :class:`RenError` naming the checkpoint when ``exc`` is a refused or unreadable checkpoint file
    (weights-only unpickling refuses anything but tensors and plain state; safetensors a damaged file)."""
    import pickle

    from safetensors import SafetensorError

    from engine.train import latest_checkpoint

    checkpoint = latest_checkpoint(store.run_dir(run_id))
    if checkpoint is not None and isinstance(exc, (pickle.UnpicklingError, SafetensorError)):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        if isinstance(exc, pickle.UnpicklingError):  # torch's text goes on to explain how to load it unsafely
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            reason = f"it names the Python object {found.group(1)}" if found else "it holds Python objects"
            reason += ", which weights-only unpickling refuses."
        else:
            reason = " ".join(text.split()) + "."
        raise RenError(
            f"run {run_id}: its checkpoint {checkpoint} was refused: {reason} "
            "Checkpoint files are loaded as tensors and plain state only, never as code; this one is damaged or "
            "was replaced. Restore it, or remove the run's checkpoints directory to train it again from the start."
        ) from None


def _launch_distributed(cfg: RunConfig, owner: _Owner, run_id: str, gpus: int, *, resume: bool) -> None:
    """Train ``run_id`` in ``gpus`` processes through ``accelerate launch`` (this
    interpreter's accelerate, so no activated environment is needed). When they fail, exit 1, a failed run,
    as a single process does: accelerate's own code says nothing more (it is 1 for any failure of a process,
    and a launcher killed by a signal would exit with a negative code, which the shell reads as 2xx)."""
    from engine.jobs.launchers import free_port, launch_command

    owner.claim(run_id)  # until its rank 0 records itself
    try:
        cmd = launch_command(run_id, processes=gpus, mixed_precision=cfg.train.mixed_precision, dist=cfg.distributed,
                             resume=resume, main_process_port=free_port(), grad_clip=cfg.optim.grad_clip)
    except Exception as exc:
        owner.end("failed", _failure(exc))
        raise
    console.print(" ".join(cmd), highlight=False)
    code = subprocess.call(cmd)
    if code:
        owner.end("failed", lambda r: f"the training processes (accelerate launch) exited with code {code} before "
                                      "recording a result; their output above says why")
        sys.exit(EXIT_FAILED_RUN)


def validate(preset: Path, overrides: list[str], *, as_json: bool, all_groups: bool, gpus: int = 1) -> None:
    from engine.data.pipeline import answer_head

    if gpus < 1:
        raise RenError(f"--gpus {gpus}: a run needs at least one GPU (or CPU process).")
    cfg = load_preset(preset, overrides)
    check_processes(cfg.train, gpus)
    check_init_from(Store(read_only=True), cfg)  # what `ren run` would refuse before creating the run
    summary = model_summary(cfg)
    if as_json:
        jsonout.emit("validate", {"config": cfg.to_dict(), "params": summary})
        return
    console.print(f"[bold]{preset}[/]: valid ({cfg.stage}, {cfg.model.kind})\n")
    console.print(tomli_w.dumps(cfg.to_dict()), highlight=False, markup=False)
    answers, source = answer_head(cfg)
    if answers is not None:
        console.print(f"answer head: {answers} answers ({source})", highlight=False, markup=False)
    _print_params(summary, all_groups)


def _print_params(summary: dict, all_groups: bool) -> None:
    table = Table(title="parameters", show_edge=False)
    for col in ("group", "total", "trainable", "frozen"):
        table.add_column(col, justify="left" if col == "group" else "right")
    rows: dict[str, list[int]] = {}
    for name, g in summary["groups"].items():
        key = name if all_groups else _collapse(name)
        row = rows.setdefault(key, [0, 0])
        row[0] += g["total"]
        row[1] += g["trainable"]
    for key, (total, trainable) in rows.items():
        table.add_row(key, f"{total:,}", f"{trainable:,}", f"{total - trainable:,}")
    table.add_row("[bold]all", f"[bold]{summary['total']:,}", f"[bold]{summary['trainable']:,}",
                  f"[bold]{summary['frozen']:,}")
    console.print(table)


def _collapse(name: str) -> str:
    """``text.layers[3]`` -> ``text.layers[*]`` for the compact table."""
    head, sep, _ = name.partition("[")
    return f"{head}[*]" if sep else name


def list_runs(limit: int, *, as_json: bool = False) -> None:
    store = Store()
    every = store.list_runs()
    records = every[:limit]
    unreadable = store.unreadable_runs()  # shown whatever the limit: each needs a repair
    if as_json:
        jsonout.emit("runs", {"store": str(store.root), "total": len(every),
                              "runs": [jsonout.run_summary(r) for r in records],
                              "unreadable": [{"id": u.id, "reason": u.reason} for u in unreadable]})
        return
    if not records and not unreadable:
        console.print("no runs yet: try `ren run presets/quickstart.toml`")
        return
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    # ids are what `ren show` and `--resume` take: never shorten them. They carry the
    # run name too, so the name column is shown only when there is room for it.
    table.add_column("id", no_wrap=True, min_width=max(len(r.id) for r in [*records, *unreadable]))
    wide = console.width >= 120
    columns = ("name", "stage", "status", "steps", "best", "time") if wide else ("status", "steps", "best", "time")
    for col in columns:
        table.add_column(col, no_wrap=True)
    for r in records:
        cells = {"name": _shown(r.name), "stage": r.stage, "status": _status(r), "steps": format_steps(r),
                 "best": _shown(format_run_scores(r, short=True)), "time": format_duration(r)}
        table.add_row(_shown(r.id), *(cells[c] for c in columns))
    for u in unreadable:
        table.add_row(_shown(u.id), *("[red]unreadable[/]" if c == "status" else "-" for c in columns))
    console.print(table)
    if unreadable:
        console.print(f"\nunreadable records in {store.index_path}, left out of the queue and the TUI (restore "
                      "them from a backup or remove them with a JSON editor):", highlight=False, markup=False,
                      soft_wrap=True)
        for u in unreadable:
            console.print(terminal_safe(f"  {u.id}: {u.reason}"), highlight=False, markup=False)


def show(run_id: str, *, as_json: bool = False) -> None:
    store = Store()
    r = store.get_run(run_id)
    if as_json:
        jsonout.emit("show", _show_document(store, r))
        return
    console.print(f"[bold]{_shown(r.id)}[/]  {_shown(r.name)}  {_shown(f'{r.stage}/{r.kind}')}  {_status(r)}")
    console.print(f"steps {format_steps(r)}  duration {format_duration(r)}  "
                  f"device {_shown(r.device or '-')}  host {_shown(r.host or '-')}")
    if r.tags:
        console.print("tags: " + ", ".join(map(_shown, r.tags)))
    if r.notes:
        console.print("notes: " + terminal_safe(r.notes, lines=True), highlight=False, markup=False)
    if r.error:
        console.print(f"[red]error:[/] {_shown(r.error, lines=True)}")
    if r.log_tail and r.status in ("failed", "crashed"):
        console.print("last lines of its log (`ren logs` has all):")
        console.print(terminal_safe(r.log_tail, lines=True), highlight=False, markup=False)
    if r.params:
        _print_params(r.params, all_groups=False)
    if r.compute:
        _print_compute(r)
    if r.best_scores or r.final_scores or r.test_scores:
        console.print(_shown(format_run_scores(r)), highlight=False)
    if (tokenizer := _tokenizer_of(r)) is not None:
        console.print(f"tokenizer: {terminal_safe(tokenizer)}", highlight=False, markup=False)
    for line in format_versions(r):
        console.print(terminal_safe(line), highlight=False, markup=False)
    last = _last_logged(store, r)
    if last:
        console.print("last logged: " + "  ".join(
            f"{terminal_safe(k)} {v:.4g}" for k, v in last.items() if k != "time" and isinstance(v, (int, float))),
            markup=False)
    console.print(f"\nrun directory: {store.run_dir(r.id)}\nconfig:", markup=False)
    console.print(terminal_safe(tomli_w.dumps(r.config), lines=True), highlight=False, markup=False)


def _last_logged(store: Store, r: RunRecord) -> dict[str, Any] | None:
    """The run's last training metric point (the last one with a loss), or None before its first."""
    return next((p for p in reversed(store.read_metrics(r.id)) if "loss" in p), None)


def _show_document(store: Store, r: RunRecord) -> dict[str, Any]:
    """What ``ren show --json`` prints (schema ``ren.show/1``): the whole record as stored, numbers as
    numbers, plus where the run lives, its tokenizer and its last logged training point."""
    last = _last_logged(store, r)
    return {
        "run": {
            **jsonout.run_summary(r),
            "preset_path": r.preset_path,
            "notes": r.notes,
            "host": r.host,
            "device": r.device,
            "params": r.params or None,
            "compute": r.compute or None,
            "versions": list(r.versions),
            "loss_trace": list(r.loss_trace),
            "log_tail": r.log_tail,
            "study": r.study,
            "gpus": r.gpus,
            "after": list(r.after),
            "config": r.config,
        },
        "run_dir": str(store.run_dir(r.id)),
        "tokenizer": _tokenizer_of(r),
        # a non-finite value is logged as such; standard JSON has no NaN, so it reads null here
        "last_logged": None if last is None else {k: v if not isinstance(v, float) or math.isfinite(v) else None
                                                  for k, v in last.items()},
    }


def _precision(compute: dict[str, Any]) -> str:
    """The dtype the run's matmuls ran in, and the one asked for where that was not applied."""
    dtype, requested = compute.get("dtype", "?"), compute.get("requested_dtype")
    if requested and requested != dtype:
        return f"{dtype} [yellow]({requested} was requested and not applied on this device)[/]"
    return str(dtype)


def _tokenizer_of(r: RunRecord) -> str | None:
    """The tokenizer the run's config builds, in words; None when its config no longer resolves here
    (e.g. a hub backbone whose config is not cached)."""
    from engine.data.pipeline import describe_tokenizer

    try:
        return describe_tokenizer(config_from_dict(r.config, source=f"run {r.id}"))
    except RenError:
        return None


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _params_by_part(params: dict) -> str:
    """``"text 1.2M, vision 5.5M frozen, fusion 3M (1M trained)"``: per top-level part of the model."""
    parts: dict[str, list[int]] = {}
    for name, g in params.get("groups", {}).items():
        part = parts.setdefault(name.split(".")[0], [0, 0])
        part[0] += g["total"]
        part[1] += g["trainable"]
    return ", ".join(f"{name} {si(total, '')}" + ("" if trained == total else " frozen" if trained == 0
                                                 else f" ({si(trained, '')} trained)")
                     for name, (total, trained) in parts.items())


def _compute_rows(r: RunRecord) -> list[tuple[str, str]]:
    """(label, text) rows of a run's compute accounting (``RunRecord.compute``, Contract 1)."""
    c, p, rows = r.compute, r.params, []
    if p.get("total"):
        rows.append(("parameters", f"{p['total']:,} total, {p['trainable']:,} trainable, {p['frozen']:,} frozen"))
        rows.append(("", _params_by_part(p)))
    per = c.get("flops_per_sample") or {}
    if per:
        kinds = [k for k in ("forward", "backward", "train", "eval") if k in per]
        rows.append(("FLOPs/sample", "   ".join(f"{k} {si(per[k], 'FLOP')}" for k in kinds)))
    if "samples_per_s" in c:
        rate = f"{c['samples_per_s']:,.1f} samples/s"
        if "tokens_per_s" in c:
            rate += f"   {c['tokens_per_s']:,.0f} tokens/s"
        rows.append(("throughput", rate + " [dim](last logged interval)[/]"))
    if "achieved_flops" in c:
        line = f"{si(c['achieved_flops'], 'FLOP/s')} achieved"
        if c.get("peak_flops"):
            source = {"table": "vendor table", "measured": "measured matmul"}.get(c.get("peak_source"), "?")
            processes = c.get("processes", 1)
            line += (f" = {c.get('utilisation', 0):.1%} of {processes} x {si(c['peak_flops'], 'FLOP/s')} "
                     f"{c.get('dtype', '')} peak ({source})")
            if c.get("utilisation", 0) > 1:
                line += " [yellow](above 100%: the machine was busier when its peak was measured than in this run)[/]"
        rows.append(("utilisation", line))
    split = c.get("step_split_s") or {}
    if split:
        rows.append(("step time", "   ".join(f"{k} {_seconds(v)}" for k, v in split.items())
                     + f"   = {_seconds(sum(split.values()))}/step"))
    if "peak_memory_mb" in c:
        rows.append(("peak memory", f"{c['peak_memory_mb']:,.0f} MiB"))
    if "pflops" in c:
        total = f"{c['pflops']:.4g} PFLOPs training"
        if c.get("eval_pflops"):
            total += f" + {c['eval_pflops']:.4g} evaluation"
        if "device_hours" in c:
            total += f"   {c['device_hours']:.4g} device-hours ({_seconds(c.get('train_seconds', 0.0))} training)"
        rows.append(("total", total))
    if c.get("device"):
        rows.append(("device", f"{_shown(str(c['device']))}, {_precision(c)}, {c.get('processes', 1)} process(es)"))
    return rows


def _print_compute(r: RunRecord) -> None:
    table = Table(title="compute", title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, text in _compute_rows(r):
        table.add_row(label, text)
    console.print(table)


def _shown(text: str, *, lines: bool = False) -> str:
    """Text from a run record for rich markup: its control characters escaped (engine.display.terminal_safe),
    its brackets too, so a name like "[red]x" prints as written."""
    return escape(terminal_safe(text, lines=lines))


def _status(r: RunRecord) -> str:
    colour = {"finished": "green", "running": "cyan", "failed": "red", "crashed": "red",
              "cancelled": "yellow"}.get(r.status, "white")
    return f"[{colour}]{r.status}[/]"
