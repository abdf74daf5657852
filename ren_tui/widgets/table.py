"""A table of runs, one run per row, moved through the way htop, k9s and less users expect."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
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

    def _render_cell(self, row_index: int, column_index: int, base_style: Style, width: int, cursor: bool = False,
                     hover: bool = False) -> list[list[Segment]]:
        """A one-line body cell, drawn as DataTable draws it (the same segments, cached under the same key)
        without Rich's general path (``Padding`` in ``Styled`` through ``render_lines``): half the time, which
        is most of the first frame of a big store. Headers, row labels, fixed cells and rows taller than a
        line are DataTable's own."""
        if row_index < 0 or column_index < 0 or row_index < self.fixed_rows or column_index < self.fixed_columns:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_key = self._row_locations.get_key(row_index)
        key = (row_key, self._column_locations.get_key(column_index), base_style, cursor, hover,
               self._show_hover_cursor, self._update_count, self._pseudo_class_state)  # DataTable's own cache key
        lines = self._cell_render_cache.get(key)
        if lines is None:
            row = self.rows.get(row_key)
            cell = self._get_row_renderables(row_index).cells[column_index]
            if row is None or row.height != 1 or not isinstance(cell, Text):
                return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
            component_style, post_style = self._get_styles_to_render_cell(
                False, False, False, hover, cursor, self.show_cursor, self._show_hover_cursor,
                self.cursor_foreground_priority == "css", self.cursor_background_priority == "css")
            pre_style = base_style + Style.from_meta({"row": row_index, "column": column_index}) + component_style
            padding = " " * self.cell_padding
            text = cell.copy()
            text.truncate(max(width - 2 * len(padding), 0), overflow="crop", pad=True)
            segments = [Segment(padding), *text.render(self.app.console, end=""), Segment(padding)]
            lines = [list(Segment.apply_style(segments, pre_style, post_style))]
            self._cell_render_cache[key] = lines
        return lines

    def cursor_key(self) -> str | None:
        """The key of the row under the cursor, None when the table is empty."""
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
