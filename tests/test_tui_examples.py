"""The examples view (issue 18, part 5): a finetuned run's kept predictions with their pictures, drawn by
textual-image, filtered to the errors, split by split. The predictions are made as ``ren eval task
--examples`` stores them, around real easy-VQA questions and pictures (tests/tui_fake.py); one test
trains a tiny easy-VQA run and evaluates it for real."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

import engine.store
from engine.predictions import kept_predictions
from engine.store import Store
from ren_tui.app import HelpScreen, RenApp
from ren_tui.backend import Backend
from ren_tui.screens.examples import TEXT_CELL, ExamplesScreen
from ren_tui.screens.monitor import MonitorScreen
from ren_tui.screens.runs import RunsScreen
from ren_tui.widgets import picture
from tests.helpers.paths import REPO

from .tui_fake import TEST_PICKS, VAL_PICKS, canned_predictions, canned_run, easy_vqa_test

QUESTIONS, ANSWERS, IMAGES, PICTURES = easy_vqa_test()
ERRORS = [QUESTIONS[i] for i, answer, _, _ in TEST_PICKS if answer != ANSWERS[i]]


def short(text: str) -> str:
    """``text`` as the examples table shows it (the side panel shows it whole)."""
    return text if len(text) <= TEXT_CELL else text[:TEXT_CELL - 1] + "…"


def quickstart(store: Store, *, splits: tuple[str, ...] = ("test",)) -> str:
    """A finetuned run with kept predictions on ``splits`` (test: 6 examples, 4 errors; val: 2, no error)."""
    run = canned_run(store, "quickstart")
    if "test" in splits:
        canned_predictions(store, run.id, "test", TEST_PICKS, samples=700)
    if "val" in splits:
        canned_predictions(store, run.id, "val", VAL_PICKS, samples=389)
    return run.id


@pytest.fixture(autouse=True)
def half_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pictures in half-block characters with 10x20-pixel cells, whatever terminal runs the tests."""
    monkeypatch.setenv(picture.ENV, "halfblock")
    monkeypatch.setattr(picture, "cell_size", lambda: picture.DEFAULT_CELL)


def launch(home: Path) -> RenApp:
    return RenApp(Backend(Store(home), start_worker=False))


async def settle(app: RenApp, pilot: Pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


async def open_examples(app: RenApp, pilot: Pilot, key: str = "x") -> ExamplesScreen:
    await settle(app, pilot)
    await pilot.press(key)
    await settle(app, pilot)
    assert isinstance(app.screen, ExamplesScreen)
    return app.screen


def rows(screen: ExamplesScreen, table: str = "#examples") -> list[list[str]]:
    """A table's cells, row by row, as plain text."""
    t = screen.query_one(table, DataTable)
    return [[Text.from_markup(str(c)).plain for c in t.get_row(key)] for key in t.rows]


def text(screen: ExamplesScreen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


def shown_picture(screen: ExamplesScreen) -> bytes | None:
    """The pixels the picture widget draws (None: it draws none)."""
    assert screen.image is not None
    image = screen.image.image
    return image.tobytes() if screen.image.display and image is not None else None


def pixels(question: int) -> bytes:
    return Image.open(PICTURES[IMAGES[question]]).convert("RGB").tobytes()


# --- opening, what it shows, its keys --------------------------------------------------------------


async def test_x_on_a_run_shows_its_score_breakdown_examples_and_the_picture_under_the_cursor(ren_home: Path) -> None:
    store = Store(ren_home)
    run_id = quickstart(store)
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)
        assert f"{run_id} · vqa on easy_vqa/test · vqa_score 0.9843 on 700 samples" in text(screen, "#examples-header")
        assert rows(screen, "#breakdown") == [["colour", "95", "0.9684", "3"], ["shape", "103", "0.9709", "3"],
                                              ["yes/no", "502", "0.9900", "5"], ["all", "700", "0.9843", "11"]]
        table = rows(screen)
        assert [row[1] for row in table] == [short(QUESTIONS[i]) for i, *_ in TEST_PICKS]
        assert [row[0] for row in table] == ["✗", "✗", "✗", "✓", "✓", "✗"]  # errors marked in words, not colour only
        assert table[0][2:] == ["rectangle", "triangle", "0.00", "0.97", "shape", "confident error"]
        assert "6 kept examples, 4 errors (✗)" in text(screen, "#examples-status")
        assert type(screen.image).__name__ == "HalfcellImage" and shown_picture(screen) == pixels(0)
        detail = text(screen, "#example-detail")
        assert "what is the red shape?" in detail and "easy_vqa test image 0" in detail
        assert "rectangle ✗ wrong" in detail and "truth       triangle" in detail
        assert screen.focused is screen.query_one("#examples")

        await pilot.press("down")
        assert shown_picture(screen) == pixels(41)
        assert "does the image not contain a yellow shape?" in text(screen, "#example-detail")
        await pilot.press("end")
        assert shown_picture(screen) == pixels(102)

        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_e_shows_the_errors_only_and_keeps_the_cursor_on_its_example(ren_home: Path) -> None:
    quickstart(Store(ren_home))
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)
        await pilot.press("down")  # the second error
        await pilot.press("e")
        assert [row[1] for row in rows(screen)] == [short(q) for q in ERRORS] and len(ERRORS) == 4
        assert {row[0] for row in rows(screen)} == {"✗"}
        assert screen.query_one("#examples", DataTable).cursor_row == 1 and shown_picture(screen) == pixels(41)
        assert "· errors only (e: all) ·" in text(screen, "#examples-status")
        await pilot.press("end", "e")  # the last error is the last example: the cursor stays on it
        assert len(rows(screen)) == 6 and screen.query_one("#examples", DataTable).cursor_row == 5
        assert shown_picture(screen) == pixels(102)


