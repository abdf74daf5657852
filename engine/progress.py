"""Training progress for a terminal (a rich progress bar) or a log file (plain lines)."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichReporter:
    """A progress bar with step, loss, samples/s and ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def start(self, total: int, done: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        info = f"loss {metrics.get('loss', float('nan')):.4f}  {metrics.get('samples_per_s', 0):.0f} samples/s"
        self.progress.update(self.task, completed=step, info=info)

    def message(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        self.progress.stop()


class LineReporter:
    """Plain periodic lines (at most one every ``every_s`` seconds) for logs and pipes."""

    def __init__(self, stream=None, every_s: float = 10.0):
        self.stream, self.every_s = stream or sys.stdout, every_s
        self.total, self.t0, self.last = 0, 0.0, 0.0

    def start(self, total: int, done: int) -> None:
        self.total, self.t0, self.last = total, time.monotonic(), 0.0
        self._print(f"training: step {done}/{total}")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and step < self.total:
            return
        self.last = now
        parts = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self._print(f"step {step}/{self.total} {parts}")

    def message(self, text: str) -> None:
        self._print(text)

    def stop(self) -> None:
        self._print(f"done in {time.monotonic() - self.t0:.0f}s")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class QuietReporter:
    """Reports nothing: the processes of a multi-process run other than rank 0 (it speaks for them all)."""

    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


def make_reporter(console: Console | None = None) -> RichReporter | LineReporter | QuietReporter:
    if os.environ.get("RANK", "0") != "0":  # set by `accelerate launch`: one progress report, not one per process
        return QuietReporter()
    console = console or Console()
    return RichReporter(console) if console.is_terminal else LineReporter()
