"""The work behind ``ren queue``, ``ren logs``, ``ren worker`` and ``ren submit``.

Only the queue API (:mod:`engine.jobs.api`) and the store façade are used; no torch.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engine.cli import jsonout
from engine.config import RunConfig, check_processes, load_preset
from engine.display import format_duration, format_steps
from engine.errors import RenError
from engine.jobs import api as Q
from engine.jobs.gpus import visible_gpus
from engine.jobs.worker import WorkerInfo, run_worker, start_worker, stop_worker, worker_info
from engine.runs import create_run, find_finished, resolve_init_from, retry_outcome, stored_config
from engine.store import Store

console = Console()


def add(preset: Path, overrides: list[str], *, gpus: int, after: list[str], name: str | None) -> None:
    store = Store()
    queued = Q.add(store, preset, overrides, gpus=gpus, after=after, name=name, inventory=visible_gpus())
    order = [r.id for r in store.queued_runs()]
    for record in queued:
        waits = f", after {', '.join(record.after)}" if record.after else ""
        # the worker may have taken it already: it starts at once, and `ren queue add` starts the worker
        where = (f"at position {order.index(record.id) + 1}" if record.id in order
                 else f"and {store.get_run(record.id).status} already")
        console.print(f"queued [bold]{record.id}[/] {where} (gpus {record.gpus}{waits})")
    _worker_line(store)


def ls(*, as_json: bool = False) -> None:
    store = Store()
    v = Q.view(store)
    if as_json:
        jsonout.emit("queue ls", _queue_document(store, v))
        return
    state = "[yellow]paused[/]" if v.settings.paused else "active"
    devices = (f"{len(v.gpus)} GPU(s): {', '.join(str(g.index) for g in v.gpus)}" if v.gpus
               else f"no GPUs, {v.settings.cpu_slots} CPU slot(s)")
    console.print(f"queue {state} · {devices}")
    _worker_line(store, v.worker)
    if not v.running and not v.queued:
        console.print("nothing queued or running: `ren queue add PRESET`")
        return
    if v.running:
        table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold", title_justify="left",
                      title="running")
        for col in ("id", "on", "steps", "time", "note"):
            table.add_column(col, no_wrap=True)
        for r in v.running:
            where = "gpu " + ",".join(map(str, r.devices)) if r.devices else "cpu"
            note = "cancelling" if r.cancel_requested_at else f"pid {r.pid or r.runner_pid}"
            table.add_row(r.id, where, format_steps(r), format_duration(r), note)
        console.print(table)
    if v.queued:
        table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold", title_justify="left",
                      title="queued")
        for col in ("#", "id", "gpus", "waits"):
            table.add_column(col, no_wrap=col != "waits")
        for pos, r in enumerate(v.queued, start=1):
            note = ("resumes · " if r.resume else "") + v.reasons.get(r.id, "")
            table.add_row(str(pos), r.id, str(r.gpus), note)
        console.print(table)


def _queue_document(store: Store, v: Q.QueueView) -> dict[str, Any]:
    """What ``ren queue ls --json`` prints (schema ``ren.queue-ls/1``): the queue's state and devices, its
    worker, the running runs and the queued ones in queue order with why each waits."""
    return {
        "store": str(store.root),
        "paused": v.settings.paused,
        "gpus": [{"index": g.index, "name": g.name, "memory_total_mb": g.memory_total_mb,
                  "memory_used_mb": g.memory_used_mb, "utilization_pct": g.utilization_pct} for g in v.gpus],
        "cpu_slots": v.settings.cpu_slots,
        "worker": _worker_document(v.worker),
        "running": [{"id": r.id, "name": r.name, "step": r.step, "max_steps": r.max_steps,
                     "started_at": r.started_at, "duration_s": r.duration_s, "devices": list(r.devices),
                     "pid": r.pid or r.runner_pid, "cancelling": r.cancel_requested_at is not None}
                    for r in v.running],
        "queued": [{"position": pos, "id": r.id, "name": r.name, "gpus": r.gpus, "after": list(r.after),
                    "resume": r.resume, "queued_at": r.queued_at, "waits": v.reasons.get(r.id)}
                   for pos, r in enumerate(v.queued, start=1)],
    }


def _worker_document(info: WorkerInfo | None) -> dict[str, Any] | None:
    """The worker as JSON: None when none serves the store; its pid is None while it is starting (its lock
    is held, its info file not written yet)."""
    if info is None:
        return None
    return {"pid": info.pid or None, "host": info.host, "started_at": info.started}


def _worker_line(store: Store, info=None) -> None:
    info = info or worker_info(store)
    if info is None:
        console.print("[yellow]no worker serves this queue[/]: it starts with `ren queue add`, or run `ren worker`")
    elif info.pid:
        console.print(f"worker pid {info.pid} on {info.host}")


def move(run_id: str, position: int) -> None:
    order = Q.move(Store(), run_id, position)
    for pos, r in enumerate(order, start=1):
        console.print(f"{pos:>3}  {r.id}")


def cancel(run_id: str) -> None:
    record = Q.cancel(Store(), run_id)
    if record.status == "cancelled":
        console.print(f"cancelled {record.id} ({record.error})")
    else:
        console.print(f"stopping {record.id}: it saves a checkpoint and ends as cancelled "
                      f"(`ren queue retry {record.id}` resumes it)")


def retry(run_id: str) -> None:
    store = Store()
    record = Q.retry(store, run_id)
    console.print(f"queued {record.id} again; {retry_outcome(store, record.id)}")


def pause(paused: bool) -> None:
    Q.set_paused(Store(), paused)
    console.print("queue paused: running runs go on, nothing new starts" if paused else "queue resumed")


def config(assignments: list[str]) -> None:
    settings = Q.configure(Store(), assignments)
    for key, value in settings.to_doc().items():
        console.print(f"{key} = {value}", highlight=False)


def logs(run_id: str, *, follow: bool, lines: int | None) -> None:
    try:
        for line in Q.follow_log(Store(), run_id, follow=follow, lines=lines):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def worker(action: str | None, *, as_json: bool = False) -> None:
    store = Store()
    if as_json and action != "status":
        shown = f"ren worker {action}" if action else "ren worker"
        raise RenError(f"--json goes with `ren worker status` only; `{shown}` prints no JSON document.")
    if action is None:
        sys.exit(run_worker(store))
    if action == "start":
        info = worker_info(store)
        if info is not None:
            console.print(f"worker pid {info.pid} already serves {store.root}")
        else:
            info = start_worker(store)
            console.print(f"worker pid {info.pid} started for {store.root} (log: {store.root / 'worker.log'})" if info
                          else f"the worker did not start; see {store.root / 'worker.log'}")
    elif action == "stop":
        info = stop_worker(store)
        console.print(f"stopped worker pid {info.pid}; running runs go on" if info else "no worker was running")
    elif action == "status":
        if as_json:
            jsonout.emit("worker status", {"store": str(store.root), "worker": _worker_document(worker_info(store))})
        else:
            _worker_line(store)
    else:
        raise RenError(f"ren worker {action}: expected start, stop or status (or nothing, to serve here).")


def _finished(store: Store, upstream: RunConfig, path: Path) -> str:
    done = find_finished(store, upstream)
    if done is None:
        raise RenError(f"train.init_from names {path}, which has no finished run in {store.root}; submit that "
                       "pretraining first (`ren submit --slurm` it), then submit this preset.")
    return done.id


def submit(preset: Path | None, overrides: list[str], *, resume: str | None, nodes: int, gpus_per_node: int,
           partition: str | None, time_limit: str | None, sbatch_lines: list[str], workdir: Path | None,
           now: bool) -> None:
    from engine.jobs.launchers import sbatch_script

    store = Store()
    if resume:
        if preset is not None or overrides:
            raise RenError("--resume continues a stored run with its stored config; drop the preset and --set.")
        record, cfg = stored_config(store, resume)
    elif preset is None:
        raise RenError("give a preset file, or --resume RUN_ID to continue a stored run.")
    else:
        cfg = load_preset(preset, overrides)
        check_processes(cfg.train, nodes * gpus_per_node)
        cfg = resolve_init_from(cfg, preset, store, lambda up, path: _finished(store, up, path))
        record = create_run(store, cfg, str(preset))
    script = sbatch_script(record.id, cfg=cfg, nodes=nodes, gpus_per_node=gpus_per_node, ren_home=str(store.root),
                           workdir=str((workdir or Path.cwd()).resolve()), partition=partition,
                           time_limit=time_limit, extra_sbatch=sbatch_lines, resume=bool(resume))
    path = store.run_dir(record.id) / "submit.sbatch"
    path.write_text(script)
    (store.run_dir(record.id) / "logs").mkdir(exist_ok=True)
    console.print(f"run [bold]{record.id}[/]: {nodes} node(s) x {gpus_per_node} GPU(s); script {path}")
    if not now:
        console.print(f"submit with: sbatch {shlex.quote(str(path))}", highlight=False)
        return
    if shutil.which("sbatch") is None:
        raise RenError(f"--now needs SLURM's sbatch on PATH; the script is at {path}.")
    out = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RenError(f"sbatch {path} failed: {out.stderr.strip() or out.stdout.strip()}")
    console.print(out.stdout.strip())
