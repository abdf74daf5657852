"""ren-tui: the app shell and the Runs screen, against canned runs in a real store."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Input, Static

from engine.store import Store
from ren_tui.app import HelpScreen, RenApp
from ren_tui.backend import Backend
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.screens.runs import RunsScreen

from .tui_fake import canned_run


def make(ren_home: Path) -> RenApp:
    return RenApp(Backend(Store(ren_home), start_worker=False))


def table(app: RenApp) -> DataTable:
    return app.screen.query_one("#runs", DataTable)


def names(app: RenApp) -> list[str]:
    t = table(app)
    return [str(t.get_cell(key, "name")) for key in t.rows]


async def settle(app: RenApp, pilot) -> None:
    """The workers done, and a Compose in front with its whole form mounted (it mounts a batch at a time)."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    while not getattr(app.screen, "built", True):
        await pilot.pause(0.02)
    await app.workers.wait_for_complete()
    await pilot.pause()


async def test_runs_table_shows_the_store_live(ren_home: Path) -> None:
    store = Store(ren_home)
    first = canned_run(store, "alpha", status="running", steps=100, written=30)
    app = make(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, RunsScreen) and names(app) == ["alpha"]
        assert table(app).get_cell(first.id, "progress") == "30/100  30%"
        store.update_run(first.id, step=70, loss_trace=(3.0, 2.0, 1.0))
        canned_run(store, "beta", status="finished")
        app.screen.refresh_runs()
        await settle(app, pilot)
        assert sorted(names(app)) == ["alpha", "beta"]
        assert table(app).get_cell(first.id, "progress") == "70/100  70%"
        assert table(app).get_cell(first.id, "loss") == "█▅▁"


async def test_filter_sort_group_and_archive(ren_home: Path) -> None:
    store = Store(ren_home)
    canned_run(store, "vit-frozen", tags=("study:freeze",))
    canned_run(store, "bert-base", tags=("study:init",))
    canned_run(store, "vit-full", tags=("study:freeze",))
    app = make(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(app, pilot)
        assert names(app) == ["vit-full", "bert-base", "vit-frozen"]  # newest first
        await pilot.press("s")  # by name
        assert names(app) == ["bert-base", "vit-frozen", "vit-full"]
        await pilot.press("g")
        assert names(app) == ["freeze / vit-frozen", "freeze / vit-full", "init / bert-base"]
        await pilot.press("slash")
        await pilot.press(*"vit")
        assert app.screen.query_one("#filter", Input).has_focus
        assert names(app) == ["freeze / vit-frozen", "freeze / vit-full"]
        await pilot.press("enter", "a")  # the cursor stayed on its run through sorting: vit-full
        assert names(app) == ["freeze / vit-frozen"]
        assert "archived" in store.list_runs()[0].tags and store.list_runs()[0].name == "vit-full"
        await pilot.press("A")
        assert len(names(app)) == 2
        await pilot.press("escape")
        assert len(names(app)) == 3


async def test_mark_compare_tag_and_delete(ren_home: Path) -> None:
    store = Store(ren_home)
    a, b = canned_run(store, "a"), canned_run(store, "b")
    app = make(ren_home)
    opened: list[list[str]] = []
    app.open_compare = opened.append
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("c")  # nothing marked: a warning, nothing opens
        assert opened == []
        await pilot.press("space", "space", "c")
        assert opened == [[b.id, a.id]]
        await pilot.press("U", "t")  # no marks: the run under the cursor (the last row, a)
        assert isinstance(app.screen, Prompt)
        await pilot.press("ctrl+a", "ctrl+k", *"study:x, lr", "enter")
        assert store.get_run(a.id).tags == ("study:x", "lr") and store.get_run(b.id).tags == ()
        await pilot.press("d")
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")
        assert len(store.list_runs()) == 2
        await pilot.press("d", "y")
        assert [r.id for r in store.list_runs()] == [b.id]
        assert names(app) == ["b"]


async def test_empty_store_says_how_to_start_and_help_opens(ren_home: Path) -> None:
    app = make(ren_home)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert "ren run presets/quickstart.toml" in str(app.screen.query_one("#status", Static).render())
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


def test_screens_are_styled_by_the_app_stylesheet_not_default_css() -> None:
    """Screen layout lives in app.tcss, one section per screen (Textual keeps DEFAULT_CSS for
    reusable widgets and the dialogs); any app built on RenApp, a test's subclass included, loads it.
    Every module of ren_tui/screens is checked (found, not listed: a new screen is covered), and the app's help."""
    import importlib
    import pkgutil

    from textual.screen import Screen

    import ren_tui.screens

    stylesheet = Path(RenApp.CSS_PATH)
    assert stylesheet.is_absolute() and stylesheet.name == "app.tcss"
    css = stylesheet.read_text()
    names = sorted(m.name for m in pkgutil.iter_modules(ren_tui.screens.__path__))
    assert {"runs", "compose", "queue", "monitor", "compare", "freeze", "log"} <= set(names), names
    for module_name in [f"ren_tui.screens.{name}" for name in names] + ["ren_tui.app"]:
        module = importlib.import_module(module_name)
        screens = [c for c in vars(module).values()
                   if isinstance(c, type) and issubclass(c, Screen) and c.__module__ == module.__name__]
        assert screens, module_name
        for screen in screens:
            assert "DEFAULT_CSS" not in vars(screen), screen
            assert f"\n{screen.__name__} " in css, screen


def test_runs_screen_snapshot(snap_compare, ren_home: Path, monkeypatch) -> None:
    names_ = iter(f"20261128-120000-run-{i:04d}" for i in range(100))
    monkeypatch.setattr("engine.store._new_run_id", lambda name, created_at: next(names_))
    store = Store(ren_home)
    canned_run(store, "electra-deit-frozen", tags=("study:freeze",), seed=1)
    canned_run(store, "electra-deit-full", tags=("study:freeze",), seed=2)
    running = canned_run(store, "deit-one-tower", status="running", steps=400, written=120, kind="one_tower")
    store.update_run(running.id, loss_trace=(4.0, 3.1, 2.5, 2.2, 1.9, 1.8), started_at=None, device="NVIDIA H100")
    app = make(ren_home)

    async def ready(pilot) -> None:
        app.sub_title = "~/.local/share/ren"
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=(110, 24), run_before=ready)


