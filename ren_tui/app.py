"""``ren-tui``: the keyboard-driven workbench over a results store.

Screens: Runs (home), Compose, Queue as switchable modes (keys 1-3); Monitor,
Compare and Freeze open on top of them. Every screen reaches runs, metrics and
the queue only through :class:`ren_tui.backend.Backend`. Screen modules are
imported when first shown, so start-up pays only for the Runs screen.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widget import Widget

from engine.store import Store
from ren_tui.backend import Backend
from ren_tui.keys import LeftField, binding_keys, is_text_field, main_widget

HELP = """\
# ren-tui

**Screens** — `1` Runs · `2` Compose · `3` Queue · `enter` on a run opens its Monitor ·
`c` compares the marked runs · `f` in Compose opens Freeze.

**Everywhere** — `?` this help · `ctrl+p` command palette · `escape` back · `q` quit
(runs go on: training happens in other processes; reopen `ren-tui` to watch them again).

**Typing in a field** — letters and digits go into the field, so the one-key commands
(`1`-`3`, `?`, `q`, a screen's letters) wait: `escape` leaves the field, then they work.
`tab` and `shift+tab` move between fields and panels; the panel with the keyboard has a bar
on its left.

The footer lists the keys of the screen in front. The mouse works too.
"""


class HelpScreen(ModalScreen[None]):
    """Keys and screens, over whatever is open."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        from textual.widgets import Markdown  # markdown-it: imported when help first opens, not at start-up

        with VerticalScroll(id="help"):
            yield Markdown(HELP + self._screen_keys())

    def _screen_keys(self) -> str:
        below = self.app.screen_stack[-2] if len(self.app.screen_stack) > 1 else None
        if below is None:
            return ""
        rows = [f"| `{binding_keys(b)}` | {b.description} |" for b in getattr(below, "BINDINGS", [])
                if isinstance(b, Binding) and b.description]
        if not rows:
            return ""
        return f"\n**{type(below).__name__.removesuffix('Screen')}**\n\n| key | action |\n|---|---|\n" + "\n".join(rows)


def _runs_screen() -> Screen:
    from ren_tui.screens.runs import RunsScreen

    return RunsScreen()


def _compose_screen() -> Screen:
    from ren_tui.screens.compose import ComposeScreen

    return ComposeScreen()


def _queue_screen() -> Screen:
    from ren_tui.screens.queue import QueueScreen

    return QueueScreen()


class RenApp(App[None]):
    """The workbench. ``backend`` is the only way screens reach runs and the queue."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere (tests) get it too
    TITLE = "ren"
    MODES = {"runs": _runs_screen, "compose": _compose_screen, "queue": _queue_screen}
    DEFAULT_MODE = "runs"
    # The one-character keys work where no text field has focus (there they type, and the footer
    # does not list them); escape leaves a text field (ren_tui.keys). 1-3 stay out of the footer
    # (they are the same on every screen: ? and the palette list them) so each screen's own keys fit.
    BINDINGS = [
        Binding("1", "screen('runs')", "Runs", show=False),
        Binding("2", "screen('compose')", "Compose", show=False),
        Binding("3", "screen('queue')", "Queue", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit_key", "Quit"),
        Binding("escape", "leave_field", "Leave field", priority=True),
    ]

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def on_mount(self) -> None:
        self.sub_title = str(self.backend.store.root)

    def on_unmount(self) -> None:
        self.backend.close_inspector()  # the Compose screen's helper process, if it was started

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette (ctrl+p) offers the screens and every key action of the screen in front."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Runs", "Every run in the store (1)", partial(self.switch_mode, "runs"))
        yield SystemCommand("Compose", "Build a run config, freeze layers, queue it (2)",
                            partial(self.switch_mode, "compose"))
        yield SystemCommand("Queue", "Queued and running runs, GPUs (3)", partial(self.switch_mode, "queue"))
        yield SystemCommand("Help", "Keys and screens (?)", self.action_help)
        for binding in getattr(screen, "BINDINGS", []):
            if isinstance(binding, Binding) and binding.description:
                yield SystemCommand(binding.description, f"{type(screen).__name__.removesuffix('Screen')}: "
                                    f"key {binding_keys(binding)}", partial(screen.run_action, binding.action))

    @work(thread=True, exclusive=True, group="warm-up")
    def warm_up(self) -> None:
        """Import the chart screens in the background once the Runs screen is up, so
        opening a run's Monitor does not pay for plotting libraries."""
        import ren_tui.screens.compare  # noqa: F401
        import ren_tui.screens.monitor  # noqa: F401

    def typing_in(self) -> Widget | None:
        """The text field of a full screen that has focus (dialogs keep their own keys), or None."""
        if isinstance(self.screen, ModalScreen):
            return None
        return self.focused if is_text_field(self.focused) else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Escape leaves a field only while one has focus; the one-character keys are off in a
        text field (they type there) and in dialogs (whose keys they would shadow)."""
        if action == "leave_field":
            return self.typing_in() is not None
        if action in ("screen", "help", "quit_key"):
            return not isinstance(self.screen, ModalScreen) and self.typing_in() is None
        return True

    def action_screen(self, mode: str) -> None:
        self.switch_mode(mode)

    def action_quit_key(self) -> None:
        self.exit()

    def action_leave_field(self) -> None:
        """Blur the focused text field: focus goes to the screen's main widget, and the field
        posts LeftField so its screen may react."""
        field = self.focused
        if field is None:
            return
        self.screen.set_focus(main_widget(self.screen, field))
        field.post_message(LeftField(field))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def open_monitor(self, run_id: str) -> None:
        from ren_tui.screens.monitor import MonitorScreen

        self.push_screen(MonitorScreen(run_id))

    def open_compare(self, run_ids: list[str]) -> None:
        from ren_tui.screens.compare import CompareScreen

        self.push_screen(CompareScreen(run_ids))

    def clone_to_compose(self, config: dict) -> None:
        """Open Compose on a copy of ``config`` (a stored run's or a preset's)."""
        from ren_tui.screens.compose import ComposeScreen

        self.push_screen(ComposeScreen(config))


def make_app(root: Path | str | None = None, *, start_worker: bool = True) -> RenApp:
    return RenApp(Backend(Store(root), start_worker=start_worker))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ren-tui", description="The ren workbench in a terminal.")
    parser.add_argument("--store", type=Path, default=None,
                        help="results store directory (default: $REN_HOME or ~/.local/share/ren)")
    args = parser.parse_args(argv)
    make_app(args.store).run()
