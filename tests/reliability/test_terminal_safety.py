"""Terminal safety (issue 15): a run's name, notes, tags and error come from users and files; printed raw,
their control characters (an ANSI sequence that clears the screen, a carriage return that overwrites the
line, a bell) would act on the terminal of whoever looks, over SSH too, and markup in them would restyle
the output. `ren show`, `ren runs` and the TUI show them escaped, as written."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from engine.store import Store
from tests.helpers.cli import cli_streams

EVIL = "evil\x1b[2J\r\x07[red]x[/red]\u202e"
SHOWN = "evil\\x1b[2J\\r\\x07[red]x[/red]\\u202e"  # every control character visible, the markup literal
RAW = ("\x1b", "\r", "\x07", "\u202e")


def _evil_run(store: Store, **fields: object):
    record = store.create_run(name=EVIL, stage="finetune", kind="one_tower", config={}, tags=[f"tag {EVIL}"],
                              notes=f"note {EVIL}\nsecond line")
    return store.update_run(record.id, status="failed", error=f"Boom: {EVIL}", log_tail=f"log {EVIL}\nlast",
                            device=f"cpu {EVIL}", **fields)


@pytest.fixture
def plain_console(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What `ren` writes, wide enough for every column and without styling: any escape in it came from a run."""
    out = io.StringIO()
    monkeypatch.setattr("engine.cli.commands.console", Console(file=out, width=200, color_system=None))
    return out


def _assert_safe(text: str) -> None:
    for char in RAW:
        assert char not in text, (char, text)


def test_show_prints_names_notes_tags_and_errors_escaped(ren_home: Path, plain_console: io.StringIO,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    record = _evil_run(Store(ren_home))
    code, _, err = cli_streams(["show", record.id], monkeypatch, capsys)
    out = plain_console.getvalue()
    assert code == 0, err
    _assert_safe(out)
    assert f"{record.id}  {SHOWN}  finetune/one_tower" in out
    assert f"tags: tag {SHOWN}" in out
    assert f"notes: note {SHOWN}\nsecond line" in out  # a note keeps its lines
    assert f"error: Boom: {SHOWN}" in out
    assert f"log {SHOWN}\nlast" in out
    assert f"device cpu {SHOWN}" in out


def test_runs_lists_names_escaped(ren_home: Path, plain_console: io.StringIO, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    record = _evil_run(Store(ren_home))
    code, _, err = cli_streams(["runs"], monkeypatch, capsys)
    out = plain_console.getvalue()
    assert code == 0, err
    _assert_safe(out)
    row = next(line for line in out.splitlines() if line.startswith(record.id))
    assert SHOWN in row and "failed" in row


async def test_the_runs_screen_shows_names_notes_tags_and_errors_escaped(ren_home: Path) -> None:
    from textual.widgets import DataTable, Static

    from ren_tui.app import RenApp
    from ren_tui.backend import Backend

    record = _evil_run(Store(ren_home))
    app = RenApp(Backend(Store(ren_home), start_worker=False))
    async with app.run_test(size=(160, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one("#runs", DataTable)
        cells = {column: table.get_cell(record.id, column) for column in ("name", "tags", "device")}
        shown = {column: Text.from_markup(value).plain for column, value in cells.items()}  # as DataTable draws
        assert shown == {"name": SHOWN, "tags": f"tag {SHOWN}", "device": f"cpu {SHOWN}"}
        detail = str(app.screen.query_one("#detail", Static).render())
        _assert_safe(detail)
        assert f"notes: note {SHOWN}" in detail and f"error: Boom: {SHOWN}" in detail


def test_the_queue_and_compare_screens_show_names_and_errors_escaped(ren_home: Path) -> None:
    from textual.content import Content

    from ren_tui.screens.compare import run_labels
    from ren_tui.screens.queue import detail, queued_cells, recent_cells, running_cells

    record = _evil_run(Store(ren_home))
    for cells in (running_cells(record), queued_cells(1, record, f"waits for {EVIL}"), recent_cells(record)):
        for cell in cells:
            _assert_safe(Text.from_markup(cell).plain)
    assert Text.from_markup(recent_cells(record)[0]).plain == SHOWN
    assert Text.from_markup(recent_cells(record)[4]).plain == f"Boom: {SHOWN}"
    about = Content.from_markup(detail(record, "")).plain
    assert about == f"{record.id} failed · Boom: {SHOWN}"
    assert run_labels([record]) == [SHOWN]
