"""Runs, the home screen: every run in the store, live.

Mark runs with ``space`` (``U`` unmarks all); archive (``a``), delete (``d``), tag (``t``),
compare (``c``) and queue again (``R``) apply to the marked runs when there are marks, else to
the run under the cursor. Filter (``/``: words, ``status:``, ``tag:``, ``name:``, a leading ``-``
excludes), sort by any column (``s`` the next column, ``S`` reverses, or click a header),
group by study (tags ``study:NAME``, ``g``), show archived runs (``A``) or the runs cancelled
before they started (``H``), open one (``enter``), look at its kept predictions (``x``), write its
notes (``n``) or clone its config into Compose (``e``). Marks, sort, filter and these toggles are kept between
launches (the store's TUI settings). The store is read in a worker thread every 2 s.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any

from rich.cells import cell_len
from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Header, Input, Static

from engine.display import format_duration, format_run_scores, format_steps, sparkline
from engine.errors import RenError
from engine.store import RunRecord
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.keys import LeftField, is_text_field
from ren_tui.screens import KeepStyles
from ren_tui.text import cell, markup, safe
from ren_tui.widgets.footer import Footer
from ren_tui.widgets.table import RunTable

REFRESH_S = 2.0
FIRST_ROWS = 20  # rows added at once beyond a screenful (and beyond the cursor's); then MORE_ROWS every MORE_ROWS_S
MORE_ROWS = 1000
MORE_ROWS_S = 0.05
ARCHIVED = "archived"
STUDY_PREFIX = "study:"
RETRYABLE = ("failed", "cancelled", "crashed")
COLUMNS = ("✓", "name", "kind", "status", "progress", "loss", "best", "time", "device", "tags")
NARROW = ("✓", "name", "status", "progress", "loss", "best", "time")  # below 120 columns
STAGE = {"pretrain": "pt", "finetune": "ft"}
FILTER_KEYS = ("status", "tag", "name")
# the order runs take when sorted by status: the live ones first, then what needs a look
STATUS_ORDER = {s: i for i, s in enumerate(("running", "queued", "created", "failed", "crashed", "cancelled",
                                            "finished"))}


def study_of(record: RunRecord) -> str:
    """The run's study: its first ``study:NAME`` tag, or "" for none."""
    return next((t[len(STUDY_PREFIX):] for t in record.tags if t.startswith(STUDY_PREFIX)), "")


def user_tags(record: RunRecord) -> list[str]:
    """The run's tags but the archive marker."""
    return [t for t in record.tags if t != ARCHIVED]


def progress(record: RunRecord) -> str:
    if record.max_steps:
        return f"{format_steps(record)} {100 * record.step / record.max_steps:3.0f}%"
    return format_steps(record)


def best_value(record: RunRecord) -> float:
    return max(record.best_scores.values(), default=float("-inf"))


def never_started(record: RunRecord) -> bool:
    """Cancelled before it trained a step (most often: while still queued); such runs hold no data."""
    return record.status == "cancelled" and record.started_at is None and not record.step


# --- sorting --------------------------------------------------------------------------

def _last_loss(r: RunRecord) -> float | None:
    finite = [v for v in r.loss_trace if v is not None and math.isfinite(v)]
    return finite[-1] if finite else None


# column -> (the value it sorts by, None for "no value": such runs go last either way; largest first by default)
SORTS: dict[str, tuple[Callable[[RunRecord], Any], bool]] = {
    "created": (lambda r: r.created_at, True),
    "name": (lambda r: r.name.lower(), False),
    "kind": (lambda r: (r.stage, r.kind), False),
    "status": (lambda r: STATUS_ORDER.get(r.status, len(STATUS_ORDER)), False),
    "progress": (lambda r: r.step / r.max_steps if r.max_steps else None, True),
    "loss": (_last_loss, False),
    "best": (lambda r: best_value(r) if r.best_scores else None, True),
    "time": (lambda r: r.duration_s, True),
    "device": (lambda r: (r.device or "").lower() or None, False),
    "tags": (lambda r: ", ".join(user_tags(r)).lower() or None, False),
}


