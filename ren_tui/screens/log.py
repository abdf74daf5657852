"""Log: one run's whole log, full screen, following new output like ``less +F``.

It opens at the end and follows; scrolling up stops following, ``end`` (or ``G``, ``F``)
goes back to the end and follows again, ``home`` (``g``) goes to the top. ``/`` searches
(smart case), ``n``/``N`` go to the next/previous match; matches are highlighted. The
file is read in a worker thread (the rotated backups too, up to LOG_VIEW_BYTES) and
then every second for new lines; control characters are shown as escapes.
"""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Input, Static

from engine.errors import RenError
from ren_tui.backend import LogChunk
from ren_tui.text import markup, safe
from ren_tui.widgets.footer import Footer
from ren_tui.widgets.logview import LogView

REFRESH_S = 1.0
LOG_VIEW_BYTES = 32 * 1024 * 1024


def shown_lines(chunk: LogChunk) -> list[str]:
    """A chunk's lines as they may reach the terminal (tabs expanded, control characters escaped)."""
    lines = [safe(line.expandtabs()) for line in chunk.lines]
    return [chunk.note, *lines] if chunk.note else lines


class LogScreen(Screen[None]):
    """The log of run ``run_id``, followed and searchable."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("slash", "search", "Search", key_display="/"),
        Binding("n", "next_match(1)", "Next match"),
        Binding("N", "next_match(-1)", "Previous match"),
        Binding("end,G,F", "follow", "Follow", key_display="end"),
        Binding("home,g", "top", "Top", key_display="home", show=False),
    ]

    class Read(Message):
        """New lines of the log, read in a worker; consecutive ones merge into one redraw."""

        def __init__(self, lines: list[str], position: tuple[int, int] | None, error: str = "") -> None:
            super().__init__()
            self.lines, self.position, self.error = lines, position, error

        def can_replace(self, message: Message) -> bool:
            if isinstance(message, LogScreen.Read) and not (self.error or message.error):
                message.lines[:0] = self.lines  # the newer message carries both, in order
                return True
            return False

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.position: tuple[int, int] | None = None
        self.read_once = False
        self._reading = None

    def compose(self) -> ComposeResult:
        yield Static(f"{self.run_id} · log · reading…", id="log-state", markup=False)
        yield LogView(id="log-lines")
        yield Input(placeholder="search (smart case); enter finds, escape cancels", id="log-search")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LogView).focus()
        self._read_more()
        self.set_interval(REFRESH_S, self._read_more)

    @property
    def view(self) -> LogView:
        return self.query_one(LogView)

    # --- reading --------------------------------------------------------------------------------

    def _read_more(self) -> None:
        if self._reading is None or self._reading.is_finished:
            self._reading = self._read()

    @work(thread=True, group="log-read")
    def _read(self) -> None:
        """Read what the log gained (the whole of it, backups included, the first time)."""
        try:
            if self.read_once:
                chunk = self.app.backend.read_log(self.run_id, self.position)
            else:
                chunk = self.app.backend.read_log(self.run_id, None, first_bytes=LOG_VIEW_BYTES, backups=True)
        except RenError as exc:
            self.post_message(self.Read([], self.position, str(exc)))
            return
        self.read_once = True
        self.position = chunk.position
        self.post_message(self.Read(shown_lines(chunk), chunk.position))

    def on_log_screen_read(self, message: Read) -> None:
        """Show the new lines (the view follows them while it is at the end)."""
        if message.error:
            self.notify(message.error, severity="error", markup=False)
        self.view.append(message.lines)
        self._show_state()

    def _show_state(self) -> None:
        view = self.view
        if not view.lines and self.position is None:
            where = "no log: only runs started by the queue have one"
        else:
            where = (f"{len(view.lines):,} lines · " +
                     ("[$success]following[/]" if view.following else "[$warning]paused[/]: end follows"))
        found = ""
        if view.pattern:
            found = " · /$pattern " + ("(no match)" if view.current is None else f"line {view.current + 1:,}")
        self.query_one("#log-state", Static).update(markup(f"[b]$id[/b] · log · {where}{found}", id=self.run_id,
                                                          pattern=view.pattern))

    def on_mouse_scroll_up(self) -> None:
        self.call_after_refresh(self._show_state)

    def on_mouse_scroll_down(self) -> None:
        self.call_after_refresh(self._show_state)

    # --- keys -----------------------------------------------------------------------------------

    def action_back(self) -> None:
        search = self.query_one("#log-search", Input)
        if search.has_class("shown"):
            self._close_search()
        else:
            self.app.pop_screen()

    def action_search(self) -> None:
        search = self.query_one("#log-search", Input)
        search.add_class("shown")
        search.value = self.view.pattern
        search.focus()

    def _close_search(self) -> None:
        self.query_one("#log-search", Input).remove_class("shown")
        self.view.focus()

    @on(Input.Submitted, "#log-search")
    def find_typed_text(self, event: Input.Submitted) -> None:
        self._close_search()
        self.view.current = None
        self._find(event.value, 1)

    def action_next_match(self, direction: int) -> None:
        if not self.view.pattern:
            self.notify("Nothing searched yet: / searches.")
            return
        self._find(self.view.pattern, direction)

    def _find(self, pattern: str, direction: int) -> None:
        if self.view.search(pattern, direction) is None and pattern:
            self.notify(f"{pattern!r} is not in the log.", markup=False)
        self._show_state()

    def action_follow(self) -> None:
        self.view.scroll_end(animate=False, immediate=True)
        self.call_after_refresh(self._show_state)

    def action_top(self) -> None:
        self.view.scroll_home(animate=False, immediate=True)
        self.call_after_refresh(self._show_state)
