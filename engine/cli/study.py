"""The work behind ``ren study run`` and ``ren study status`` (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from engine.cli import jsonout
from engine.cli.queue import _worker_line
from engine.display import format_seconds
from engine.errors import RenError
from engine.jobs import api as Q
from engine.jobs.worker import worker_info
from engine.store import Store
from engine.study import (
    Study,
    StudyRow,
    StudyStep,
    apply_plan,
    find_study,
    has_checkpoint,
    load_study,
    models_to_build,
    plan_study,
    study_table,
)

console = Console()


def run(path: Path, *, gpus: int, dry_run: bool) -> None:
    if gpus < 1:
        raise RenError(f"--gpus {gpus}: a run needs at least one GPU (or CPU process).")
    store = Store()
    study = load_study(path)
    steps = plan_study(store, study)
    _header(study, len(steps))
    unbuilt = _unbuilt(models_to_build(steps))
    if dry_run:
        _print_plan(store, steps)
        if unbuilt:
            console.print(f"`ren study run` would first build {', '.join(unbuilt)} (once per store, minutes on a "
                          "CPU; `ren models build all` does it ahead).", highlight=False)
        counts = {a: sum(s.action == a for s in steps) for a in ("new", "changed", "retry", "queue", "keep")}
        console.print("dry run: nothing queued. `ren study run` would "
                      + ", ".join(f"{_VERB[a]} {n}" for a, n in counts.items() if n) + ".", highlight=False)
        return
    _build(unbuilt)
    records = apply_plan(store, study, steps, gpus=gpus)
    _print_plan(store, steps, [r.id for r in records])
    for step, record in zip(steps, records):
        if step.action == "changed":
            console.print(f"[yellow]changed:[/] {step.planned.name}: the study's config differs from stored run "
                          f"{step.existing.id} ({_keys(step.changes, 6)}); queued it as {record.id}, the old run "
                          "is kept.", highlight=False)
    queued = sum(s.action in ("new", "changed", "retry", "queue") for s in steps)
    console.print(f"queued {queued} run(s), kept {len(steps) - queued}; `ren study status {study.name}` follows them")
    if any(r.status == "queued" for r in records) and worker_info(store) is None:
        console.print(f"a worker is starting for {store.root} (`ren worker status`; log: {store.root / 'worker.log'})",
                      highlight=False, soft_wrap=True)
    else:
        _worker_line(store)


def _unbuilt(names: list[str]) -> list[str]:
    if not names:
        return []
    from engine.recipes import built_dir

    return [name for name in names if built_dir(name) is None]


def _build(names: list[str]) -> None:
    """Build the models first, here, so that no run's wall time includes a build."""
    if not names:
        return
    from engine.cli.models import _say
    from engine.models import unimodal

    for name in names:
        console.print(f"building {name} before queueing (once per store; its training is no run's compute)",
                      highlight=False)
        unimodal.ensure_built(name, log=_say)


_VERB = {"new": "queue", "changed": "queue (config changed)", "retry": "retry", "queue": "queue existing",
         "keep": "keep"}


def _header(study: Study, runs: int) -> None:
    shape = f"{len(study.variants)} variant(s) x {len(study.seeds)} seed(s)"
    tasks = f", finetuned on {', '.join(f.name for f in study.finetunes)}" if study.finetunes else ""
    console.print(f"[bold]study {study.name}[/] ({study.path}): {shape}{tasks}; {runs} runs, "
                  f"baseline {study.baseline}", highlight=False, soft_wrap=True)
    if study.description:
        console.print(study.description, highlight=False, markup=False, soft_wrap=True)


def _keys(keys: tuple[str, ...], most: int) -> str:
    return ", ".join(keys[:most]) + (" ..." if len(keys) > most else "")


def _action(store: Store, step: StudyStep, new_id: str | None) -> str:
    e = step.existing
    if step.action == "keep":
        return f"keep {e.id} ({e.status})"
    if step.action == "queue":
        return f"queue {e.id}"
    if step.action == "retry":
        return f"retry {e.id} ({e.status}, " + ("resumes)" if has_checkpoint(store, e.id) else "from the start)")
    done = f"queued {new_id}" if new_id else "new run"
    if step.action == "changed":
        return f"{done}; {e.id} has another config ({_keys(step.changes, 3)})"
    return done


