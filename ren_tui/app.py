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

from engine.store import Store
from ren_tui.backend import Backend

HELP = """\
# ren-tui

**Screens** — `1` Runs · `2` Compose · `3` Queue · `enter` on a run opens its Monitor ·
`c` compares the marked runs · `f` in Compose opens Freeze.

**Everywhere** — `?` this help · `ctrl+p` command palette · `escape` back · `q` quit
(runs go on: training happens in other processes; reopen `ren-tui` to watch them again).

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
        rows = [f"| `{b.key}` | {b.description} |" for b in getattr(below, "BINDINGS", [])
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
    BINDINGS = [
        Binding("1", "switch_mode('runs')", "Runs"),
        Binding("2", "switch_mode('compose')", "Compose"),
        Binding("3", "switch_mode('queue')", "Queue"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def on_mount(self) -> None:
        self.sub_title = str(self.backend.store.root)
        self.call_after_refresh(self.warm_inspector)  # after the first paint: it imports torch, a core's work

    @work(thread=True, exclusive=True, group="inspector-warm-up")
    def warm_inspector(self) -> None:
        """Start Compose's model inspector with the app (it imports torch: seconds), so Compose answers at once."""
        self.backend.warm_inspector()

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
                                    f"key {binding.key}", partial(screen.run_action, binding.action))

    @work(thread=True, exclusive=True, group="warm-up")
    def warm_up(self) -> None:
        """Import the chart screens in the background once the Runs screen is up, so
        opening a run's Monitor does not pay for plotting libraries."""
        import ren_tui.screens.compare  # noqa: F401
        import ren_tui.screens.monitor  # noqa: F401

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
