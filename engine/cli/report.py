"""The work behind ``ren report``: find the study or runs, write the report, print its table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from engine.cli import jsonout
from engine.display import markdown_table
from engine.errors import RenError, RunNotFound
from engine.report import Interval, ReportTable, Stat, VariantRow, report_rows, report_series, write_report
from engine.store import Store
from engine.study import find_study, study_runs

console = Console()


def _source(store: Store, targets: list[str]) -> Any:
    """A study (file or name) when the one target names one, else the runs the targets name."""
    if len(targets) == 1:
        target = targets[0]
        if target.endswith(".toml") or Path(target).exists() or study_runs(store, target):
            return find_study(store, target)
        try:
            return [store.get_run(target)]
        except RunNotFound as exc:
            raise RenError(f"{target!r} is neither a study file, the name of a study with runs in the store at "
                           f"{store.root}, nor a run id: {exc} `ren report` takes a study TOML file, a study name "
                           "or one or more run ids.") from exc
    return [store.get_run(target) for target in targets]


def report(targets: list[str], out: Path | None, *, as_json: bool = False) -> None:
    store = Store()
    table = report_rows(store, _source(store, targets))
    out_dir = out if out is not None else store.root / "reports" / table.name
    paths = write_report(table, report_series(store, table), out_dir)
    if as_json:
        jsonout.emit("report", _report_document(table, paths))
        return
    text = f"# {table.title}\n\n{table.markdown()}"
    if table.breakdown:
        text += f"\n## Per category\n\n{markdown_table(table.breakdown_headers(), table.breakdown_cells())}"
    if console.is_terminal:
        console.print(Markdown(text))
    else:  # piped: the Markdown itself, unwrapped
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    if table.notes:
        console.print(f"{len(table.notes)} note(s) on missing data: see report.md")
    for path in paths:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _report_document(table: ReportTable, paths: list[Path]) -> dict[str, Any]:
    """What ``ren report --json`` prints (schema ``ren.report/1``): the report's data as
    :func:`engine.report.report_rows` computed it, unformatted, and the files written."""
    return {"name": table.name, "title": table.title, "description": table.description,
            "compared": list(table.compared), "baseline": table.baseline, "tasks": list(table.tasks),
            "metrics": dict(table.metrics), "splits": dict(table.splits), "notes": list(table.notes),
            "variants": [_variant(row) for row in table.rows],
            "breakdown": [{"task": row.task, "kind": row.kind, "category": row.category,
                           "scores": {variant: _stat(stat) for variant, stat in row.scores.items()}}
                          for row in table.breakdown],
            "files": [str(path) for path in paths]}


def _variant(row: VariantRow) -> dict[str, Any]:
    return {
        "variant": row.variant, "is_baseline": row.is_baseline, "seeds": list(row.seeds),
        "pretrains": [dataclasses.asdict(ref) for ref in row.pretrains],
        "finetunes": [dataclasses.asdict(ref) for ref in row.finetunes],
        "scores": {task: _stat(stat) for task, stat in row.scores.items()},
        "seed_scores": {task: [{"seed": seed, "score": score} for seed, score in pairs]
                        for task, pairs in row.seed_scores.items()},
        "score_delta": dict(row.score_delta),
        "delta_ci": {task: _interval(interval) for task, interval in row.delta_ci.items()},
        "compute_stage": row.compute_stage, "pflops": _stat(row.pflops), "device_hours": _stat(row.device_hours),
        "train_s": _stat(row.train_s), "peak_memory_mb": _stat(row.peak_memory_mb),
        "trainable": row.trainable, "total": row.total,
        "saved_pflops_pct": row.saved_pflops_pct, "saved_train_pct": row.saved_train_pct,
    }


def _stat(stat: Stat) -> dict[str, Any]:
    return {"n": stat.n, "mean": stat.mean, "std": stat.std, "values": list(stat.values)}


def _interval(interval: Interval) -> dict[str, Any]:
    return {"low": interval.low, "high": interval.high, "how": interval.how, "within_noise": interval.within_noise}
