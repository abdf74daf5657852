"""Examples: what a finetuned run predicted on the items ``ren eval task RUN --examples N`` kept (the
model's most confident errors and a sample of the rest, engine.predictions), with their pictures.

The header names the split and its score, a small table the score per category of the data (question
type, answer type, gold label), the main table the kept examples (errors marked ✗), and the side panel
the picture of the example under the cursor with its text, image reference, prediction and truth. ``e``
shows the errors only (again: all), ``s`` the next evaluated split when there are several, ``escape``
goes back. Opened with ``x`` on the Runs screen, ``X`` in a run's Monitor.

The predictions are read in a worker thread, which also imports textual-image the first time a picture is
shown (ren_tui.widgets.picture: how pictures are drawn, and why the terminal is not asked).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import DataTable, Static

from engine.errors import RenError
from engine.predictions import Example, SplitPredictions
from engine.store import RunRecord
from ren_tui.screens import KeepStyles
from ren_tui.text import cell, markup, safe
from ren_tui.widgets import picture
from ren_tui.widgets.footer import Footer
from ren_tui.widgets.table import RunTable

TEXT_CELL = 36  # characters of an example's text in the table (the side panel shows all of it)
# the examples table, left to right: what a narrow terminal cuts off last comes first ("" is the ✗/✓ mark)
COLUMNS = ("", "text", "prediction", "truth", "score", "conf", "{category}", "kept as")
ERROR_MARK = "✗"
RIGHT_MARK = "✓"
GET_THEM = "`ren eval task {id} --examples 20`"


def no_predictions(record: RunRecord | None, run_id: str) -> str:
    """The line shown for a run without kept predictions: how to get them."""
    if record is not None and record.stage == "pretrain":
        return (f"Run {run_id} is a pretraining run: it answers no task, so it has no predictions to show. "
                f"Finetune from it, then {GET_THEM.format(id='RUN')} keeps a finetuned run's.")
    return (f"No kept predictions for run {run_id}: {GET_THEM.format(id=run_id)} scores it and keeps 20 "
            "examples with their pictures.")


def example_cells(example: Example) -> tuple[str, ...]:
    """An example's row (rich markup, its text made safe), in :data:`COLUMNS` order. An error's mark and
    prediction are red, and the mark says it without colour."""
    text = safe(example.text)
    if len(text) > TEXT_CELL:
        text = text[:TEXT_CELL - 1] + "…"
    prediction = cell(example.prediction) or "-"
    if example.error:
        mark, prediction = f"[bold red]{ERROR_MARK}[/]", f"[red]{prediction}[/]"
    else:
        mark = f"[green]{RIGHT_MARK}[/]"
    return (mark, escape(text), prediction, cell(example.truth), f"{example.score:.2f}",
            f"{example.confidence:.2f}", cell(example.category or "-"), cell(example.why))


def set_columns(table: DataTable, labels: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Give ``table`` the columns ``labels`` (rich markup), each as wide as the widest of it and its cells
    in ``rows``. A DataTable measures auto-width columns only once idle, and a frame drawn before that
    kept its lines drawn at the labels' widths; widths given up front also spare it the measuring."""
    table.clear(columns=True)
    for n, label in enumerate(labels):
        width = max((Text.from_markup(row[n]).cell_len for row in rows), default=0)
        table.add_column(label, width=max(width, Text.from_markup(label).cell_len))