async def test_s_cycles_the_evaluated_splits_and_e_holds_across_them(ren_home: Path) -> None:
    quickstart(Store(ren_home), splits=("test", "val"))
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)
        assert "easy_vqa/test" in text(screen, "#examples-header") and "split 1 of 2 (s: next)" in \
            text(screen, "#examples-header")
        assert screen.check_action("next_split", ()) is True
        await pilot.press("e", "s")
        header = text(screen, "#examples-header")
        assert "vqa on easy_vqa/val · vqa_score 0.9820 on 389 samples · split 2 of 2" in header
        assert rows(screen) == [] and shown_picture(screen) is None  # no errors among val's two
        assert "no errors among the kept examples" in text(screen, "#picture-note")
        await pilot.press("e")
        assert [row[1] for row in rows(screen)] == [short(QUESTIONS[44]), short(QUESTIONS[115])]
        assert shown_picture(screen) == pixels(44)
        await pilot.press("s")
        assert "easy_vqa/test" in text(screen, "#examples-header") and len(rows(screen)) == 6


async def test_one_split_leaves_the_split_key_out_of_the_footer(ren_home: Path) -> None:
    quickstart(Store(ren_home))
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)
        assert screen.check_action("next_split", ()) is False and "split 1 of" not in text(screen, "#examples-header")
        footer = {binding.action for _, binding, enabled, _ in screen.active_bindings.values() if enabled}
        assert {"errors_only", "app.pop_screen"} <= footer and "next_split" not in footer
        await pilot.press("question_mark")  # the help lists the screen's keys
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "s")
        assert "easy_vqa/test" in text(screen, "#examples-header")