async def test_command_palette_offers_screens_and_screen_actions(ren_home: Path) -> None:
    store = Store(ren_home)
    canned_run(store, "a")
    canned_run(store, "b")
    app = make(ren_home)
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(app, pilot)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Runs", "Compose", "Queue", "Help", "Sort", "Group by study"} <= set(titles)
        sort = next(c for c in app.get_system_commands(app.screen) if c.title == "Sort")
        await sort.callback()
        await pilot.pause()
        assert app.screen.view.sort == "name"


async def test_a_damaged_index_is_named_on_the_status_line_and_the_screen_recovers(ren_home: Path) -> None:
    """An index.json that holds ``[]`` stops no screen: the status line names the file, the table keeps the
    runs it had, and the next read after the index is repaired shows the store again."""
    store = Store(ren_home)
    canned_run(store, "alpha", status="finished")
    index = ren_home / "index.json"
    good = index.read_text()
    app = make(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(app, pilot)
        assert names(app) == ["alpha"]
        index.write_text("[]")
        app.screen.refresh_runs()
        await settle(app, pilot)
        status = str(app.screen.query_one("#status", Static).render())
        assert status.startswith("cannot read the store") and str(index) in status
        assert names(app) == ["alpha"] and app.is_running
        index.write_text(good)
        app.screen.refresh_runs()
        await settle(app, pilot)
        assert str(app.screen.query_one("#status", Static).render()).startswith("1 of 1 runs")


# --- keys and focus (issue 17) ------------------------------------------------------


class QuietInspector:
    """A model inspector that answers nothing: the Compose form works without it."""

    def start(self) -> str | None:
        return None

    def inspect(self, config: dict) -> dict:
        return {"id": None, "ok": False, "error": "not inspected", "key": None}

    def close(self) -> None:
        pass


async def test_escape_leaves_a_compose_field_and_the_screen_keys_then_switch(ren_home: Path) -> None:
    """In a field, 1-3 type digits (fusion layers 2 must not become 23 by a screen key): escape leaves the field,
    the Compose screen stays, and 3 then opens the Queue without touching the field."""
    from ren_tui.screens.compose import ComposeScreen, wid
    from ren_tui.screens.queue import QueueScreen

    app = make(ren_home)
    app.backend.inspector = QuietInspector()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        await settle(app, pilot)
        compose = app.screen
        assert isinstance(compose, ComposeScreen)
        layers = compose.query_one("#" + wid("model.fusion.layers"), Input)
        layers.focus()
        await pilot.pause()
        before = layers.value
        await pilot.press("escape")
        assert app.screen is compose and app.focused is not layers
        assert not isinstance(app.focused, Input)
        await pilot.press("3")
        assert isinstance(app.screen, QueueScreen)
        assert layers.value == before


async def test_escape_on_compose_opened_with_2_goes_back_to_runs(ren_home: Path) -> None:
    """Compose opened with 2 is the only screen of its mode: escape (with no field focused), which the
    footer offers as Back, goes to Runs as it does from a Compose opened on a run; 2 finds the form as left."""
    from ren_tui.screens.compose import ComposeScreen, wid

    app = make(ren_home)
    app.backend.inspector = QuietInspector()
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("2")
        await settle(app, pilot)
        compose = app.screen
        assert isinstance(compose, ComposeScreen) and len(app.screen_stack) == 1
        name = compose.query_one("#" + wid("run.name"), Input)
        name.value = "kept"
        compose.query_one("#form").focus()
        await pilot.pause()
        assert "escape" in {b.binding.key for b in app.active_bindings.values() if b.enabled}
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen) and app.current_mode == "runs"
        assert app.settings["screen"] == "runs"  # the next launch opens on Runs too
        await pilot.press("2")
        assert app.screen is compose and name.value == "kept"


