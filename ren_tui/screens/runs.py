"""Runs, the home screen: every run in the store, live.

Sort (``s`` cycles the column, ``S`` reverses), filter by typing (``/``), group by
study (tags ``study:NAME``, ``g``), mark runs with ``space`` and compare them
(``c``), open one (``enter``), tag, annotate, archive or delete it, or clone its
config into Compose (``e``). The store is read in a worker thread every 2 s.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from engine.display import format_duration, format_run_scores, format_steps, sparkline
from engine.errors import RenError
from engine.store import RunRecord
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.text import cell, markup, safe
from ren_tui.widgets.table import RunTable

REFRESH_S = 2.0
ARCHIVED = "archived"
STUDY_PREFIX = "study:"
COLUMNS = ("✓", "name", "kind", "status", "progress", "loss", "best", "time", "device", "tags")
NARROW = ("✓", "name", "status", "progress", "loss", "best", "time")  # below 120 columns
STAGE = {"pretrain": "pt", "finetune": "ft"}
SORTS: dict[str, tuple[str, bool]] = {  # name -> (what, newest/largest first by default)
    "created": ("created_at", True), "name": ("name", False), "status": ("status", False),
    "best": ("best", True), "time": ("duration", True),
}


def study_of(record: RunRecord) -> str:
    """The run's study: its first ``study:NAME`` tag, or "" for none."""
    return next((t[len(STUDY_PREFIX):] for t in record.tags if t.startswith(STUDY_PREFIX)), "")


def progress(record: RunRecord) -> str:
    if record.max_steps:
        return f"{format_steps(record)} {100 * record.step / record.max_steps:3.0f}%"
    return format_steps(record)


def best_value(record: RunRecord) -> float:
    return max(record.best_scores.values(), default=float("-inf"))


def matches(record: RunRecord, text: str) -> bool:
    """Every word of ``text`` appears in the run's id, name, kind, stage, status or tags."""
    haystack = " ".join((record.id, record.name, record.kind, record.stage, record.status, *record.tags)).lower()
    return all(word in haystack for word in text.lower().split())


@dataclass
class View:
    """How the table is shown: filter, sort, grouping, archived runs."""

    filter: str = ""
    sort: str = "created"
    reverse: bool = False
    group: bool = False
    archived: bool = False

    def apply(self, records: list[RunRecord]) -> list[RunRecord]:
        shown = [r for r in records if (self.archived or ARCHIVED not in r.tags) and matches(r, self.filter)]
        attr, descending = SORTS[self.sort]
        key = {"best": best_value, "duration": lambda r: r.duration_s or 0.0}.get(
            attr, lambda r: getattr(r, attr) or 0)
        shown.sort(key=key, reverse=descending != self.reverse)
        if self.group:
            shown.sort(key=lambda r: (study_of(r) == "", study_of(r)))  # stable: keeps the order inside a study
        return shown


