"""``ren-tui``: the keyboard-driven workbench over a results store.

Screens: Runs (home), Compose, Queue as switchable modes (keys 1-3); Monitor,
Examples, Compare and Freeze open on top of them. Every screen reaches runs, metrics and
the queue only through :class:`ren_tui.backend.Backend`. Screen modules are
imported when first shown, so start-up pays only for the Runs screen.
"""

from __future__ import annotations

import argparse
import gc
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widget import Widget

from engine.store import Store
from ren_tui.backend import Backend
from ren_tui.keys import LeftField, binding_keys, is_text_field, key_name, main_widget

HELP = """\
# ren-tui

**Screens** — `1` Runs · `2` Compose · `3` Queue · `enter` on a run opens its Monitor ·
`x` its kept predictions with their pictures (`X` in the Monitor; `e` there shows the errors only) ·
`c` compares the marked runs · `f` in Compose opens Freeze.

**Everywhere** — `?` this help · `ctrl+p` command palette · `escape` leaves a field, closes a
dialog or goes back · `q` quit (runs go on: training happens in other processes; reopen `ren-tui`
to watch them again, on the screen you left, with your marks, sort and filter).

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
        """The keys of the screen below, then those of its own widgets (the chart's cursor, log scale and
        legend keys; the run table's j/k): a widget's keys act while it has focus, unless the screen passes
        them on (the Monitor does for its chart: they are listed with the screen's, once)."""
        below = self.app.screen_stack[-2] if len(self.app.screen_stack) > 1 else None
        if below is None:
            return ""
        seen: set[tuple[str, str]] = set()
        text = _key_table(f"**{type(below).__name__.removesuffix('Screen')}**", getattr(below, "BINDINGS", []), seen)
        for name, bindings in _widget_bindings(below):
            text += _key_table(f"**{name}** (while it has focus; `tab` moves the focus)", bindings, seen)
        return text


def _key_table(title: str, bindings: Iterable[Any], seen: set[tuple[str, str]]) -> str:
    """A help section: a markdown table of the described ``bindings`` not already in ``seen`` (key,
    description), each key by its human name (``←``, ``,``); "" when none is left."""
    rows = []
    for binding in bindings:
        if not (isinstance(binding, Binding) and binding.description):
            continue
        keys = " ".join(f"`{key_name(key.strip())}`" for key in dict.fromkeys(binding.key.split(",")))
        if (keys, binding.description) in seen:
            continue
        seen.add((keys, binding.description))
        rows.append(f"| {keys} | {binding.description}{': ' + binding.tooltip if binding.tooltip else ''} |")
    return f"\n{title}\n\n| key | action |\n|---|---|\n" + "\n".join(rows) + "\n" if rows else ""


def _widget_bindings(screen: Screen) -> list[tuple[str, list[Any]]]:
    """(a human name, its own bindings) of each ren-tui widget class on ``screen`` that declares keys
    (Textual's widgets keep theirs: arrows, page keys), once per class, in the order they appear."""
    found: dict[type, list[Any]] = {}
    for widget in screen.walk_children(Widget):
        for cls in type(widget).__mro__:
            if cls not in found and cls.__module__.startswith("ren_tui.") and "BINDINGS" in vars(cls):
                found[cls] = list(vars(cls)["BINDINGS"])
    return [(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", cls.__name__).capitalize(), bindings)
            for cls, bindings in found.items()]


def _runs_screen() -> Screen:
    from ren_tui.screens.runs import RunsScreen

    return RunsScreen()


def _compose_screen() -> Screen:
    from ren_tui.screens.compose import ComposeScreen

    return ComposeScreen()


def _queue_screen() -> Screen:
    from ren_tui.screens.queue import QueueScreen

    return QueueScreen()


FREEZE_HEAP_AFTER_S = 3.0  # after the warm-up imports: the screens made behind are done by then (see freeze_heap)
FREEZE_HEAP_AT_LATEST_S = 10.0  # freeze_heap's latest time, should warm-up never run
INSPECTOR_AT_LATEST_S = 3.0  # the model inspector starts this long after start-up if nothing started it before


class RenApp(App[None]):
    """The workbench. ``backend`` is the only way screens reach runs and the queue."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere (tests) get it too
    TITLE = "ren"
    MODES = {"runs": _runs_screen, "compose": _compose_screen, "queue": _queue_screen}
    DEFAULT_MODE = "runs"
    PREBUILT = ("queue", "compose")  # made behind the first screen after start-up (prebuild)
    # The one-character keys work where no text field has focus: a focused Input or TextArea takes
    # printable keys first, and Textual leaves the keys it takes out of the footer and out of a dialog's.
    # Escape leaves a text field (ren_tui.keys), so those keys are always one key away. 1-3 stay out of
    # the footer (the same on every screen: ? and the palette list them), so each screen's own keys fit.
    BINDINGS = [
        Binding("1", "screen('runs')", "Runs", show=False),
        Binding("2", "screen('compose')", "Compose", show=False),
        Binding("3", "screen('queue')", "Queue", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("escape", "leave_field", "Leave field", priority=True),
    ]

    def __init__(self, backend: Backend, *, prebuild: bool | None = None) -> None:
        # What this user's last session left (ren_tui.backend.Backend.tui_settings): the screen it was on,
        # and each screen's own section (Runs: marks, sort, filter). Read before the first screen is made.
        self.settings: dict[str, Any] = backend.tui_settings()
        backend.prefetch_runs()  # every screen shows runs: read them while Textual sets up
        if self.settings.get("screen") in self.MODES:
            self.DEFAULT_MODE = self.settings["screen"]
        self.MODES = {mode: partial(self._mode_screen, make) for mode, make in self.MODES.items()}
        super().__init__()
        self.backend = backend
        self.sub_title = str(backend.store.root)  # set before the first frame, which shows it
        # Make the Queue and Compose in the background once start-up is done (warm_up): by default where the
        # backend starts processes of its own, i.e. not in tests, which make them when they open them.
        self.prebuild_screens = backend.start_worker if prebuild is None else prebuild
        self._inspector_warming = False
        self._frozen = False  # freeze_heap done

    def _mode_screen(self, make: Callable[[], Screen]) -> Screen:
        """A mode's new screen, marked as styled by the CSS as it is now. Textual 8.2 (``App._init_mode``,
        ``App.switch_mode``) refreshes the whole app's CSS (reparses it and restyles every node of every
        screen: 0.1-0.6 s here, on each) when the screen switched to is not so marked, and marks it only if
        it was mounted when refreshed, which a new mode's screen is not: the first visit to Compose or
        Queue paid twice, the second once more. A screen mounted now is styled at mount by the stylesheet
        as it is, so the mark is true; a theme change still unmarks it and refreshes it on the next visit."""
        screen = make()
        if any(self._screen_stacks.values()):  # not the first screen: start-up styles that one, see on_mount
            self._mark_styled(screen)
        return screen

    def _mark_styled(self, screen: Screen) -> None:
        if hasattr(screen, "_css_update_count") and hasattr(self, "_css_update_count"):
            screen._css_update_count = self._css_update_count

    def on_mount(self) -> None:
        # The first screen was styled by start-up's CSS refresh before it was mounted, so Textual left it
        # unmarked too: mark it once it is up, or the first return to it restyles the whole app.
        self.call_after_refresh(lambda: self._mark_styled(self.screen))
        if self.current_mode != "runs":  # Runs starts it once it shows the runs (warm_up)
            self.call_after_refresh(self.warm_inspector)  # after the first paint: it imports torch, a core's work
        self.set_timer(INSPECTOR_AT_LATEST_S, self.warm_inspector)  # a store Runs cannot read, say
        self.set_timer(FREEZE_HEAP_AT_LATEST_S, self.freeze_heap)  # the same: the collector is not left off

    def warm_inspector(self) -> None:
        """Start Compose's model inspector with the app (it imports torch: seconds), so Compose answers at once;
        once: after the first paint, or on Runs once the runs are shown (before, its import would share this
        machine's cores with start-up)."""
        if not self._inspector_warming:
            self._inspector_warming = True
            self._warm_inspector()

    @work(thread=True, exclusive=True, group="inspector-warm-up")
    def _warm_inspector(self) -> None:
        self.backend.warm_inspector()

    def on_unmount(self) -> None:
        if self._frozen:
            gc.unfreeze()
        self.backend.close_inspector()  # the Compose screen's helper process, if it was started
        self.backend.flush_tui_settings()  # a change the writer thread has not saved yet

    def remember(self, **sections: Any) -> None:
        """Keep these settings (``screen=MODE``, or a screen's section) for the next launch: the file is
        written by a worker thread, the latest version last."""
        self.settings.update(sections)
        self.backend.remember_tui_settings(self.settings)
        self.save_settings()

    @work(thread=True, group="settings")
    def save_settings(self) -> None:
        self.backend.flush_tui_settings()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette (ctrl+p) offers the screens and every key action of the screen in front."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Runs", "Every run in the store (1)", partial(self.action_screen, "runs"))
        yield SystemCommand("Compose", "Build a run config, freeze layers, queue it (2)",
                            partial(self.action_screen, "compose"))
        yield SystemCommand("Queue", "Queued and running runs, GPUs (3)", partial(self.action_screen, "queue"))
        yield SystemCommand("Help", "Keys and screens (?)", self.action_help)
        for binding in getattr(screen, "BINDINGS", []):
            if isinstance(binding, Binding) and binding.description:
                yield SystemCommand(binding.description, f"{type(screen).__name__.removesuffix('Screen')}: "
                                    f"key {binding_keys(binding)}", partial(screen.run_action, binding.action))

    @work(thread=True, exclusive=True, group="warm-up")
    def warm_up(self) -> None:
        """Import the other screens in the background once the Runs screen is up, so that opening
        one does not pay for its imports: the chart screens', and Compose's and the Queue's config
        schema (pydantic builds it at import: a few tenths of a second). The model inspector starts
        now too, if it has not."""
        self.call_from_thread(self.warm_inspector)
        import engine.jobs.api  # noqa: F401 - the Queue's first read
        import ren_tui.screens.compare  # noqa: F401
        import ren_tui.screens.compose  # noqa: F401
        import ren_tui.screens.monitor  # noqa: F401
        import ren_tui.screens.queue  # noqa: F401

        if self.prebuild_screens:
            for mode in self.PREBUILT:
                self.call_from_thread(self.prebuild, mode)
            self.call_from_thread(self.set_timer, FREEZE_HEAP_AFTER_S, self.freeze_heap)

    def freeze_heap(self) -> None:
        """Collect garbage once, then move every object left (the screens, the runs, the imported modules:
        most of the heap, and long-lived) out of the cyclic collector's sight (``gc.freeze``). A full
        collection then looks only at what was made since: one took 0.2 s of the UI thread here before,
        at whatever moment an allocation burst (a series read, a screen made) set it off. What start-up
        made and later drops is freed by reference counting, unless it is in a cycle (widgets removed
        later, a few): those stay. Done once start-up is over (warm-up, the screens made behind), or
        FREEZE_HEAP_AT_LATEST_S after mount whatever happened; undone when the app ends. The collector is
        then on, whether or not start-up had it off."""
        if not self._frozen:
            gc.collect()
            gc.freeze()
            self._frozen = True
        gc.enable()  # off from the start when launched as ren-tui (ren_tui.__main__)

    def prebuild(self, mode: str) -> None:
        """Make ``mode``'s screen now, behind the one in front, unless it exists, so that its first opening is
        a plain switch: the Queue's ~30 widgets at once, Compose's form a few rows at a time (see
        ComposeScreen.compose). Uses Textual's own mode set-up (``App._init_mode``, as ``switch_mode``
        does); without it, nothing."""
        init_mode = getattr(self, "_init_mode", None)
        stacks = getattr(self, "_screen_stacks", None)
        if init_mode is None or not isinstance(stacks, dict) or stacks.get(mode) or mode == self.current_mode:
            return
        init_mode(mode)

    def typing_in(self) -> Widget | None:
        """The text field of a full screen that has focus (dialogs keep their own keys), or None."""
        if isinstance(self.screen, ModalScreen):
            return None
        return self.focused if is_text_field(self.focused) else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Escape leaves a field only while one has focus (elsewhere it is the screen's: back, clear)."""
        if action == "leave_field":
            return self.typing_in() is not None
        return True

    def action_screen(self, mode: str) -> None:
        """Switch to a screen (1-3, or the palette); the next launch opens on it."""
        self.switch_mode(mode)
        if self.settings.get("screen") != mode:
            self.remember(screen=mode)

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

    def open_examples(self, run_id: str) -> None:
        """The run's kept predictions with their pictures (``ren eval task RUN --examples N``)."""
        from ren_tui.screens.examples import ExamplesScreen

        self.push_screen(ExamplesScreen(run_id))

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