async def test_a_run_without_kept_predictions_says_how_to_get_them(ren_home: Path) -> None:
    store = Store(ren_home)
    run = canned_run(store, "not-evaluated")
    pretraining = canned_run(store, "pretrained", stage="pretrain")
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)  # the newest run first: the pretraining one
        assert "pretraining run: it answers no task" in text(screen, "#examples-message")
        assert pretraining.id in text(screen, "#examples-message")
        await pilot.press("escape", "down", "x")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, ExamplesScreen) and screen.has_class("empty") and screen.image is None
        assert text(screen, "#examples-message") == (
            f"No kept predictions for run {run.id}: `ren eval task {run.id} --examples 20` scores it and keeps 20 "
            "examples with their pictures.")
        assert not screen.query_one("#examples-body").display and screen.check_action("errors_only", ()) is False
        await pilot.press("e")  # nothing to filter: nothing happens
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_a_missing_or_unreadable_picture_is_said_and_the_rest_still_shows(ren_home: Path) -> None:
    store = Store(ren_home)
    run_id = quickstart(store)
    folder = kept_predictions(store, run_id)[0].directory
    (folder / "41.png").write_bytes(b"not a png")
    (folder / "11.png").unlink()
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)
        await pilot.press("down")
        assert shown_picture(screen) is None and "cannot read the picture" in text(screen, "#picture-note")
        assert "does the image not contain a yellow shape?" in text(screen, "#example-detail")
        await pilot.press("down")
        assert shown_picture(screen) is None and "No such file" in text(screen, "#picture-note")
        await pilot.press("down")
        assert shown_picture(screen) == pixels(27) and not screen.query_one("#picture-note").display


async def test_unreadable_predictions_or_no_textual_image_are_said_not_raised(ren_home: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(ren_home)
    broken = quickstart(store)
    (kept_predictions(store, broken)[0].directory / "examples.json").write_text("{")
    run_id = quickstart(store)

    def no_textual_image(renderer: str, cell: tuple[int, int]) -> type:
        raise ImportError("No module named 'textual_image'")

    monkeypatch.setattr(picture, "image_class", no_textual_image)
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)  # the newest run: its predictions load, its pictures cannot
        assert screen.run_id == run_id and len(rows(screen)) == 6 and screen.image is None
        assert "pictures cannot be drawn here: No module named 'textual_image'" in text(screen, "#picture-note")
        assert "what is the red shape?" in text(screen, "#example-detail")
        await pilot.press("escape", "down", "x")
        await settle(app, pilot)
        assert app.is_running and app.screen.has_class("empty")
        assert "cannot read its kept predictions" in text(app.screen, "#examples-header")
        assert text(app.screen, "#examples-message").startswith("Cannot read the kept predictions")


async def test_X_in_a_runs_monitor_opens_its_examples_and_escape_goes_back_there(ren_home: Path) -> None:
    run_id = quickstart(Store(ren_home))
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await settle(app, pilot)
        assert isinstance(app.screen, MonitorScreen)
        screen = await open_examples(app, pilot, "X")
        assert screen.run_id == run_id and len(rows(screen)) == 6
        await pilot.press("escape")
        assert isinstance(app.screen, MonitorScreen)


async def test_x_typed_into_the_runs_filter_stays_there(ren_home: Path) -> None:
    quickstart(Store(ren_home))
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", "x")
        assert isinstance(app.screen, RunsScreen) and app.screen.view.filter == "x"
        await pilot.press("escape", "x")
        await settle(app, pilot)
        assert isinstance(app.screen, ExamplesScreen)