class RunsScreen(Screen[None]):
    AUTO_FOCUS = "#runs"
    BINDINGS = [
        Binding("enter", "open", "Monitor"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("g", "group", "Group by study"),
        Binding("e", "clone", "Clone to Compose"),
        Binding("t", "tags", "Tags"),
        Binding("n", "notes", "Notes", show=False),
        Binding("a", "archive", "Archive"),
        Binding("A", "show_archived", "Show archived", show=False),
        Binding("d", "delete", "Delete"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.view = View()
        self.records: dict[str, RunRecord] = {}
        self.marked: set[str] = set()
        self.loaded = False  # the store has been read once
        self.store_error: str | None = None  # why the last read of the store failed (the table keeps what it had)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter: words in name, id, kind, status or tags", id="filter")
        yield RunTable(id="runs", classes="panel")
        yield Static("", id="detail")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.columns: tuple[str, ...] = ()
        self.set_columns(self.size.width)
        self.refresh_runs()
        self.set_interval(REFRESH_S, self._tick)

    def set_columns(self, width: int) -> None:
        columns = COLUMNS if width >= 120 else NARROW
        if columns == self.columns:
            return
        self.columns = columns
        table = self.query_one("#runs", DataTable)
        table.clear(columns=True)
        for column in columns:
            table.add_column(column, key=column)
        self.render_table()

    def on_resize(self, event) -> None:
        self.set_columns(event.size.width)

    # --- data -------------------------------------------------------------------

    def _tick(self) -> None:
        if self.is_current:  # covered by Monitor or Compare: they have the CPU; resuming refreshes
            self.refresh_runs()

    @work(thread=True, exclusive=True, group="runs")
    def refresh_runs(self) -> None:
        try:
            records = self.app.backend.runs()
        except RenError as exc:  # a damaged index.json: say so, keep the screen, read again next tick
            self.app.call_from_thread(self.show_store_error, str(exc))
            return
        self.app.call_from_thread(self.show_runs, records)

    def show_store_error(self, message: str) -> None:
        if message != self.store_error:
            self.notify(safe(message), title="Cannot read the store", severity="error", markup=False, timeout=10)
        self.store_error = message
        self.show_status(len(self.view.apply(list(self.records.values()))))

    def show_runs(self, records: list[RunRecord]) -> None:
        self.store_error = None
        self.records = {r.id: r for r in records}
        self.marked &= set(self.records)
        self.render_table()
        if not self.loaded:
            self.loaded = True
            self.app.warm_up()

    def render_table(self) -> None:
        table = self.query_one("#runs", DataTable)
        shown = self.view.apply(list(self.records.values()))
        cursor = self.current_id()
        order = [r.id for r in shown]
        if [k.value for k in table.rows] != order:  # membership or order changed: rebuild
            table.clear()
            for record in shown:
                table.add_row(*self.cells(record), key=record.id)
        else:
            for record in shown:
                for column, value in zip(self.columns, self.cells(record)):
                    table.update_cell(record.id, column, value)
        if cursor in order:
            table.move_cursor(row=order.index(cursor))
        self.show_status(len(shown))
        self.show_detail()

    def cells(self, r: RunRecord) -> tuple[str, ...]:
        name = f"{study_of(r)} / {r.name}" if self.view.group and study_of(r) else r.name
        cells = {"✓": "✓" if r.id in self.marked else "", "name": cell(name),
                 "kind": cell(f"{STAGE[r.stage]} {r.kind}"), "status": r.status, "progress": progress(r),
                 "loss": sparkline(r.loss_trace), "best": cell(format_run_scores(r, short=True)),
                 "time": format_duration(r), "device": cell(r.device or "-"),
                 "tags": cell(", ".join(t for t in r.tags if t != ARCHIVED))}
        return tuple(cells[c] for c in self.columns)

    def show_status(self, shown: int) -> None:
        total = len(self.records)
        if not total:
            text = "No runs yet: start one with `ren run presets/quickstart.toml`, or compose one (2)."
        else:
            order = f"sorted by {self.view.sort}{' (reversed)' if self.view.reverse else ''}"
            parts = [f"{shown} of {total} runs", order]
            if self.view.filter:
                parts.append(f"filter '{self.view.filter}'")
            if self.marked:
                parts.append(f"{len(self.marked)} marked")
            if self.view.group:
                parts.append("grouped by study")
            text = " · ".join(parts)
        if self.store_error:
            text = f"cannot read the store (showing the last runs read): {cell(self.store_error)}"
        self.query_one("#status", Static).update(text)

    def current_id(self) -> str | None:
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def current(self) -> RunRecord | None:
        run_id = self.current_id()
        return self.records.get(run_id) if run_id else None

    @on(DataTable.RowHighlighted)
    def show_detail(self) -> None:
        r = self.current()
        if r is None:
            self.query_one("#detail", Static).update("")
            return
        lines = [markup("[b]$id[/b]  $stage/$kind  $status  device $device", id=r.id, stage=r.stage, kind=r.kind,
                        status=r.status, device=r.device or "-")]
        if r.params:
            lines.append(f"parameters {r.params.get('total', 0):,} · trainable {r.params.get('trainable', 0):,} "
                         f"· frozen {r.params.get('frozen', 0):,}")
        if r.final_scores or r.test_scores:
            lines.append(safe(format_run_scores(r)))
        if r.notes:
            lines.append(markup("notes: $notes", lines=True, notes=r.notes))
        if r.error:
            lines.append(markup("[red]error:[/] $error", lines=True, error=r.error))
        self.query_one("#detail", Static).update(Content("\n").join(lines))

    # --- actions ------------------------------------------------------------------

    def action_open(self) -> None:
        if (run_id := self.current_id()) is not None:
            self.app.open_monitor(run_id)

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        self.action_open()

    def action_mark(self) -> None:
        if (run_id := self.current_id()) is None:
            return
        self.marked ^= {run_id}
        self.render_table()
        table = self.query_one("#runs", DataTable)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    def action_compare(self) -> None:
        ids = [r.id for r in self.view.apply(list(self.records.values())) if r.id in self.marked]
        if len(ids) < 2:
            self.notify("Mark two or more runs with space, then press c.", severity="warning")
            return
        self.app.open_compare(ids)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.view.filter = event.value
        self.render_table()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one("#runs", DataTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("shown")
        self.query_one("#runs", DataTable).focus()

    def action_sort(self) -> None:
        names = list(SORTS)
        self.view.sort = names[(names.index(self.view.sort) + 1) % len(names)]
        self.render_table()

    def action_reverse(self) -> None:
        self.view.reverse = not self.view.reverse
        self.render_table()

    def action_group(self) -> None:
        self.view.group = not self.view.group
        self.render_table()

    def action_show_archived(self) -> None:
        self.view.archived = not self.view.archived
        self.render_table()

    def action_clone(self) -> None:
        if (r := self.current()) is not None:
            self.app.clone_to_compose(r.config)

    def _apply(self, run_id: str, **fields: object) -> None:
        try:
            record = self.app.backend.update(run_id, **fields)
        except RenError as exc:
            self.notify(safe(str(exc)), severity="error", markup=False)
            return
        self.records[record.id] = record
        self.render_table()

    def action_tags(self) -> None:
        if (r := self.current()) is None:
            return

        def done(value: str | None) -> None:
            if value is not None:
                tags = [t.strip() for t in value.split(",") if t.strip()]
                self._apply(r.id, tags=tags + ([ARCHIVED] if ARCHIVED in r.tags else []))

        self.app.push_screen(Prompt(markup("Tags of $name (comma separated)", name=r.name),
                                    safe(", ".join(t for t in r.tags if t != ARCHIVED)),
                                    hint=f"a tag {STUDY_PREFIX}NAME puts the run in a study"), done)

    def action_notes(self) -> None:
        if (r := self.current()) is None:
            return

        def done(value: str | None) -> None:
            if value is not None:
                self._apply(r.id, notes=value)

        self.app.push_screen(Prompt(markup("Notes on $name", name=r.name), safe(r.notes)), done)

    def action_archive(self) -> None:
        if (r := self.current()) is None:
            return
        tags = [t for t in r.tags if t != ARCHIVED] + ([] if ARCHIVED in r.tags else [ARCHIVED])
        self._apply(r.id, tags=tags)
        self.notify(safe(f"{r.name} {'archived (A shows archived runs)' if ARCHIVED in tags else 'restored'}"),
                    markup=False)

    def action_delete(self) -> None:
        if (r := self.current()) is None:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.app.backend.delete(r.id)
            except RenError as exc:
                self.notify(safe(str(exc)), severity="error", markup=False)
                return
            self.records.pop(r.id, None)
            self.render_table()
            self.notify(f"deleted {r.id}")

        self.app.push_screen(Confirm(markup("Delete run $id with its metrics and checkpoints?", id=r.id)), done)

    def on_screen_resume(self) -> None:
        self.refresh_runs()