def sort_runs(records: Iterable[RunRecord], column: str, reverse: bool = False) -> list[RunRecord]:
    """``records`` in ``column``'s order (its default direction, or the other with ``reverse``); runs
    without a value for it last, in the order they came."""
    value, descending = SORTS[column]
    have = [(v, r) for r in records if (v := value(r)) is not None]
    missing = [r for r in records if value(r) is None]
    have.sort(key=lambda pair: pair[0], reverse=descending != reverse)
    return [r for _, r in have] + missing


# --- filtering ------------------------------------------------------------------------

@dataclass
class Query:
    """A parsed filter: every plain word must appear in the run's name, id, notes, kind, stage, status
    or tags; ``status:`` terms (any of them, or comma-separated) match a status by its start; every
    ``tag:`` term a tag by its start (``tag:study:`` any study); every ``name:`` term a part of the name.
    A key term with a leading ``-`` (or ``!``) excludes the runs it matches."""

    words: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    tag: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    exclude: list[tuple[str, str]] = field(default_factory=list)


def parse_filter(text: str) -> Query:
    try:
        terms = shlex.split(text.lower())
    except ValueError:  # an open quote while typing
        terms = text.lower().split()
    query = Query()
    for term in terms:
        negate = term[:1] in "-!" and term[1:].partition(":")[0] in FILTER_KEYS
        key, sep, value = term[1:].partition(":") if negate else term.partition(":")
        if not sep or key not in FILTER_KEYS:
            query.words.append(term)
        elif not value:
            continue  # "status:" being typed
        elif negate:
            query.exclude.extend((key, v) for v in value.split(",") if v)
        elif key == "status":
            query.status.extend(v for v in value.split(",") if v)
        else:
            getattr(query, key).append(value)
    return query


def _term_matches(record: RunRecord, key: str, value: str) -> bool:
    if key == "status":
        return record.status.startswith(value)
    if key == "tag":
        return any(t.lower().startswith(value) for t in user_tags(record))
    return value in record.name.lower()


def matches(record: RunRecord, text: str | Query) -> bool:
    """Whether the run passes the filter ``text`` (see :class:`Query`)."""
    query = parse_filter(text) if isinstance(text, str) else text
    haystack = " ".join((record.id, record.name, record.notes, record.kind, record.stage, record.status,
                         *record.tags)).lower()
    return (all(word in haystack for word in query.words)
            and (not query.status or any(_term_matches(record, "status", v) for v in query.status))
            and all(_term_matches(record, "tag", v) for v in query.tag)
            and all(_term_matches(record, "name", v) for v in query.name)
            and not any(_term_matches(record, key, v) for key, v in query.exclude))