class ExamplesScreen(KeepStyles, Screen[None]):
    """Run ``run_id``'s kept predictions. ``renderer`` draws the pictures (a ren_tui.widgets.picture name;
    None: chosen from the environment, see ``choose_renderer``)."""

    AUTO_FOCUS = "#examples"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("e", "errors_only", "Errors only", tooltip="show only the examples the model got wrong; again: all"),
        Binding("s", "next_split", "Next split", tooltip="the run's kept predictions on its next evaluated split"),
    ]

    class Loaded(Message):
        """What the worker read: the run, its kept predictions (one per split), the picture widget class
        (None without pictures, or when textual-image cannot be imported: ``no_pictures`` says why), or why
        the predictions cannot be read (``error``)."""

        def __init__(self, record: RunRecord | None, splits: list[SplitPredictions],
                     image_class: type[Widget] | None, error: str = "", no_pictures: str = "") -> None:
            super().__init__()
            self.record, self.splits, self.image_class, self.error = record, splits, image_class, error
            self.no_pictures = no_pictures

    def __init__(self, run_id: str, renderer: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.renderer = renderer or picture.choose_renderer()
        self.record: RunRecord | None = None
        self.splits: list[SplitPredictions] = []
        self.split = 0  # which of self.splits is shown
        self.errors_only = False
        self.image: Widget | None = None  # textual-image's widget, once loaded
        self.no_pictures = ""  # why pictures cannot be drawn here, if they cannot

    def compose(self) -> ComposeResult:
        yield Static(markup("[b]$id[/b] · kept predictions · reading…", id=self.run_id), id="examples-header")
        yield Static(id="examples-message")
        with Horizontal(id="examples-body"):
            with Vertical(id="examples-main"):
                breakdown = DataTable(id="breakdown", cursor_type="none", zebra_stripes=True)
                breakdown.can_focus = False
                yield breakdown
                yield RunTable(id="examples", classes="panel")
            with Vertical(id="example-side"):
                yield Container(id="picture-box")
                yield Static(id="picture-note")
                yield Static(id="example-detail")
        yield Static(id="examples-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#examples").border_title = "kept examples"
        self.query_one("#example-side").border_title = f"picture · {picture.RENDERERS[self.renderer]}"
        self._load()

    @work(thread=True, exclusive=True, group="examples-load")
    def _load(self) -> None:
        """Read the run and its kept predictions; import textual-image if any of them has a picture."""
        backend = self.app.backend
        try:
            record = backend.run(self.run_id)
            splits = backend.predictions(self.run_id)
        except RenError as exc:
            self.post_message(self.Loaded(None, [], None, str(exc)))
            return
        image_class, no_pictures = None, ""
        if any(e.thumbnail for split in splits for e in split.examples):
            try:
                image_class = picture.image_class(self.renderer, picture.cell_size())
            except ImportError as exc:  # a broken install: the rest still shows
                no_pictures = f"(pictures cannot be drawn here: {exc})"
        self.post_message(self.Loaded(record, splits, image_class, no_pictures=no_pictures))

    def on_examples_screen_loaded(self, message: Loaded) -> None:
        self.record, self.splits, self.no_pictures = message.record, message.splits, message.no_pictures
        if message.error or not message.splits:
            self.add_class("empty")
            header = f"[b]$id[/b] · {'cannot read its kept predictions' if message.error else 'no kept predictions'}"
            self.query_one("#examples-header", Static).update(markup(header, id=self.run_id))
            line = message.error or no_predictions(message.record, self.run_id)
            self.query_one("#examples-message", Static).update(Content(safe(line)))
            return
        if message.image_class is not None:
            self.image = message.image_class(id="picture")
            self.query_one("#picture-box").mount(self.image)
        self.show_split()
        self.refresh_bindings()

    # --- what is shown ------------------------------------------------------------------------------

    @property
    def predictions(self) -> SplitPredictions:
        return self.splits[self.split]

    def show_split(self) -> None:
        """The header, the breakdown and the examples of the split shown."""
        p = self.predictions
        where = f" · split {self.split + 1} of {len(self.splits)} (s: next)" if len(self.splits) > 1 else ""
        self.query_one("#examples-header", Static).update(markup(
            f"[b]$id[/b] · $task on $key · $metric [b]$score[/b] on $samples samples{where}",
            id=p.run_id, task=p.task, key=p.key, metric=p.metric, score=f"{p.score:.4f}", samples=f"{p.samples:,}"))
        table = self.query_one("#breakdown", DataTable)
        rows = [tuple(f"[b]{c}[/b]" if row.category == "all" else c for c in
                      (cell(row.category), f"{row.n:,}", f"{row.score:.4f}", f"{row.errors:,}")) for row in p.breakdown]
        set_columns(table, (cell(p.category_kind or "category"), "items", cell(p.metric), "errors"), rows)
        for row in rows:
            table.add_row(*row)
        self.show_examples()

    def show_examples(self, keep: int | None = None) -> None:
        """Fill the examples table (the errors only, when so set); the cursor stays on the example at
        position ``keep`` of the split when it is still shown."""
        p = self.predictions
        table = self.query_one("#examples", RunTable)
        rows = [example_cells(e) for e in p.examples]  # all of them size the columns: e keeps them put
        set_columns(table, [cell(c.format(category=p.category_kind or "category")) for c in COLUMNS], rows)
        positions = [i for i, e in enumerate(p.examples) if e.error or not self.errors_only]
        for i in positions:
            table.add_row(*rows[i], key=str(i))
        if keep in positions:
            table.move_cursor(row=positions.index(keep), animate=False)
        self.show_status()
        self.show_example()

    def show_status(self) -> None:
        p = self.predictions
        errors = sum(e.error for e in p.examples)
        parts = [f"{len(p.examples)} kept examples, {errors} errors ({ERROR_MARK})",
                 "errors only (e: all)" if self.errors_only else "e: errors only",
                 "most confident errors first"]
        self.query_one("#examples-status", Static).update(Content(" · ".join(parts)))

    def current(self) -> tuple[int, Example] | None:
        """(position in the split, example) under the cursor; None when the table is empty."""
        key = self.query_one("#examples", RunTable).cursor_key()
        if key is None:
            return None
        return int(key), self.predictions.examples[int(key)]

    @on(DataTable.RowHighlighted, "#examples")
    def show_example(self) -> None:
        """The picture and the words of the example under the cursor."""
        detail = self.query_one("#example-detail", Static)
        note = self.query_one("#picture-note", Static)
        found = self.current()
        if found is None:
            self._show_picture(None)
            errors = "no errors among the kept examples (e: all)" if self.errors_only else "no kept examples"
            note.update(errors)
            detail.update("")
            return
        example = found[1]
        self._show_picture(example)
        verdict = f"[bold red]{ERROR_MARK} wrong[/]" if example.error else f"[green]{RIGHT_MARK} right[/]"
        detail.update(Content("\n").join([
            markup("[b]$words[/b]", lines=True, words=example.text),
            markup("[$text-muted]image[/]       $image", image=example.image),
            markup(f"[$text-muted]prediction[/]  [b]$prediction[/b] {verdict} · conf $confidence",
                   prediction=example.prediction or "-", confidence=f"{example.confidence:.2f}"),
            markup("[$text-muted]truth[/]       [b]$truth[/b] · score $score", truth=example.truth,
                   score=f"{example.score:.2f}"),
            markup("$category [$text-muted]($kind)[/] · item $index", category=example.category or "-",
                   kind=self.predictions.category_kind or "category", index=str(example.index)),
            markup("[$text-muted]kept as a $why", why=example.why),
        ]))

    def _show_picture(self, example: Example | None) -> None:
        """Draw ``example``'s kept picture, or say why there is none."""
        note = self.query_one("#picture-note", Static)
        path = None if example is None else self.predictions.thumbnail_path(example)
        image, why = None, ""
        if example is not None and path is None:
            why = "(no picture was kept for this item)"
        elif path is not None and self.image is None:
            why = self.no_pictures
        elif path is not None:
            try:
                image = picture.open_picture(path)
            except (OSError, ValueError) as exc:
                why = f"(cannot read the picture {path}: {exc})"
        if self.image is not None:
            self.image.image = image
            self.image.display = image is not None
        note.update(Content(safe(why)))
        note.display = bool(why)

    # --- keys ---------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``s`` only where there is another split to show; ``e`` once there are examples."""
        if action == "next_split":
            return len(self.splits) > 1
        if action == "errors_only":
            return bool(self.splits)
        return True

    def action_errors_only(self) -> None:
        found = self.current()
        self.errors_only = not self.errors_only
        self.show_examples(keep=None if found is None else found[0])

    def action_next_split(self) -> None:
        if len(self.splits) > 1:
            self.split = (self.split + 1) % len(self.splits)
            self.show_split()
