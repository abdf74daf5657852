"""The work behind ``ren data``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()


def prepare(task: str, source: Path, out: Path, *, force: bool, split_by: str | None = None,
            shard_rows: int | None = None) -> None:
    from engine.data.prepare import prepare as convert

    with Progress(TextColumn(f"[bold]{task}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as bar:
        job = bar.add_task(task, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(job, completed=done, total=total)

        report = convert(task, source, out, progress=progress, force=force, split_by=split_by,
                         shard_rows=shard_rows)
    console.print(report.summary(), highlight=False, markup=False)