@dataclass
class View:
    """How the table is shown: filter, sort, grouping, archived and never-started runs. Kept between
    launches in the store's TUI settings (``to_settings``/``from_settings``)."""

    filter: str = ""
    sort: str = "created"
    reverse: bool = False
    group: bool = False
    archived: bool = False
    never_started: bool = False  # show runs cancelled before they started (hidden by default: they pile up)

    def apply(self, records: list[RunRecord]) -> list[RunRecord]:
        query = parse_filter(self.filter)
        shown = [r for r in records if (self.archived or ARCHIVED not in r.tags)
                 and (self.never_started or not never_started(r)) and matches(r, query)]
        shown = sort_runs(shown, self.sort, self.reverse)
        if self.group:
            shown.sort(key=lambda r: (study_of(r) == "", study_of(r)))  # stable: keeps the order inside a study
        return shown

    def hidden_never_started(self, records: Iterable[RunRecord]) -> int:
        return 0 if self.never_started else sum(1 for r in records if never_started(r))

    def to_settings(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_settings(cls, saved: object) -> View:
        """The view saved by ``to_settings``; a missing or malformed value keeps its default."""
        view = cls()
        if isinstance(saved, dict):
            for f in fields(cls):
                value = saved.get(f.name)
                if isinstance(value, type(getattr(view, f.name))):
                    setattr(view, f.name, value)
        if view.sort not in SORTS:
            view.sort = "created"
        return view


class RunsScreen(KeepStyles, Screen[None]):
    AUTO_FOCUS = "#runs"
    # The footer shows what a newcomer needs (it fits 120 columns with ? and q); the rest is in ? and ctrl+p.
    BINDINGS = [
        Binding("enter", "open", "Monitor", priority=True,  # before the table's own enter, so the footer shows it
                tooltip="open the run under the cursor: its curves, scores and log"),
        Binding("space", "mark", "Mark", tooltip="mark or unmark the run; t, a, d, c and R act on the marked runs"),
        Binding("slash", "filter", "Filter", priority=True,  # run before the keys that follow it arrive
                tooltip="words (name, id, notes, tags), status:failed, tag:study:x, name:vit; -tag:x excludes"),
        Binding("s", "sort", "Sort", tooltip="sort by the next column (or click a header)"),
        Binding("c", "compare", "Compare", tooltip="overlay the marked runs' curves, scores and configs"),
        Binding("t", "tags", "Tags", tooltip="edit the tags of the marked runs (or the cursor's)"),
        Binding("n", "notes", "Notes", tooltip="write the notes of the run under the cursor"),
        Binding("a", "archive", "Archive", tooltip="archive the marked runs (or the cursor's); again restores"),
        Binding("d", "delete", "Delete", tooltip="delete the marked runs (or the cursor's), after asking"),
        Binding("S", "reverse", "Reverse sort", show=False),
        Binding("U", "unmark_all", "Unmark all", show=False),
        Binding("R", "queue_again", "Queue again", show=False,
                tooltip="queue the marked failed, cancelled or crashed runs again (resume or start over)"),
        Binding("e", "clone", "Clone to Compose", show=False, tooltip="edit a copy of the run's config in Compose"),
        Binding("x", "examples", "Examples", show=False,
                tooltip="the run's kept predictions with their pictures (ren eval task RUN --examples N)"),
        Binding("g", "group", "Group by study", show=False, tooltip="group runs by their study:NAME tag"),
        Binding("A", "show_archived", "Show archived", show=False),
        Binding("H", "show_never_started", "Show never-started", show=False,
                tooltip="show the runs cancelled before they trained (hidden by default)"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.view = View()
        self.records: dict[str, RunRecord] = {}
        self.marked: set[str] = set()
        self.loaded = False  # the store has been read once
        self.store_error: str | None = None  # why the last read of the store failed (the table keeps what it had)
        self._rows: dict[str, tuple[str, ...]] = {}  # the cells the table shows or is about to, by run id
        self._order: list[str] = []  # the runs the table shows or is about to, in order (see render_table)
        self._added = 0  # how many of them it has
        self._fills = 0  # rebuilds of the table so far (a batch of rows for an earlier one is dropped)
        self._header: tuple[tuple[str, str, int], ...] = ()  # the columns: (key, label, width)
        self._cells: dict[str, tuple[RunRecord, tuple, tuple[tuple[str, ...], tuple[int, ...]]]] = {}
        """_row's: (record, context, (cells, widths)) by run id"""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter: words · status:failed · tag:study: · name:vit · -tag:x excludes",
                    id="filter")
        yield RunTable(id="runs", classes="panel")
        yield Static("", id="detail")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        saved = self.app.settings.get("runs", {})
        self.view = View.from_settings(saved)
        marks = saved.get("marks") if isinstance(saved, dict) else None
        self.marked = {m for m in marks if isinstance(m, str)} if isinstance(marks, list) else set()
        if self.view.filter:
            box = self.query_one("#filter", Input)
            with box.prevent(Input.Changed):
                box.value = self.view.filter
            box.add_class("shown")
        self.columns: tuple[str, ...] = ()
        self.set_columns(self.size.width)  # the runs are read when the screen shows (on_screen_resume)
        self.set_interval(REFRESH_S, self._tick)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """In the filter, enter submits it and / types a slash: the screen's enter and / are priority
        bindings, which Textual would otherwise run before the field sees the key."""
        return not (action in ("open", "filter") and is_text_field(self.focused))

    def set_columns(self, width: int | None = None, *, force: bool = False) -> None:
        """The columns that fit ``width`` (the screen's when None), the sorted one's header marked ▲ or ▼."""
        columns = COLUMNS if (self.size.width if width is None else width) >= 120 else NARROW
        if columns == self.columns and not force:
            return
        self.columns = columns
        cursor = self.current_id()
        self._header = ()  # made again by render_table
        self.render_table(cursor)

    def sort_arrow(self, column: str) -> str:
        if column != self.view.sort:
            return ""
        return " ▼" if SORTS[column][1] != self.view.reverse else " ▲"

    def on_resize(self, event) -> None:
        self.set_columns(event.size.width)

    def remember(self) -> None:
        """Keep the view and the marks in the store's TUI settings (written off the UI thread)."""
        self.app.remember(runs={**self.view.to_settings(), "marks": sorted(self.marked)})

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
        if len(self._cells) > len(self.records):  # runs deleted: forget their rows
            self._cells = {k: v for k, v in self._cells.items() if k in self.records}
        if self.marked - set(self.records):  # marked runs deleted elsewhere
            self.marked &= set(self.records)
            self.remember()
        self.render_table()
        if not self.loaded:
            self.loaded = True
            # the app's warm-up (imports, the inspector, screens made behind this one) once the runs are on
            # screen: started now, it would take half the CPU the first frame with them needs
            table = self.query_one("#runs", RunTable)
            if table.row_count:
                table.when_rows_drawn = self.app.warm_up
            else:
                self.app.warm_up()

    def render_table(self, cursor: str | None = None) -> None:
        """Show the runs the view lets through, the cursor staying on its run (or on ``cursor``).

        The columns get explicit widths, those DataTable would measure (the widest cell or header), computed
        from the cells' text: rows can then be added a batch at a time (``_add_rows``), the first screenful
        before the next frame and the rest after it, without a column changing width as they come. Measuring
        every cell of 500 runs took DataTable 0.2 s here, all before the first frame with runs."""
        table = self.query_one("#runs", DataTable)
        shown = self.view.apply(list(self.records.values()))
        cursor = cursor or self.current_id()
        order = [r.id for r in shown]
        made = {r.id: self._row(r) for r in shown}
        rows = {run_id: cells for run_id, (cells, _) in made.items()}
        widths = [0] * len(self.columns)
        for _, row_widths in made.values():
            widths = list(map(max, widths, row_widths))
        header = tuple((column, label, max(width, cell_len(label)))
                       for column, width in zip(self.columns, widths)
                       for label in [cell(column) + self.sort_arrow(column)])
        if header != self._header:  # columns, sorting or widths changed: new columns, and so new rows
            table.clear(columns=True)
            for column, label, width in header:
                table.add_column(label, key=column, width=width)
            self._header, self._order = header, []
        if order != self._order:  # membership or order changed: rebuild
            table.clear()
            self._order, self._added, self._rows = order, 0, rows
            self._fills += 1
            first = self.size.height + FIRST_ROWS
            self._add_rows(max(first, order.index(cursor) + first if cursor in order else 0))
        else:  # only the cells that changed: a refresh of an unchanged store costs no redraw
            for run_id in order[:self._added]:
                cells, before = rows[run_id], self._rows.get(run_id)
                if cells != before:
                    for i, (column, value) in enumerate(zip(self.columns, cells)):
                        if before is None or len(before) != len(cells) or before[i] != value:
                            table.update_cell(run_id, column, value)
            self._rows = rows  # rows still to be added get the newest cells
        if cursor in order:
            table.move_cursor(row=order.index(cursor))
        self.show_status(len(shown))
        self.show_detail()

    def _add_rows(self, upto: int, fill: int | None = None) -> None:
        """Add the rows of ``self._order`` up to ``upto``; the next MORE_ROWS MORE_ROWS_S later (the table
        measures them once idle, then the frame is drawn), until all are in. ``fill``: the rebuild this was
        scheduled for (a later one replaces it)."""
        if fill is not None and fill != self._fills:
            return
        table = self.query_one("#runs", DataTable)
        for run_id in self._order[self._added:upto]:
            table.add_row(*self._rows[run_id], key=run_id)
        self._added = max(self._added, min(upto, len(self._order)))
        if self._added < len(self._order):
            self.set_timer(MORE_ROWS_S, partial(self._add_rows, self._added + MORE_ROWS, self._fills))

    def cells(self, r: RunRecord) -> tuple[str, ...]:
        """The row of ``r`` (rich markup); an archived run's row is dimmed, and its name says so (which
        NO_COLOR keeps)."""
        return self._row(r)[0]

    def _row(self, r: RunRecord) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """:meth:`cells` and each cell's width. Kept while the store hands back the same record (its index
        unchanged) and the row's mark, grouping and columns are the same; a running run's time moves on, so
        it is made anew."""
        context = (r.id in self.marked, self.view.group, self.columns)
        kept = self._cells.get(r.id)
        if kept is not None and kept[0] is r and kept[1] == context and r.status != "running":
            return kept[2]
        row = self._make_cells(r)
        self._cells[r.id] = (r, context, row)
        return row

    def _make_cells(self, r: RunRecord) -> tuple[tuple[str, ...], tuple[int, ...]]:
        name = f"{study_of(r)} / {r.name}" if self.view.group and study_of(r) else r.name
        archived = ARCHIVED in r.tags
        # the text shown (control characters escaped), and whether it goes through rich's markup escaping
        texts = {"✓": ("✓" if r.id in self.marked else "", False),
                 "name": (safe(name), True), "kind": (safe(f"{STAGE[r.stage]} {r.kind}"), True),
                 "status": (r.status, False), "progress": (progress(r), False),
                 "loss": (sparkline(r.loss_trace), False),
                 "best": (safe(format_run_scores(r, short=True)), True), "time": (format_duration(r), False),
                 "device": (safe(r.device or "-"), True), "tags": (safe(", ".join(user_tags(r))), True)}
        shown = [texts[c] for c in self.columns]
        if archived:
            shown = [(text + " (archived)", True) if c == "name" else (text, escaped)
                     for c, (text, escaped) in zip(self.columns, shown)]
        row = tuple(escape(text) if escaped else text for text, escaped in shown)
        if archived:
            row = tuple(f"[dim italic]{c}[/]" if c else c for c in row)
        return row, tuple(cell_len(text) for text, _ in shown)

    def show_status(self, shown: int) -> None:
        total = len(self.records)
        if not total:
            text = "No runs yet: start one with `ren run presets/quickstart.toml`, or compose one (2)."
        else:
            arrow = self.sort_arrow(self.view.sort).strip()
            parts = [f"{shown} of {total} runs", f"sorted by {self.view.sort} {arrow} (s, S)"]
            if self.view.filter:
                parts.append(f"filter '{self.view.filter}'")
            if self.marked:
                parts.append(f"{len(self.marked)} marked")
            if self.view.group:
                parts.append("grouped by study")
            if self.view.archived:
                parts.append("archived shown")
            if hidden := self.view.hidden_never_started(self.records.values()):
                parts.append(f"{hidden} never started hidden (H)")
            text = " · ".join(parts)
        if self.store_error:
            text = f"cannot read the store (showing the last runs read): {self.store_error}"
        self.query_one("#status", Static).update(Content(safe(text)))

    def current_id(self) -> str | None:
        return self.query_one("#runs", RunTable).cursor_key()

    def current(self) -> RunRecord | None:
        run_id = self.current_id()
        return self.records.get(run_id) if run_id else None

    def targets(self) -> list[RunRecord]:
        """What an action applies to: the marked runs (in the table's order, then those the view hides),
        else the run under the cursor."""
        if self.marked:
            shown = self.view.apply(list(self.records.values()))
            ids = {r.id for r in shown}
            hidden = [r for r in self.records.values() if r.id in self.marked and r.id not in ids]
            return [r for r in shown if r.id in self.marked] + hidden
        r = self.current()
        return [r] if r is not None else []

    def how_many(self, runs: list[RunRecord]) -> str:
        """``run NAME`` for one run, ``N runs`` for several (saying how many the view hides)."""
        if len(runs) == 1:
            return f"run {runs[0].name}"
        shown = {r.id for r in self.view.apply(list(self.records.values()))}
        hidden = sum(1 for r in runs if r.id not in shown)
        return f"{len(runs)} runs" + (f" ({hidden} of them hidden by the view)" if hidden else "")

    @on(DataTable.RowHighlighted)
    def show_detail(self) -> None:
        r = self.current()
        if r is None:
            self.query_one("#detail", Static).update("")
            return
        lines = [markup("[b]$id[/b]  $stage/$kind  $status  device $device", id=r.id, stage=r.stage, kind=r.kind,
                        status=r.status, device=r.device or "-")]
        if user_tags(r) or ARCHIVED in r.tags:
            lines.append(markup("tags: $tags" + ("  [b]archived[/b]" if ARCHIVED in r.tags else ""),
                                tags=", ".join(user_tags(r)) or "-"))
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

    def action_examples(self) -> None:
        if (run_id := self.current_id()) is not None:
            self.app.open_examples(run_id)

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        self.action_open()

    def action_mark(self) -> None:
        if (run_id := self.current_id()) is None:
            return
        self.marked ^= {run_id}
        self.remember()
        self.render_table()
        table = self.query_one("#runs", DataTable)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    def action_unmark_all(self) -> None:
        if self.marked:
            self.marked.clear()
            self.remember()
            self.render_table()

    def action_compare(self) -> None:
        ids = [r.id for r in self.targets()] if self.marked else []
        if len(ids) < 2:
            self.notify("Mark two or more runs with space, then press c.", severity="warning")
            return
        self.app.open_compare(ids)

    def action_filter(self) -> None:
        """Show the filter and give it the keyboard now (a priority binding runs before the next key is
        dispatched): keys that arrive with the ``/`` (over SSH they come in bursts) must be typed into
        it, not taken as commands (an ``e`` cloned the run)."""
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.display = True  # at once: the class applies at the next refresh, after the burst
        self.set_focus(box)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.view.filter = event.value
        self.remember()
        self.render_table()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        if self.view.filter:
            self.query_one("#runs", DataTable).focus()
        else:
            self.hide_filter()

    @on(LeftField, "#filter")
    def action_clear_filter(self) -> None:
        """Escape, in the filter or in the table: the filter goes, every run shows again."""
        box = self.query_one("#filter", Input)
        box.value = ""
        self.hide_filter()

    def hide_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("shown")
        box.styles.clear_rule("display")  # the stylesheet's again: hidden without .shown
        self.query_one("#runs", DataTable).focus()

    def sort_by(self, column: str, reverse: bool = False) -> None:
        self.view.sort, self.view.reverse = column, reverse
        self.remember()
        self.set_columns(force=True)

    def action_sort(self) -> None:
        """Sort by the next column shown (created, when the last one was sorted by)."""
        order = ["created", *(c for c in self.columns if c in SORTS)]
        current = order.index(self.view.sort) if self.view.sort in order else -1
        self.sort_by(order[(current + 1) % len(order)])

    def action_reverse(self) -> None:
        self.sort_by(self.view.sort, not self.view.reverse)

    @on(DataTable.HeaderSelected)
    def _header_clicked(self, event: DataTable.HeaderSelected) -> None:
        column = event.column_key.value
        if column in SORTS:
            self.sort_by(column, not self.view.reverse if column == self.view.sort else False)

    def toggle(self, setting: str) -> None:
        setattr(self.view, setting, not getattr(self.view, setting))
        self.remember()
        self.render_table()

    def action_group(self) -> None:
        self.toggle("group")

    def action_show_archived(self) -> None:
        self.toggle("archived")

    def action_show_never_started(self) -> None:
        self.toggle("never_started")

    def action_clone(self) -> None:
        runs = self.targets()
        if len(runs) > 1:
            self.notify("Compose edits one run's config: mark one run (U unmarks all) or none, then press e.",
                        severity="warning")
        elif runs:
            self.app.clone_to_compose(runs[0].config)

    def _apply(self, run_id: str, **fields: object) -> bool:
        try:
            record = self.app.backend.update(run_id, **fields)
        except RenError as exc:
            self.notify(safe(str(exc)), severity="error", markup=False)
            return False
        self.records[record.id] = record
        return True

    def action_tags(self) -> None:
        runs = self.targets()
        if not runs:
            return
        shared = [t for t in user_tags(runs[0]) if all(t in r.tags for r in runs[1:])]

        def done(value: str | None) -> None:
            if value is None:
                return
            tags = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
            for r in runs:
                own = [t for t in user_tags(r) if t not in shared and t not in tags]
                self._apply(r.id, tags=own + tags + ([ARCHIVED] if ARCHIVED in r.tags else []))
            self.render_table()

        title = (markup("Tags of $name (comma separated)", name=runs[0].name) if len(runs) == 1 else
                 markup("Tags of $what (comma separated): the tags they all have; a run's others stay",
                        what=self.how_many(runs)))
        self.app.push_screen(Prompt(title, safe(", ".join(shared)),
                                    hint=f"a tag {STUDY_PREFIX}NAME puts a run in a study"), done)

    def action_notes(self) -> None:
        if (r := self.current()) is None:
            return

        def done(value: str | None) -> None:
            if value is not None and self._apply(r.id, notes=value):
                self.render_table()

        self.app.push_screen(Prompt(markup("Notes on $name", name=r.name), safe(r.notes)), done)

    def action_archive(self) -> None:
        """Archive the runs, or restore them when all of them are archived already."""
        runs = self.targets()
        if not runs:
            return
        restore = all(ARCHIVED in r.tags for r in runs)
        done = sum(self._apply(r.id, tags=user_tags(r) + ([] if restore else [ARCHIVED])) for r in runs)
        self.render_table()
        what = self.how_many(runs) if len(runs) > 1 else runs[0].name
        if done:
            self.notify(safe(f"{what} {'restored' if restore else 'archived (A shows archived runs)'}"),
                        markup=False)

    def action_delete(self) -> None:
        runs = self.targets()
        if not runs:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            deleted = []
            for r in runs:
                try:
                    self.app.backend.delete(r.id)
                except RenError as exc:
                    self.notify(safe(str(exc)), severity="error", markup=False)
                    continue
                self.records.pop(r.id, None)
                deleted.append(r.id)
            if self.marked & set(deleted):
                self.marked -= set(deleted)
                self.remember()
            self.render_table()
            if deleted:
                self.notify(f"deleted {deleted[0]}" if len(deleted) == 1 else f"deleted {len(deleted)} runs")

        if len(runs) == 1:
            question = markup("Delete run $id with its metrics and checkpoints?", id=runs[0].id)
        else:
            names = ", ".join(r.name for r in runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
            question = markup("Delete $what with their metrics and checkpoints? $names",
                              what=self.how_many(runs), names=names)
        self.app.push_screen(Confirm(question), done)

    def action_queue_again(self) -> None:
        """Queue the failed, cancelled or crashed runs again (each resumes from its last checkpoint, or
        starts over without one), as R does in the Queue."""
        runs = self.targets()
        again = [r for r in runs if r.status in RETRYABLE]
        if not again:
            if runs:
                self.notify("Only failed, cancelled or crashed runs can be queued again.", severity="warning")
            return
        self.retry([r.id for r in again], skipped=len(runs) - len(again))

    @work(thread=True, group="runs-retry")
    def retry(self, run_ids: list[str], skipped: int) -> None:
        backend, said = self.app.backend, []
        for run_id in run_ids:
            try:
                backend.retry(run_id)
                said.append(backend.retry_outcome(run_id))
            except RenError as exc:
                self.app.call_from_thread(self.notify, safe(str(exc)), severity="error", markup=False)
        if len(said) == 1 and len(run_ids) == 1:
            message = f"queued {run_ids[0]} again; {said[0]}"
        elif said:
            resumes = sum(1 for s in said if "resumes" in s)
            message = (f"queued {len(said)} runs again: {resumes} resume from their last checkpoint, "
                       f"{len(said) - resumes} start over")
        else:
            message = ""
        if message and skipped:
            message += f" ({skipped} skipped: only failed, cancelled or crashed runs are queued again)"
        if message:
            self.app.call_from_thread(self.notify, message)
        self.app.call_from_thread(self.refresh_runs)

    def on_screen_resume(self) -> None:
        """Read the runs whenever the screen comes to the front, the first time included."""
        self.refresh_runs()