def test_examples_snapshot(snap_compare, ren_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's kept test predictions: an easy-VQA picture in half-block characters beside them."""
    monkeypatch.setattr(engine.store, "_new_run_id", lambda name, created_at: f"20261207-120000-{name}")
    quickstart(Store(ren_home))
    app = launch(ren_home)

    async def run_before(pilot: Pilot) -> None:
        app.sub_title = "test store"
        await open_examples(app, pilot)
        await pilot.press("down", "down")

    assert snap_compare(app, terminal_size=(110, 32), run_before=run_before)


# --- how pictures are drawn ---------------------------------------------------------------------------


def test_the_renderer_follows_the_terminal_and_plain_ssh_gets_half_blocks() -> None:
    choose = picture.choose_renderer
    assert choose({"TERM": "xterm-256color", "SSH_CONNECTION": "10.0.0.1 5 10.0.0.2 22"}) == "halfblock"
    assert choose({"TERM": "xterm-kitty"}) == "kitty" and choose({"KITTY_WINDOW_ID": "1", "TERM": "xterm"}) == "kitty"
    assert choose({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}) == "sixel"
    assert choose({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}) == "sixel"
    assert choose({"TERM": "foot"}) == "sixel" and choose({"KONSOLE_VERSION": "230805"}) == "sixel"
    assert choose({"TERM": "tmux-256color", "KITTY_WINDOW_ID": "1"}) == "halfblock"
    assert choose({"TERM": "xterm-256color", "NO_COLOR": "1"}) == "shades"
    assert choose({"TERM": "xterm-256color", picture.ENV: "Sixel"}) == "sixel"
    assert choose({"TERM": "xterm-kitty", picture.ENV: "nonsense"}) == "kitty"
    with pytest.raises(ValueError, match="unknown renderer"):
        picture.image_class("ascii", picture.DEFAULT_CELL)


def _in_a_terminal(code: str, timeout: float = 20.0) -> tuple[bytes, str]:
    """Run ``code`` in a fresh interpreter whose stdin, stdout and stderr are a pseudo-terminal that never
    answers: (what it wrote to the terminal, the last line it wrote to ``say``, a pipe)."""
    master, slave = os.openpty()
    read_end, write_end = os.pipe()
    said_by = f"import os\ndef say(line): os.write({write_end}, (line + '\\n').encode())\n"
    process = subprocess.Popen([sys.executable, "-c", said_by + code], stdin=slave, stdout=slave, stderr=slave,
                               cwd=REPO, pass_fds=(write_end,), env={**os.environ, "TERM": "xterm-256color"})
    os.close(slave)
    os.close(write_end)
    written = b""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if select.select([master], [], [], 0.05)[0]:
            try:
                written += os.read(master, 4096)
            except OSError:
                break
    process.wait(timeout=5)
    with os.fdopen(read_end) as out:
        said = out.read().strip().splitlines()
    os.close(master)
    return written, said[-1] if said else ""


def test_importing_textual_image_through_picture_asks_the_terminal_nothing() -> None:
    """textual-image asks the terminal about sixel and kitty graphics when imported (escape sequences written,
    answers read from stdin: in a running app they would reach Textual as keys). Through image_class it asks
    nothing, and waits for no answer; the widget draws half-block characters."""
    plain, _ = _in_a_terminal(
        "import textual_image.widget")
    assert b"\x1b[c" in plain and b"\x1b_G" in plain  # the device-attributes and kitty-graphics questions
    quiet, said = _in_a_terminal(
        "from ren_tui.widgets import picture\n"
        "cls = picture.image_class('halfblock', picture.cell_size())\n"
        "from textual_image._terminal import get_cell_size\n"
        "say(f'{cls.__name__} {tuple(get_cell_size())}')")
    assert quiet == b"" and said == "HalfcellImage (10, 20)"  # a pseudo-terminal of 0x0 pixels: the default


# --- a real run ---------------------------------------------------------------------------------------


async def test_a_trained_runs_kept_predictions_show_with_their_pictures(ren_home: Path, data_cache: Path) -> None:
    """A tiny easy-VQA finetune, evaluated with ``--examples 6`` as the quickstart's is: the view shows what
    was kept, and the picture of each example is the one kept for it."""
    from engine.cli.evaluate import task
    from engine.train import train
    from tests.helpers.training import start, tiny_finetune

    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache, max_steps=4, eval_every=4, checkpoint_every=4))
    train(cfg, store, run_id)
    task(run_id, split=None, root=None, submission=None, batch_size=512, device="cpu", examples=6)
    (stored,) = kept_predictions(store, run_id)
    app = launch(ren_home)
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_examples(app, pilot)
        assert f"vqa on easy_vqa/{stored.split}" in text(screen, "#examples-header")
        assert [row[1] for row in rows(screen)] == [short(e.text) for e in stored.examples]
        assert len(stored.examples) == 6
        assert [row[-1] for row in rows(screen)] == [e.why for e in stored.examples]
        for n, example in enumerate(stored.examples):
            if n:
                await pilot.press("down")
            expected = Image.open(stored.thumbnail_path(example)).convert("RGB").tobytes()
            assert shown_picture(screen) == expected
        await pilot.press("e")
        assert len(rows(screen)) == sum(e.error for e in stored.examples)
