"""What the screens may call: the store façade and the queue API, nothing else.

Screens never touch subprocesses, TinyDB documents or torch. Everything that
reads the disk here is meant to run in a Textual worker thread
(``@work(thread=True)``), so live updates never block typing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import RenError
from engine.gpus import GPU, visible_gpus
from engine.runner import log_path
from engine.store import RunRecord, Store

if TYPE_CHECKING:
    from engine.queue import QueueView


@dataclasses.dataclass(frozen=True)
class Series:
    """One run's metric points: ``points`` as written (dicts with step, time and values)."""

    run_id: str
    points: list[dict[str, Any]]

    def keys(self) -> list[str]:
        """Metric names in first-seen order (step and time excluded)."""
        seen: dict[str, None] = {}
        for point in self.points:
            for key in point:
                if key not in ("step", "time"):
                    seen.setdefault(key, None)
        return list(seen)

    def xy(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """``(xs, ys)`` for ``key``; ``x`` is "step" or "time" (seconds since the first point)."""
        pts = [p for p in self.points if key in p]
        if x == "time":
            t0 = self.points[0]["time"] if self.points else 0.0
            return [p["time"] - t0 for p in pts], [p[key] for p in pts]
        return [float(p["step"]) for p in pts], [p[key] for p in pts]


class Backend:
    """The TUI's single door to runs, metrics, logs, the queue and the GPUs.

    ``start_worker=False`` (tests) queues runs without starting a worker process.
    ``inventory`` lists the GPUs (default: NVML's; tests pass fake ones).
    """

    def __init__(self, store: Store, *, start_worker: bool = True,
                 inventory: Callable[[], Sequence[GPU]] = visible_gpus) -> None:
        self.store = store
        self.start_worker = start_worker
        self.inventory = inventory

    # --- runs -----------------------------------------------------------------

    def runs(self) -> list[RunRecord]:
        return self.store.list_runs()

    def run(self, run_id: str) -> RunRecord:
        return self.store.get_run(run_id)

    def series(self, run_id: str) -> Series:
        return Series(run_id, self.store.read_metrics(run_id))

    def log_tail(self, run_id: str, lines: int = 20) -> list[str]:
        """The last lines of a queued run's log ([] for runs without one)."""
        path = log_path(self.store.run_dir(run_id))
        try:
            with open(path, "rb") as fh:
                fh.seek(0, 2)
                fh.seek(max(fh.tell() - 64 * 1024, 0))
                return fh.read().decode("utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def update(self, run_id: str, *, tags: Sequence[str] | None = None, notes: str | None = None) -> RunRecord:
        fields: dict[str, Any] = {}
        if tags is not None:
            fields["tags"] = tuple(tags)
        if notes is not None:
            fields["notes"] = notes
        return self.store.update_run(run_id, **fields)

    def delete(self, run_id: str) -> None:
        self.store.delete_run(run_id)

    # --- queue ----------------------------------------------------------------

    def queue(self, gpus: list[GPU] | None = None) -> QueueView:
        from engine import queue as Q

        return Q.view(self.store, gpus=self.gpus() if gpus is None else gpus)

    def gpus(self) -> list[GPU]:
        return list(self.inventory())

    def queue_preset(self, preset: Path, *, gpus: int = 1, overrides: Sequence[str] = (),
                     after: Sequence[str] = ()) -> list[RunRecord]:
        from engine import queue as Q

        return Q.add(self.store, preset, list(overrides), gpus=gpus, after=list(after),
                     start_worker=self.start_worker)

    def cancel(self, run_id: str) -> RunRecord:
        from engine import queue as Q

        return Q.cancel(self.store, run_id)

    def retry(self, run_id: str) -> RunRecord:
        from engine import queue as Q

        return Q.retry(self.store, run_id, start_worker=self.start_worker)

    def move(self, run_id: str, position: int) -> list[RunRecord]:
        from engine import queue as Q

        return Q.move(self.store, run_id, position)

    def set_gpus(self, run_id: str, gpus: int) -> RunRecord:
        """Change how many GPUs a queued run asks for."""
        record = self.store.get_run(run_id)
        if record.status != "queued":
            raise RenError(f"run {record.id} is {record.status}; only a queued run's GPU count can change.")
        if gpus < 1:
            raise RenError("a run needs at least one GPU (or CPU process).")
        return self.store.update_run(record.id, gpus=gpus)

    def set_paused(self, paused: bool) -> None:
        """Pause or resume the queue; resuming starts a worker unless ``start_worker`` is off."""
        from engine import queue as Q

        if self.start_worker:
            Q.set_paused(self.store, paused)
        else:
            self.store.update_queue_settings(paused=paused)
