"""A log as a scrollable list of lines that follows new output while it is scrolled to
the end (``less +F``): scrolled up, it stays put; scrolled back to the end, it follows
again. Lines are searched (smart case: case-insensitive unless the text has a capital),
every match highlighted and the current one marked.

Lines arrive already terminal-safe (``ren_tui.text.safe``) and are never parsed as markup.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.cells import cell_len
from rich.segment import Segment
from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip


class LogView(ScrollView, can_focus=True):
    """Lines of a log; :meth:`append` adds some (following when at the end), :meth:`search` finds text."""

    DEFAULT_CSS = """
    LogView { background: $surface; }
    LogView > .logview--match { background: $warning-muted; }
    LogView > .logview--current { background: $accent; color: $text; text-style: bold; }
    """
    COMPONENT_CLASSES = {"logview--match", "logview--current"}

    def __init__(self, *, max_lines: int = 200_000, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.lines: list[str] = []
        self.max_lines = max_lines
        self.pattern = ""
        self.current: int | None = None  # the line of the current match
        self.following = True  # scrolled to the end, so new lines scroll into view
        self._width = 0

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self.following = new_value >= self.max_scroll_y

    def append(self, lines: Iterable[str]) -> None:
        new = list(lines)
        if not new:
            return
        self.lines.extend(new)
        dropped = len(self.lines) - self.max_lines
        if dropped > 0:
            del self.lines[:dropped]
            if self.current is not None:
                self.current = self.current - dropped if self.current >= dropped else None
        self._width = max(self._width, max(map(cell_len, new)))
        self.virtual_size = Size(self._width, len(self.lines))
        if self.following:  # once the new size is laid out
            self.scroll_end(animate=False, x_axis=False)
        self.refresh()

    # --- search -------------------------------------------------------------------------------------

    def _matches(self, line: str) -> bool:
        if not self.pattern:
            return False
        return self.pattern in (line if any(ch.isupper() for ch in self.pattern) else line.lower())

    def search(self, pattern: str, direction: int = 1, start: int | None = None) -> int | None:
        """Go to the next line (``direction`` 1) or previous one (-1) holding ``pattern``, after
        ``start`` (default: the current match, else the top of the view), wrapping around; its index,
        or None when no line holds it."""
        self.pattern = pattern
        if not pattern or not self.lines:
            self.current = None
            self.refresh()
            return None
        n = len(self.lines)
        if start is None:
            start = self.current if self.current is not None else (
                int(self.scroll_y) - 1 if direction > 0 else int(self.scroll_y) + self.size.height)
        for k in range(1, n + 1):
            i = (start + direction * k) % n
            if self._matches(self.lines[i]):
                self.current = i
                self.scroll_to(y=max(i - self.size.height // 3, 0), animate=False, immediate=True)
                self.refresh()
                return i
        self.current = None
        self.refresh()
        return None

    # --- drawing ------------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.size.width
        style = self.rich_style
        if index >= len(self.lines):
            return Strip.blank(width, style)
        line = self.lines[index]
        text = Text(line, no_wrap=True)
        text.stylize(style)  # the base style as a span (Text.render leaves out Text.style)
        if self._matches(line):
            folded = line if any(ch.isupper() for ch in self.pattern) else line.lower()
            mark = self.get_component_rich_style("logview--current" if index == self.current else "logview--match")
            at = folded.find(self.pattern)
            while at >= 0:
                text.stylize(mark, at, at + len(self.pattern))
                at = folded.find(self.pattern, at + len(self.pattern))
        segments = list(text.render(self.app.console))
        strip = Strip(segments, text.cell_len).crop_extend(scroll_x, scroll_x + width, style)
        return strip.simplify() if segments else Strip([Segment(" " * width, style)], width)