async def test_help_lists_the_chart_keys_of_compare_and_the_monitor_by_their_names(ren_home: Path) -> None:
    """? lists the keys of the screen in front and of its widgets (the chart's cursor, log scale and legend
    keys, which Compare's chart takes while it has focus), each as it is typed: no "full_stop" or "comma"."""
    from textual.widgets import Markdown

    store = Store(ren_home)
    a, b = canned_run(store, "a"), canned_run(store, "b")
    app = make(ren_home)
    chart_rows = ["| `←` `,` | Cursor left |", "| `→` `.` | Cursor right |", "| `shift+←` | Cursor ten left |",
                  "| `home` | Cursor to the first point |", "| `l` | Log y |", "| `↑` | Previous series |",
                  "| `↓` | Next series |", "| `space` | Show/hide series |"]
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        for screen, open_screen in (("Compare", lambda: app.open_compare([a.id, b.id])),
                                    ("Monitor", lambda: app.open_monitor(a.id))):
            open_screen()
            await settle(app, pilot)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = app.screen.query_one(Markdown).source
            assert f"**{screen}**" in text and "| `[` | ◂ Window |" in text and "| `x` | X axis |" in text
            for row in chart_rows:
                assert text.count(row) == 1, (screen, row, text)
            assert not any(raw in text for raw in ("`full_stop`", "`comma`", "`left_square_bracket`", "`left`"))
            await pilot.press("escape", "escape")  # the help, then the screen
            assert isinstance(app.screen, RunsScreen)


async def test_home_and_end_go_to_the_first_and_last_run(ren_home: Path) -> None:
    store = Store(ren_home)
    for i in range(30):
        canned_run(store, f"run-{i:02d}", steps=10)
    app = make(ren_home)
    async with app.run_test(size=(120, 24)) as pilot:
        await settle(app, pilot)
        t = table(app)
        await pilot.press("end")
        assert t.cursor_row == t.row_count - 1 and names(app)[t.cursor_row] == "run-00"
        await pilot.press("k", "k")
        assert t.cursor_row == t.row_count - 3
        await pilot.press("home")
        assert t.cursor_row == 0 and t.scroll_y == 0
        await pilot.press("j")
        assert t.cursor_row == 1


def screen_text(app: RenApp) -> str:
    """The screen as a person reads it: its characters, line by line, without styles."""
    import io

    from rich.console import Console

    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), record=True,
                      color_system=None, force_terminal=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, simplify=True))
    return console.export_text(styles=False)


async def test_dialogs_wrap_their_text_and_size_to_it(ren_home: Path) -> None:
    """A confirm names a long run id in full ("Delete run … with its m" was cut at the dialog's edge), and a
    short question gets a small dialog."""
    long = "Delete run 20261128-155245-electra-deit-pretrain-4f4e with its metrics and checkpoints?"
    app = make(ren_home)
    async with app.run_test(size=(80, 24)) as pilot:
        for question in (long, "Delete 3 runs?"):
            app.push_screen(Confirm(question))
            await pilot.pause()
            shown = " ".join(line.strip(" █▌▐") for line in screen_text(app).splitlines()
                             if "█" in line and line.strip(" █▌▐▀▄"))
            assert " ".join(question.split()) in " ".join(shown.split()), shown
            box = app.screen.query_one("Vertical")
            assert box.outer_size.width <= 80 and (question == long) == (box.outer_size.width > 50)
            await pilot.press("n")
        app.push_screen(Prompt("Tags of " + long, "a, b"))
        await pilot.pause()
        assert " ".join(("Tags of " + long).split()) in " ".join(screen_text(app).replace("█", " ").split())
