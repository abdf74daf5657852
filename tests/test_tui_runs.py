"""The Runs screen as k9s, lazygit and htop users drive it (issue 17): actions on the marked runs,
archived rows, the filter's status:/tag:/name: terms, sorting by any column, runs cancelled before
they started, and a view that survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from engine.jobs import api as Q
from engine.store import Store
from ren_tui.app import HelpScreen, RenApp
from ren_tui.backend import Backend
from ren_tui.dialogs import Confirm, Prompt
from ren_tui.screens.queue import QueueScreen
from ren_tui.screens.runs import RunsScreen, matches, parse_filter, sort_runs

from .tui_fake import canned_run

PRESET = Path(__file__).resolve().parent / "fixtures" / "one_tower.toml"


def launch(home: Path) -> RenApp:
    return RenApp(Backend(Store(home), start_worker=False))


async def ready(app: RenApp, pilot: Pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()


def shown(app: RenApp) -> list[str]:
    """The run names in the table, top to bottom (markup stripped)."""
    t = app.screen.query_one("#runs", DataTable)
    return [Text.from_markup(str(t.get_cell(key, "name"))).plain for key in t.rows]


def status_line(app: RenApp) -> str:
    return str(app.screen.query_one("#status", Static).render())


def notices(app: RenApp, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(app, "notify", lambda message, **kw: seen.append(str(message)))
    return seen


# --- actions on the marked runs -------------------------------------------------------


async def test_archive_tag_and_delete_apply_to_the_marked_runs(ren_home: Path) -> None:
    """With marks, a, t and d act on the marked runs, not the cursor's; the confirm says how many."""
    store = Store(ren_home)
    c, b, a = (canned_run(store, n) for n in ("c", "b", "a"))  # newest first: a, b, c
    store.update_run(b.id, tags=("lr",))
    app = launch(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(app, pilot)
        assert shown(app) == ["a", "b", "c"]
        await pilot.press("space", "space")  # a and b marked, the cursor on c
        await pilot.press("t")
        assert isinstance(app.screen, Prompt) and app.screen.query_one(Input).value == ""  # no tag shared by both
        await pilot.press(*"study:x", "enter")
        assert store.get_run(a.id).tags == ("study:x",) and store.get_run(b.id).tags == ("lr", "study:x")
        assert store.get_run(c.id).tags == ()
        await pilot.press("a")
        assert shown(app) == ["c"]
        assert [r.name for r in store.list_runs() if "archived" in r.tags] == ["b", "a"] or \
            sorted(r.name for r in store.list_runs() if "archived" in r.tags) == ["a", "b"]
        await pilot.press("A", "d")  # archived shown; still marked: both are asked about
        assert isinstance(app.screen, Confirm)
        assert "Delete 2 runs with their metrics and checkpoints? a, b" in str(app.screen.question)
        await pilot.press("y")
        await ready(app, pilot)
        assert [r.name for r in store.list_runs()] == ["c"] and shown(app) == ["c"]
        assert "marked" not in status_line(app)


async def test_R_queues_the_marked_failed_runs_again_and_says_what_each_does(ren_home: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    done = canned_run(store, "done")
    never = Q.add(store, PRESET, name="never", gpus=1, start_worker=False)[-1]
    Q.cancel(store, never.id)
    broken = canned_run(store, "broken", status="failed")
    app = launch(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await ready(app, pilot)
        await pilot.press("H")  # the never-started run shows
        assert shown(app) == ["broken", "never", "done"]
        await pilot.press("space", "space", "space", "R")
        await ready(app, pilot)
        assert store.get_run(broken.id).status == "queued" and store.get_run(never.id).status == "queued"
        assert store.get_run(done.id).status == "finished"
        assert seen[-1] == ("queued 2 runs again: 0 resume from their last checkpoint, 2 start over "
                            "(1 skipped: only failed, cancelled or crashed runs are queued again)")


async def test_compare_and_clone_follow_the_marks(ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    for name in ("x", "y", "z"):
        canned_run(store, name)
    app = launch(ren_home)
    compared: list[list[str]] = []
    cloned: list[dict] = []
    app.open_compare = compared.append
    app.clone_to_compose = cloned.append
    async with app.run_test(size=(140, 40)) as pilot:
        seen = notices(app, monkeypatch)
        await ready(app, pilot)
        await pilot.press("space", "down", "space", "e")  # two marked: Compose takes one
        assert cloned == [] and "Compose edits one run's config" in seen[-1]
        await pilot.press("c")
        assert [len(ids) for ids in compared] == [2]
        await pilot.press("U", "e")
        assert len(cloned) == 1


# --- how rows look ----------------------------------------------------------------------


async def test_archived_rows_are_dimmed_and_say_archived(ren_home: Path) -> None:
    store = Store(ren_home)
    old = canned_run(store, "old", tags=("archived", "lr"))
    canned_run(store, "live")
    app = launch(ren_home)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(app, pilot)
        assert shown(app) == ["live"]
        await pilot.press("A")
        assert shown(app) == ["live", "old (archived)"]  # words, so NO_COLOR shows it too
        t = app.screen.query_one("#runs", DataTable)
        for column in ("name", "status", "time"):
            styled = Text.from_markup(str(t.get_cell(old.id, column)))
            assert all("dim" in str(span.style) for span in styled.spans) and styled.spans, column
        live = next(key for key in t.rows if key.value != old.id)
        assert not Text.from_markup(str(t.get_cell(live, "name"))).spans
        await pilot.press("down")
        assert "tags: lr  archived" in str(app.screen.query_one("#detail", Static).render())


# --- filter -------------------------------------------------------------------------------


def test_filter_terms() -> None:
    query = parse_filter('status:failed,crash tag:study: name:"vit b" -tag:lr deit')
    assert query.status == ["failed", "crash"] and query.tag == ["study:"] and query.name == ["vit b"]
    assert query.exclude == [("tag", "lr")] and query.words == ["deit"]
    assert parse_filter("study:freeze").words == ["study:freeze"]  # not a filter key: a plain word
    assert parse_filter('name:"open').name == ['"open']  # an open quote while typing


async def test_filter_understands_status_tag_and_name_and_plain_words(ren_home: Path) -> None:
    store = Store(ren_home)
    canned_run(store, "vit-frozen", status="failed", tags=("study:freeze",))
    noted = canned_run(store, "bert-base", tags=("lr",))
    store.update_run(noted.id, notes="baseline for the sweep")
    canned_run(store, "vit-full", status="crashed", tags=("study:freeze", "lr"))
    app = launch(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(app, pilot)
        box = app.screen.query_one("#filter", Input)

        async def filtered(text: str) -> list[str]:
            box.value = text
            await pilot.pause()
            return shown(app)

        await pilot.press("slash")
        assert await filtered("status:failed") == ["vit-frozen"]
        assert await filtered("status:failed status:crashed") == ["vit-full", "vit-frozen"]
        assert await filtered("status:fin") == ["bert-base"]
        assert await filtered("tag:study:") == ["vit-full", "vit-frozen"]
        assert await filtered("tag:study:freeze tag:lr") == ["vit-full"]
        assert await filtered("-tag:lr") == ["vit-frozen"]
        assert await filtered("name:bert") == ["bert-base"]
        assert await filtered("sweep") == ["bert-base"]  # notes
        assert await filtered("vit frozen") == ["vit-frozen"]
        assert "filter 'vit frozen'" in status_line(app)
        await pilot.press("escape")  # leaves the field and clears the filter
        assert shown(app) == ["vit-full", "bert-base", "vit-frozen"] and not box.has_focus
        assert app.focused is app.screen.query_one("#runs", DataTable)


async def test_tags_show_in_the_detail_line_at_any_width(ren_home: Path) -> None:
    store = Store(ren_home)
    canned_run(store, "tagged", tags=("study:freeze", "lr"))
    app = launch(ren_home)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        assert "tags" not in app.screen.columns  # no room for the column
        assert "tags: study:freeze, lr" in str(app.screen.query_one("#detail", Static).render())


# --- sort -----------------------------------------------------------------------------------


def test_runs_without_a_value_sort_last_both_ways(ren_home: Path) -> None:
    store = Store(ren_home)
    a = store.update_run(canned_run(store, "a").id, loss_trace=(2.0, 1.0))
    b = store.update_run(canned_run(store, "b").id, loss_trace=(2.0, 0.5))
    none = store.update_run(canned_run(store, "none").id, loss_trace=())
    assert [r.name for r in sort_runs([a, none, b], "loss")] == ["b", "a", "none"]
    assert [r.name for r in sort_runs([a, none, b], "loss", reverse=True)] == ["a", "b", "none"]


async def test_s_sorts_by_each_column_in_turn_and_S_reverses(ren_home: Path) -> None:
    store = Store(ren_home)
    small = canned_run(store, "small", steps=100)
    store.update_run(small.id, step=20, loss_trace=(3.0, 0.2))
    big = canned_run(store, "big", steps=100)
    store.update_run(big.id, step=90, loss_trace=(3.0, 0.9))
    app = launch(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(app, pilot)
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        seen = []
        for _ in range(len(screen.columns)):
            await pilot.press("s")
            seen.append(screen.view.sort)
        assert seen == ["name", "kind", "status", "progress", "loss", "best", "time", "device", "tags", "created"]
        while screen.view.sort != "progress":
            await pilot.press("s")
        assert shown(app) == ["big", "small"] and "sorted by progress ▼" in status_line(app)
        header = screen.query_one("#runs", DataTable).columns["progress"].label.plain
        assert header == "progress ▼"
        await pilot.press("S")
        assert shown(app) == ["small", "big"] and "sorted by progress ▲" in status_line(app)
        await pilot.press("s")  # loss: smallest first
        assert screen.view.sort == "loss" and shown(app) == ["small", "big"]


# --- runs cancelled before they started -------------------------------------------------


async def test_runs_cancelled_while_queued_are_hidden_until_H(ren_home: Path) -> None:
    store = Store(ren_home)
    canned_run(store, "trained")
    for name in ("oops-1", "oops-2"):
        Q.cancel(store, Q.add(store, PRESET, name=name, gpus=1, start_worker=False)[-1].id)
    stopped = canned_run(store, "stopped-midway", status="cancelled")  # it trained: it stays
    app = launch(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(app, pilot)
        assert shown(app) == ["stopped-midway", "trained"]
        assert "2 never started hidden (H)" in status_line(app)
        await pilot.press("H")
        assert sorted(shown(app)) == ["oops-1", "oops-2", "stopped-midway", "trained"]
        assert "never started" not in status_line(app)
        assert store.get_run(stopped.id).status == "cancelled"


# --- kept between launches --------------------------------------------------------------


async def test_marks_sort_filter_and_the_screen_are_kept_between_launches(ren_home: Path) -> None:
    store = Store(ren_home)
    runs = [canned_run(store, name) for name in ("alpha", "beta", "gamma", "delta")]
    app = launch(ren_home)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("space", "space", "s", "S", "A", "slash", *"a", "enter")
        marked = set(app.screen.marked)
        assert len(marked) == 2
        await pilot.press("3")
        assert isinstance(app.screen, QueueScreen)
    again = launch(ren_home)
    async with again.run_test(size=(140, 40)) as pilot:
        await ready(again, pilot)
        assert isinstance(again.screen, QueueScreen)  # where the last session was
        await pilot.press("1")
        await ready(again, pilot)
        screen = again.screen
        assert screen.marked == marked and marked <= {r.id for r in runs}
        assert (screen.view.sort, screen.view.reverse, screen.view.archived) == ("name", True, True)
        assert screen.view.filter == "a" and screen.query_one("#filter", Input).value == "a"
        assert shown(again) == ["gamma", "delta", "beta", "alpha"]
        assert "2 marked" in status_line(again)


# --- keys ---------------------------------------------------------------------------------


async def test_footer_at_120_columns_shows_enter_notes_help_and_quit(ren_home: Path) -> None:
    from textual.widgets._footer import FooterKey

    canned_run(Store(ren_home), "a")
    app = launch(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        footer = app.screen.query_one("Footer")
        visible = {k.key for k in footer.query(FooterKey) if k.region.right <= footer.region.right - 12}
        assert {"enter", "n", "question_mark", "q"} <= visible, visible


async def test_help_names_keys_as_they_are_typed(ren_home: Path) -> None:
    app = launch(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        from textual.widgets import Markdown

        text = app.screen.query_one(Markdown).source
        for name in ("`/`", "`space`", "`enter`", "`S`", "`H`"):
            assert f"| {name} |" in text, name
        for raw in ("slash", "question_mark", "left_square_bracket"):
            assert raw not in text


async def test_in_the_filter_the_one_key_commands_type_and_leave_the_footer(ren_home: Path) -> None:
    """The design the escape key completes: in a field the one-key commands type (Textual gives printable
    keys to the Input first and leaves them out of the footer), enter submits the filter rather than
    opening a run, and escape gives the keys back."""
    canned_run(Store(ren_home), "a")
    app = launch(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("slash", "q", "1", "slash", "3")
        assert app.is_running and isinstance(app.screen, RunsScreen)
        assert app.screen.query_one("#filter", Input).value == "q1/3"
        footer_keys = set(app.screen.active_bindings)
        assert not {"q", "1", "3", "question_mark", "s", "d"} & footer_keys and "escape" in footer_keys
        await pilot.press("enter")  # submits the filter, opens nothing
        assert isinstance(app.screen, RunsScreen) and app.screen.view.filter == "q1/3"
        await pilot.press("slash", "escape")
        assert {"q", "question_mark", "s"} <= set(app.screen.active_bindings)
        await pilot.press("3")
        assert isinstance(app.screen, QueueScreen)


async def test_screen_keys_do_nothing_behind_a_dialog(ren_home: Path) -> None:
    """A dialog's keys are its own: 3 and ? neither switch the screen behind it nor open help over it."""
    canned_run(Store(ren_home), "a")
    app = launch(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("d")
        assert isinstance(app.screen, Confirm)
        await pilot.press("3", "question_mark")
        assert isinstance(app.screen, Confirm) and app.current_mode == "runs"
        await pilot.press("n")
        assert isinstance(app.screen, RunsScreen)


def test_matches_plain_words_in_name_id_and_notes(ren_home: Path) -> None:
    store = Store(ren_home)
    r = store.update_run(canned_run(store, "deit-small").id, notes="the Baseline")
    assert matches(r, "deit baseline") and matches(r, r.id[:8]) and not matches(r, "vit")


async def test_keys_typed_right_after_slash_go_into_the_filter(ren_home: Path) -> None:
    """Over SSH keys arrive in bursts: "/bert" typed fast lost its "b" (focus moved after the burst)."""
    from textual import events

    canned_run(Store(ren_home), "bert-base")
    canned_run(Store(ren_home), "vit")
    app = launch(ren_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        for key, character in (("slash", "/"), ("b", "b"), ("e", "e")):
            app.post_message(events.Key(key, character))
        await pilot.pause()
        assert app.screen.query_one("#filter", Input).value == "be" and shown(app) == ["bert-base"]


# --- drawing --------------------------------------------------------------------------------


async def test_the_runs_table_draws_each_cell_as_datatable_does(ren_home: Path) -> None:
    """RunTable draws one-line body cells its own faster way; every visible cell (archived, marked, a long
    name cut by a narrow column, under the cursor or not, zebra rows) must come out character for character
    and style for style as DataTable's own drawing."""
    store = Store(ren_home)
    canned_run(store, "old", tags=("archived", "lr"))
    canned_run(store, "a-very-long-run-name-" * 3, status="failed")
    canned_run(store, "live", status="running", written=40)
    for i in range(6):
        canned_run(store, f"r{i} ✓ [b]not markup[/b]", seed=i)
    app = launch(ren_home)
    async with app.run_test(size=(150, 30)) as pilot:
        await ready(app, pilot)
        await pilot.press("A", "space", "down", "down", "space")
        await pilot.pause()
        table = app.screen.query_one("#runs", DataTable)
        table.columns[next(iter(k for k in table.columns if k.value == "name"))].width = 9  # crops the names

        def chars(lines: list) -> list:
            return [[(ch, segment.style) for segment in line for ch in segment.text] for line in lines]

        compared = 0
        for row in range(table.row_count):
            for column_index, column in enumerate(table.ordered_columns):
                for cursor, hover in ((False, False), (True, False), (False, True)):
                    style = table._get_row_style(row, table.rich_style)
                    width = column.get_render_width(table)
                    table._cell_render_cache.clear()
                    ours = table._render_cell(row, column_index, style, width, cursor, hover)
                    table._cell_render_cache.clear()
                    theirs = DataTable._render_cell(table, row, column_index, style, width, cursor, hover)
                    assert chars(ours) == chars(theirs), (row, column.key.value, cursor, hover)
                    compared += 1
        assert compared == table.row_count * len(table.ordered_columns) * 3 >= 9 * 10 * 3
