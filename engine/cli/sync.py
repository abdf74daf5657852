"""`ren sync` (stored runs into a tracker) and `ren runs --mlflow` (the lab's runs from an MLflow server)."""

from __future__ import annotations

import dataclasses
import time

from rich.console import Console
from rich.table import Table

from engine.cli import jsonout
from engine.errors import RenError
from engine.store import Store
from engine.tracking import lab_runs, replay

console = Console()


def sync(run_ids: list[str], to: str, *, uri: str, logdir: str) -> None:
    store = Store()
    records = [store.get_run(run_id) for run_id in run_ids]  # every id checked before any replay
    failed = 0
    for record in records:
        warnings: list[str] = []
        try:
            tracker = replay(store, record.id, to, warnings.append, tracking_uri=uri, logging_dir=logdir)
        except ConnectionError as exc:
            raise RenError(f"ren sync --to {to}: {exc}. Start the server or give another with --uri.") from None
        if tracker is None:
            console.print(f"{record.id}: already in MLflow, nothing replayed")
        elif tracker.off:
            failed += 1
            console.print(f"[red]{record.id}: not replayed[/]: {warnings[0]}", highlight=False)
        else:
            console.print(f"{record.id}: replayed into {to}")
    if failed:
        raise SystemExit(1)


def list_lab_runs(uri: str, limit: int, *, as_json: bool = False) -> None:
    """The ren runs the MLflow server at ``uri`` holds, as a table or (``as_json``) the ``ren.lab-runs/1``
    document."""
    try:
        runs = lab_runs(uri, limit)
    except ConnectionError as exc:
        raise RenError(f"ren runs --mlflow {uri}: {exc}. Check the address, or that `mlflow server` runs "
                       "there.") from None
    if as_json:
        jsonout.emit("runs --mlflow", {"uri": uri, "runs": [dataclasses.asdict(run) for run in runs]})
        return
    if not runs:
        console.print(f"no ren runs on {uri} yet: a run mirrors there with [tracking] log_with = [\"mlflow\"], "
                      "or `ren sync RUN --to mlflow --uri URI`")
        return
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    # the id (which `ren show` takes on its box) and the host first and whole; the rest where there is room
    columns = (("id", "host", "status", "stage", "scores", "started", "store") if console.width >= 160
               else ("id", "host", "status", "scores"))
    widest = max(len(r.run_id) for r in runs)
    for col in columns:
        table.add_column(col, no_wrap=col != "store", min_width=widest if col == "id" else None)
    for r in runs:
        cells = {"id": r.run_id, "host": r.host, "status": r.status.lower(), "stage": r.stage,
                 "scores": " ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in sorted(r.metrics.items())
                                    if k.startswith("eval/")) or "-",
                 "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_time)) if r.start_time else "-",
                 "store": r.store}
        table.add_row(*(cells[c] for c in columns))
    console.print(table, highlight=False)