def _print_plan(store: Store, steps: list[StudyStep], ids: list[str] | None = None) -> None:
    """One line per run (name, stage, preset, what it waits for, what happens), its overrides below."""
    variant = None
    for i, step in enumerate(steps):
        p = step.planned
        if p.variant != variant and variant is not None:
            console.print()
        variant = p.variant
        waits = f", after {p.name.rsplit('/', 1)[0]}" if p.stage == "finetune" else ""
        new_id = ids[i] if ids and step.action in ("new", "changed") else None
        console.print(f"[bold]{p.name}[/]  {p.stage} {p.preset.name}{waits}: {_action(store, step, new_id)}",
                      highlight=False, soft_wrap=True)
        for key, value in p.overrides.items():
            console.print(f"    {key} = {json.dumps(value)}", highlight=False, markup=False)
        if p.inherited:
            console.print(f"    {', '.join(p.inherited)} from the pretraining", highlight=False, markup=False)


def status(ref: str, *, as_json: bool = False) -> None:
    store = Store()
    study = find_study(store, ref)
    rows = study_table(store, study)
    reasons = Q.view(store).reasons if any(r.status == "queued" for r in rows) else {}
    if as_json:
        jsonout.emit("study status", _status_document(study, rows, reasons))
        return
    if isinstance(study, Study):
        _header(study, len(rows))
    else:
        console.print(f"[bold]study {study}[/]: {len(rows)} stored run(s) (its study file is gone or changed; "
                      "showing the runs as stored)", highlight=False)
    console.print(", ".join(f"{n} {s}" for s, n in _counts(rows).items()), highlight=False)
    if console.width >= WIDE:
        console.print(_status_table(rows, reasons))
    else:
        _status_lines(rows, reasons)


def _counts(rows: list[StudyRow]) -> dict[str, int]:
    """Runs per status, in the order the statuses first appear."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


def _status_document(study: Study | str, rows: list[StudyRow], reasons: dict[str, str]) -> dict[str, Any]:
    """What ``ren study status --json`` prints (schema ``ren.study-status/1``): the study, and a row per
    planned run (the store's :class:`StudyRow`) with why a queued one waits."""
    loaded = isinstance(study, Study)
    about = {"name": study.name if loaded else study, "file": str(study.path) if loaded else None,
             "description": study.description if loaded else None, "baseline": study.baseline if loaded else None}
    return {"study": about, "counts": _counts(rows),
            "runs": [{**row.to_dict(), "waits": reasons.get(row.run_id) if row.status == "queued" else None}
                     for row in rows]}


_COLOUR = {"finished": "green", "running": "cyan", "failed": "red", "crashed": "red", "cancelled": "yellow",
           "planned": "dim"}


WIDE = 150  # narrower terminals get one line per run: run ids are never shortened


def _cells(row: StudyRow) -> tuple[str, str, str, str]:
    """(stage or task, status, steps, score) as shown."""
    stage = row.task if row.stage == "finetune" else "pretrain"
    steps = f"{row.step}/{row.max_steps}" if row.max_steps else ("-" if row.run_id is None else str(row.step))
    score = f"{row.metric.removesuffix('_score')} {row.score:.4f}" if row.score is not None else "-"
    return stage, f"[{_COLOUR.get(row.status, 'white')}]{row.status}[/]", steps, score


def _status_lines(rows: list[StudyRow], reasons: dict[str, str]) -> None:
    variant = None
    for row in rows:
        if row.variant != variant:
            console.print(f"[bold]{row.variant}[/]", highlight=False)
            variant = row.variant
        stage, status, steps, score = _cells(row)
        line = f"  s{row.seed} {stage:<9} {status} {steps}  {score}  {format_seconds(row.train_s)}  {row.run_id or ''}"
        console.print(line, highlight=False, soft_wrap=True)
        note = _note(row, reasons)
        if note:
            console.print(f"      {note}", highlight=False, soft_wrap=True, markup=False)


def _status_table(rows: list[StudyRow], reasons: dict[str, str]) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for col in ("variant", "seed", "stage", "id", "status", "steps", "score", "time", "note"):
        table.add_column(col, no_wrap=col != "note", overflow="fold")
    variant = None
    for row in rows:
        if variant is not None and row.variant != variant:
            table.add_section()
        first = row.variant != variant
        variant = row.variant
        stage, status, steps, score = _cells(row)
        table.add_row(row.variant if first else "", f"s{row.seed}", stage, row.run_id or "-", status, steps, score,
                      format_seconds(row.train_s), _note(row, reasons))
    return table


def _note(row: StudyRow, reasons: dict[str, str]) -> str:
    if not row.current:
        return "the study file changed: `ren study run` queues the new config"
    if row.status == "queued" and row.run_id in reasons:
        return reasons[row.run_id]
    if row.status in ("failed", "crashed", "cancelled") and row.error:
        return row.error.splitlines()[0][:120]
    if row.status == "planned":
        return "not queued yet: `ren study run`"
    return ""
