"""A table of runs, one run per row, moved through the way htop, k9s and less users expect."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from textual.binding import Binding
from textual.geometry import Size
from textual.strip import Strip
from textual.widgets import DataTable


class RunTable(DataTable):
    """A row-cursor DataTable whose ``home``/``end`` go to the first/last row (DataTable's own
    scroll sideways there), with ``j``/``k`` as down/up."""

    BINDINGS = [
        Binding("home", "scroll_top", "First row", show=False),
        Binding("end", "scroll_bottom", "Last row", show=False),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self.when_rows_drawn: Callable[[], object] | None = None
        """Called once, after the first frame that draws rows of the table (the app's warm-up waits for it)."""

    def render_line(self, y: int) -> Strip:
        if self.when_rows_drawn is not None and self.row_count:
            self.call_after_refresh(self.when_rows_drawn)
            self.when_rows_drawn = None
        return super().render_line(y)

    def _update_dimensions(self, new_rows: Iterable[object]) -> None:
        """DataTable measures every cell of every new row (with Rich: 0.2 s for 500 runs on this machine) to
        size its auto-width columns and auto-height rows. Where every column has a width given and every row
        is one line high (the Runs table), nothing depends on that: only the table's virtual size changes."""
        new_rows = list(new_rows)
        if (self._labelled_row_exists or any(column.auto_width for column in self.columns.values())
                or any(row.auto_height or row.label is not None for key in new_rows if (row := self.rows.get(key)))):
            super()._update_dimensions(new_rows)
            return
        width = sum(column.get_render_width(self) for column in self.columns.values()) + self._row_label_column_width
        self.virtual_size = Size(width, self._total_row_height + (self.header_height if self.show_header else 0))

    def cursor_key(self) -> str | None:
        """The key of the row under the cursor, None when the table is empty."""
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
