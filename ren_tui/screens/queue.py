"""Queue: the GPUs, the worker, and the runs it runs, waits to run and has run, live.

Reorder the queue (``K``/``J``, ``t`` runs next), cancel (``x``), retry (``R``),
change a queued run's GPU count (``g``), pause or resume (``p``), open a run's
Monitor (``enter``). ``tab`` goes through the panels top to bottom (Running, Queued,
Recently ended; ``shift+tab`` back up); the keyboard starts on Queued when runs wait
there, and leaves a panel that empties for the first one with runs. The queue and
NVML are read in a worker thread every second.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from rich.cells import cell_len
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Header, Static
from textual.worker import Worker

from engine.display import format_duration, format_eta, format_steps
from engine.errors import RenError
from engine.store import END_STATUSES, RunRecord
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.screens import KeepStyles
from ren_tui.text import cell, markup, safe
from ren_tui.widgets.footer import Footer
from ren_tui.widgets.table import RunTable

if TYPE_CHECKING:
    from engine.jobs.api import QueueView
    from engine.jobs.gpus import GPU

REFRESH_S = 1.0
RECENT = 10
BAR_CELLS = 12
COLUMNS = {
    "running": ("name", "on", "steps", "time", "eta", "pid", "id"),
    "queued": ("#", "name", "gpus", "waits", "id"),
    "recent": ("name", "status", "steps", "time", "error", "id"),
}
TITLES = {"running": "Running", "queued": "Queued", "recent": "Recently ended"}
PANELS = tuple(COLUMNS)  # the tab order: top to bottom, as drawn
FIRST = ("queued", "running", "recent")  # where the keyboard starts: the first of these with runs


def gpu_holders(gpu: GPU, running: Sequence[RunRecord]) -> list[RunRecord]:
    """The running runs placed on ``gpu``, or whose trainer process NVML sees on it."""
    return [r for r in running if gpu.index in r.devices or (r.pid is not None and r.pid in gpu.pids)]


def memory_bar(used_mb: int, total_mb: int) -> str:
    """``used/total`` as a bar of BAR_CELLS cells (markup; $warning from 90% up)."""
    frac = min(max(used_mb / total_mb, 0.0), 1.0) if total_mb else 0.0
    filled = round(frac * BAR_CELLS)
    colour = "$warning" if frac >= 0.9 else "$accent"
    return f"[{colour}]{'█' * filled}[/][$text-muted]{'░' * (BAR_CELLS - filled)}[/]"


def gpu_line(gpu: GPU, holders: Sequence[RunRecord], view: QueueView) -> Content:
    """One GPU: index, name, memory bar, utilisation and who holds it (the runs' names as plain text)."""
    name = gpu.name.removeprefix("NVIDIA ")
    memory = f"{gpu.memory_used_mb / 1024:5.1f}/{gpu.memory_total_mb / 1024:.0f} GiB"
    util = f"{gpu.utilization_pct:3d}%" if gpu.utilization_pct is not None else "   -"
    allowed = view.settings.allow_gpus
    foreign = view.settings.foreign_memory_mb
    if holders:
        who = "← $names"
    elif allowed is not None and gpu.index not in allowed:
        who = "[$text-muted]not for the queue (allow_gpus)[/]"
    elif foreign is not None and gpu.memory_used_mb > foreign:
        who = "[$warning]busy: other processes[/]"
    else:
        who = "[$success]free[/]"
    bar = memory_bar(gpu.memory_used_mb, gpu.memory_total_mb)
    return markup(f"[b]{gpu.index:>2}[/b] {escape(name[:22]):<22} {bar} {memory} {util} {who}",
                  names=", ".join(r.name for r in holders))


def cpu_line(view: QueueView) -> str:
    slots = view.settings.cpu_slots
    used = sum(min(r.gpus, slots) for r in view.running if not r.devices)
    return f"no GPU: CPU — {slots} slot(s), {used} in use"


def state_line(view: QueueView) -> str:
    """Paused or active, the worker, and the settings that change placement (markup)."""
    parts = ["[$warning b]paused[/]: nothing new starts (p resumes)" if view.settings.paused
             else "[$success b]active[/]"]
    worker = view.worker
    if worker is None:
        parts.append("[$warning]no worker[/]: it starts when you queue a run")
    elif worker.pid:
        parts.append(f"worker pid {worker.pid} on {escape(worker.host)}")
    else:
        parts.append("worker starting")
    if view.settings.runs_per_gpu > 1:
        parts.append(f"{view.settings.runs_per_gpu} runs per GPU")
    if view.settings.allow_gpus is not None:
        parts.append(f"GPUs {','.join(map(str, view.settings.allow_gpus)) or 'none'} only")
    return "queue " + " · ".join(parts)


def first_line(text: str | None, width: int = 100) -> str:
    lines = (text or "").strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def running_cells(r: RunRecord) -> tuple[str, ...]:
    """A running run's row: the pid is its trainer's ("starting" until the trainer records itself: the
    queue's runner, which starts it, is not the process to watch in htop or nvidia-smi)."""
    on = "gpu " + ",".join(map(str, r.devices)) if r.devices else "cpu"
    pid = "stopping" if r.cancel_requested_at else str(r.pid) if r.pid else "starting"
    return (cell(r.name), on, format_steps(r), format_duration(r), format_eta(r), pid, cell(r.id))


def queued_cells(position: int, r: RunRecord, reason: str, resumes_at: int | None = None) -> tuple[str, ...]:
    """A queued run's row; a retried one (``r.resume``) says whether it resumes (from ``resumes_at``, its
    last checkpoint) or starts over (it saved none)."""
    again = "" if not r.resume else "starts over · " if resumes_at is None else f"resumes from step {resumes_at} · "
    return (str(position), cell(r.name), str(r.gpus), cell(again + reason), cell(r.id))


def recent_cells(r: RunRecord) -> tuple[str, ...]:
    error = first_line(safe(r.error or "", lines=True))  # a carriage return shown, not taken for a line break
    return (cell(r.name), r.status, format_steps(r), format_duration(r), cell(error), cell(r.id))


def detail(r: RunRecord, reason: str) -> Content:
    """The selected run in full: id, status, and why it waits, how to follow it, or how it ended."""
    if r.status == "queued":
        about = reason
    elif r.status == "running":
        about = f"{r.stage} {r.kind} · `ren logs {r.id} -f` follows its output"
    else:
        about = r.error or ""
    return markup("[b]$id[/b] $status" + (" · $about" if about else ""), lines=True, id=r.id, status=r.status,
                  about=about)


def recent_runs(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The last RECENT runs the queue ran that have ended, newest first."""
    ended = [r for r in records if r.status in END_STATUSES and r.queued_at is not None]
    return sorted(ended, key=lambda r: r.ended_at or r.queued_at or 0.0, reverse=True)[:RECENT]


class QueueScreen(KeepStyles, Screen[None]):
    """The queue of this store, and the GPUs (or CPU slots) it places runs on."""

    AUTO_FOCUS = "#queued"  # until the first read shows where the runs are (keep_focus_on_runs)

    BINDINGS = [
        Binding("enter", "monitor", "Monitor", priority=True),
        Binding("K,shift+up", "move(-1)", "Move up", key_display="K"),
        Binding("J,shift+down", "move(1)", "Move down", key_display="J"),
        Binding("t", "run_next", "Run next"),
        Binding("x", "cancel", "Cancel"),
        Binding("R", "retry", "Retry"),
        Binding("g", "gpus", "GPUs"),
        Binding("p", "pause", "Pause/resume"),
        Binding("tab", "panel(1)", "Next panel", show=False),
        Binding("shift+tab", "panel(-1)", "Previous panel", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.view: QueueView | None = None
        self.records: dict[str, RunRecord] = {}
        self.rows: dict[str, list[tuple[str, tuple[str, ...]]]] = {name: [] for name in COLUMNS}
        self.widths: dict[str, list[int]] = {}
        # actions not yet performed, in order
        self.pending: deque[tuple[Callable[[], object], str | Callable[[], str]]] = deque()
        self.performing = threading.Lock()
        self.edits = 0  # actions asked for; a view read before the latest one is stale
        self.refresher: Worker[None] | None = None
        self.shown_once = False  # after the first read, the keyboard starts on a panel with runs

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("queue: reading…", id="state")
        yield Static("", id="gpus")
        for name in PANELS:
            with Vertical(id=f"{name}-panel", classes="panel"):
                yield Static(TITLES[name], id=f"{name}-title", classes="title")
                yield RunTable(id=name)
        yield Static("", id="about")
        yield Footer()

    def on_mount(self) -> None:
        for name in COLUMNS:
            self.fill(name, [])
        self.set_interval(REFRESH_S, self.tick)

    def on_screen_resume(self) -> None:
        self.refresher = self.refresh_queue()

    def tick(self) -> None:
        """Read again, unless the screen is hidden or the last read (NVML can be slow) goes on."""
        if self.is_current and (self.refresher is None or self.refresher.is_finished):
            self.refresher = self.refresh_queue()

    # --- data -------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="queue-refresh")
    def refresh_queue(self) -> None:
        self.load()

    def load(self) -> None:
        """Read the queue (and NVML) and the store, then show them; call from a worker thread."""
        edits, backend = self.edits, self.app.backend
        try:
            view, records = backend.queue(), backend.runs()
            resumes = {r.id: backend.checkpoint_step(r.id) for r in view.queued if r.resume}
        except RenError as exc:
            self.app.call_from_thread(self.query_one("#state", Static).update, f"queue: {exc}")
            return
        self.app.call_from_thread(self.show, view, records, edits, resumes)

    def show(self, view: QueueView, records: list[RunRecord], edits: int,
             resumes: dict[str, int | None] | None = None) -> None:
        """Show a view read after ``edits`` actions (a stale one is dropped: a fresher read follows)."""
        if edits != self.edits:
            return
        self.view = view
        self.records = {r.id: r for r in records}
        self.query_one("#state", Static).update(state_line(view))
        running_all = [r for r in records if r.status == "running"]
        lines = ([gpu_line(g, gpu_holders(g, running_all), view) for g in view.gpus]
                 or [Content.from_markup(cpu_line(view))])
        self.query_one("#gpus", Static).update(Content("\n").join(lines))
        recent = recent_runs(records)
        had_runs = {name: bool(rows) for name, rows in self.rows.items()}
        self.fill("running", [(r.id, running_cells(r)) for r in view.running])
        resumes = resumes or {}
        self.fill("queued", [(r.id, queued_cells(i, r, view.reasons.get(r.id, ""), resumes.get(r.id)))
                             for i, r in enumerate(view.queued, start=1)])
        self.fill("recent", [(r.id, recent_cells(r)) for r in recent])
        self.keep_focus_on_runs(had_runs, first=not self.shown_once)
        self.shown_once = True
        self.show_detail()

    def keep_focus_on_runs(self, had_runs: dict[str, bool], first: bool) -> None:
        """A panel that its last run left (or an empty one at the first read) holds nothing to act on:
        the keyboard moves to the first panel with runs. An empty panel the user tabbed to stays."""
        focused = self.focused
        if not isinstance(focused, DataTable) or focused.row_count:
            return
        if not first and not had_runs.get(str(focused.id)):
            return
        for name in FIRST:
            table = self.query_one(f"#{name}", DataTable)
            if table.row_count:
                table.focus()
                return

    @on(DataTable.RowHighlighted)
    @on(events.DescendantFocus)
    def show_detail(self) -> None:
        run_id = self.selected(self.focused_table())
        record = self.records.get(run_id) if run_id else None
        reason = self.view.reasons.get(run_id, "") if self.view and run_id else ""
        self.query_one("#about", Static).update(detail(record, reason) if record else "")

    def fill(self, name: str, rows: list[tuple[str, tuple[str, ...]]]) -> None:
        """Show ``rows`` (key, cells) in table ``name``, in place when the runs and column
        widths are the same, keeping the cursor on the same run.

        Columns get explicit widths, so the header is drawn at its final width at once
        (a header drawn before the table measures new rows can stay narrow)."""
        table = self.query_one(f"#{name}", DataTable)
        self.rows[name] = rows
        self.query_one(f"#{name}-title", Static).update(f"{TITLES[name]} ({len(rows)})")
        columns = COLUMNS[name]
        widths = [max([cell_len(column), *(cell_len(cells[i]) for _, cells in rows)])
                  for i, column in enumerate(columns)]
        order = [key for key, _ in rows]
        if [k.value for k in table.rows] == order and widths == self.widths.get(name):
            for key, cells in rows:
                for column, value in zip(columns, cells):
                    if table.get_cell(key, column) != value:
                        table.update_cell(key, column, value)
            return
        self.widths[name] = widths
        selected, row = self.selected(table), table.cursor_row
        table.clear(columns=True)
        for column, width in zip(columns, widths):
            table.add_column(column, key=column, width=width)
        for key, cells in rows:
            table.add_row(*cells, key=key)
        if rows:
            table.move_cursor(row=order.index(selected) if selected in order else min(row, len(rows) - 1),
                              animate=False)

    # --- selection ----------------------------------------------------------------

    @staticmethod
    def selected(table: DataTable) -> str | None:
        """The run id under ``table``'s cursor."""
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def focused_table(self) -> DataTable:
        focused = self.focused
        return focused if isinstance(focused, DataTable) else self.query_one("#queued", DataTable)

    def selected_run(self) -> str | None:
        """The run under the cursor of the focused table (a notice when there is none)."""
        run_id = self.selected(self.focused_table())
        if run_id is None:
            self.notify("No run selected: tab to a table with runs.", severity="warning")
        return run_id

    def selected_queued(self) -> str | None:
        """The queued run under the cursor; a notice when the queue table is not the focused one."""
        table = self.focused_table()
        if table.id != "queued":
            self.notify("Select a queued run first (tab to the Queued table).", severity="warning")
            return None
        return self.selected_run()

    def action_panel(self, step: int) -> None:
        """Focus the next (``step`` 1) or previous (-1) panel, in the fixed order of PANELS."""
        current = self.focused.id if isinstance(self.focused, DataTable) else "queued"
        name = PANELS[(PANELS.index(current) + step) % len(PANELS)]
        self.query_one(f"#{name}", DataTable).focus()

    # --- actions ------------------------------------------------------------------

    def act(self, call: Callable[[], object], done: str | Callable[[], str] = "") -> None:
        """Perform a backend call off the event loop, after those asked for before it;
        ``done`` is the notice on success (a callable: called after the call, in the worker
        thread, to say what it did), a RenError becomes an error notice."""
        self.edits += 1
        self.pending.append((call, done))
        self.perform()

    @work(thread=True, group="queue-action")
    def perform(self) -> None:
        with self.performing:
            while self.pending:
                call, done = self.pending.popleft()
                try:
                    call()
                    if callable(done):
                        done = done()
                except RenError as exc:
                    self.app.call_from_thread(self.notify, str(exc), severity="error")
                else:
                    if done:
                        self.app.call_from_thread(self.notify, done)
            self.load()

    def move_to(self, run_id: str, position: int, done: str = "") -> None:
        """Move a queued run in the table at once (so keys pressed in a row add up), then in the store."""
        rows = self.rows["queued"]
        moved = next(row for row in rows if row[0] == run_id)
        rows = [row for row in rows if row[0] != run_id]
        rows.insert(position - 1, moved)
        self.fill("queued", [(key, (str(i), *cells[1:])) for i, (key, cells) in enumerate(rows, start=1)])
        self.act(partial(self.app.backend.move, run_id, position), done)

    def action_monitor(self) -> None:
        run_id = self.selected_run()
        if run_id is not None:
            self.app.open_monitor(run_id)

    @on(DataTable.RowSelected)
    def open_clicked(self, event: DataTable.RowSelected) -> None:
        self.app.open_monitor(event.row_key.value)

    def action_move(self, delta: int) -> None:
        run_id = self.selected_queued()
        if run_id is None:
            return
        table = self.query_one("#queued", DataTable)
        position = table.cursor_row + 1 + delta
        if 1 <= position <= table.row_count:
            self.move_to(run_id, position)

    def action_run_next(self) -> None:
        run_id = self.selected_queued()
        if run_id is not None:
            self.move_to(run_id, 1, f"{run_id} runs next")

    def action_cancel(self) -> None:
        run_id = self.selected_run()
        if run_id is None:
            return
        cancel = partial(self.app.backend.cancel, run_id)
        record = self.records.get(run_id)
        if record is None or record.status != "running":
            self.act(cancel, f"cancelled {run_id}")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.act(cancel, f"stopping {run_id}: it saves a checkpoint and ends as cancelled (R retries it)")

        self.app.push_screen(Confirm(f"Stop running run {run_id}? It saves a checkpoint first; "
                                     "R queues it again and it resumes."), confirmed)

    def action_retry(self) -> None:
        run_id = self.selected_run()
        if run_id is not None:
            backend = self.app.backend
            self.act(partial(backend.retry, run_id), lambda: f"queued {run_id} again; {backend.retry_outcome(run_id)}")

    def action_gpus(self) -> None:
        run_id = self.selected_queued()
        if run_id is None:
            return
        current = self.query_one("#queued", DataTable).get_cell(run_id, "gpus")

        def answered(value: str | None) -> None:
            if value is None:
                return
            try:
                gpus = int(value)
            except ValueError:
                self.notify(f"{value.strip()!r} is not a whole number of GPUs.", severity="error")
                return
            self.act(partial(self.app.backend.set_gpus, run_id, gpus), f"{run_id} asks for {gpus} GPU(s)")

        self.app.push_screen(Prompt(f"GPUs for {run_id}", current,
                                    "one process per GPU (per CPU slot on a machine without GPUs)"), answered)

    def action_pause(self) -> None:
        paused = not (self.view is not None and self.view.settings.paused)
        self.act(partial(self.app.backend.set_paused, paused),
                 "queue paused: running runs go on, nothing new starts" if paused else "queue resumed")
