"""The Textual app. For now one screen: the live list of runs in the store.

``make_app`` serves both the ``ren-tui`` entry point and the tests.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from engine.display import format_duration, format_scores, format_steps
from engine.store import RunRecord, Store

REFRESH_S = 2.0
COLUMNS = ("id", "name", "stage", "kind", "status", "steps", "best", "duration")


def row(record: RunRecord) -> tuple[str, ...]:
    return (record.id, record.name, record.stage, record.kind, record.status, format_steps(record),
            format_scores(record.best_scores), format_duration(record))


class RenApp(App[None]):
    """Runs in the store, refreshed live."""

    CSS_PATH = "app.tcss"
    TITLE = "ren"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, store: Store):
        super().__init__()
        self.store = store

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        self.sub_title = str(self.store.root)
        self.action_refresh()
        self.set_interval(REFRESH_S, self.action_refresh)

    def action_refresh(self) -> None:
        table = self.query_one("#runs", DataTable)
        records = self.store.list_runs()
        seen = set()
        for record in records:
            seen.add(record.id)
            values = row(record)
            if record.id in table.rows:
                for column, value in zip(COLUMNS, values):
                    table.update_cell(record.id, column, value)
            else:
                table.add_row(*values, key=record.id)
        for key in [k for k in table.rows if k.value not in seen]:
            table.remove_row(key)
        if not records:
            self.query_one("#detail", Static).update("No runs yet: start one with `ren run presets/quickstart.toml`.")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        record = self.store.get_run(event.row_key.value)
        lines = [f"{record.id}  {record.status}  device {record.device or '-'}"]
        if record.params:
            lines.append(
                f"parameters: {record.params.get('total', 0):,} total, "
                f"{record.params.get('trainable', 0):,} trainable"
            )
        if record.error:
            lines.append(f"error: {record.error}")
        self.query_one("#detail", Static).update("\n".join(lines))


def make_app(root: Path | str | None = None) -> RenApp:
    return RenApp(Store(root))


def main() -> None:
    make_app().run()
