"""The work behind ``ren report``: find the study or runs, write the report, print its table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from engine.errors import RenError, RunNotFound
from engine.report import report_rows, report_series, write_report
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


def report(targets: list[str], out: Path | None) -> None:
    store = Store()
    table = report_rows(store, _source(store, targets))
    out_dir = out if out is not None else store.root / "reports" / table.name
    paths = write_report(table, report_series(store, table), out_dir)
    if console.is_terminal:
        console.print(Markdown(f"# {table.title}\n\n{table.markdown()}"))
    else:  # piped: the Markdown itself, unwrapped
        console.print(f"# {table.title}\n\n{table.markdown()}", markup=False, highlight=False, soft_wrap=True)
    if table.notes:
        console.print(f"{len(table.notes)} note(s) on missing data: see report.md")
    for path in paths:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
