"""ren-tui in a real terminal: tmux runs the app and the test reads the screen as a person sees it.

Pilot tests press keys inside Textual; this one goes through a terminal (tmux's key encoding, the
app's driver, what is painted), so a screen key that a focused field swallows, or a screen that
does not really switch, shows here. The app runs in its own process on a canned store
(tests/tui_fake.py) through ``ren-tui``'s ``main`` (``--store``), with no queue worker and a
stand-in model inspector: the real one imports torch, seconds this test does not need to wait.

Skipped where ``tmux`` is not installed (``apt-get install tmux``; .ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 120, 40
WAIT_S = 15.0  # the longest a screen may take to show (two shared cores, other suites running)
EXITED = "ren-tui exited with status"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed: the real-terminal test needs it (apt-get install tmux)")


class Terminal:
    """One tmux server on a private socket (``tmux -L``), one session, one pane."""

    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"ren-test-{uuid.uuid4().hex[:12]}"
        self.env = env
        self.socket_path: Path | None = None

    def start(self, command: str) -> None:
        # -f /dev/null: no user configuration; the server starts from `env`, and so does the app
        self.tmux("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "ren", command)
        self.socket_path = Path(self.tmux("display-message", "-p", "#{socket_path}").strip())

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], env=self.env,
                              capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def keys(self, *keys: str) -> None:
        """Keys by tmux's names (Enter, Escape, Tab, End, Space, Down) or single characters."""
        self.tmux("send-keys", "-t", "ren", *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "ren", "-l", "--", text)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "ren")

    def wait(self, *texts: str, until: Callable[[str], bool] | None = None, what: str = "") -> str:
        """The screen once it shows every one of ``texts`` (and ``until`` holds) and is still the same a poll
        later; fails with the last screen when it does not within WAIT_S. Polls: no fixed sleeps.

        The second look is there because tmux can be read between two writes of one frame: the CI once
        caught a new screen's list under the old screen's header."""
        deadline = time.monotonic() + WAIT_S
        seen = None
        while True:
            screen = self.screen()
            if all(t in screen for t in texts) and (until is None or until(screen)):
                if screen == seen:
                    return screen
                seen = screen
            else:
                seen = None
            if (EXITED in screen and EXITED not in texts) or time.monotonic() > deadline:
                pytest.fail(f"waited {WAIT_S:.0f} s for {what or texts!r}; the terminal shows:\n{screen}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the server (the app and its shell with it) and remove its socket, which tmux leaves behind."""
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=10)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


def launch(store: str) -> None:
    """The app process (``python -m tests.test_tui_tmux STORE``): ``ren-tui --store STORE`` with a backend
    that starts no queue worker and a stand-in inspector. Imports no torch."""
    import ren_tui.app as app_module
    from engine.store import Store
    from ren_tui.backend import Backend

    def make_app(root: Path | str | None = None, *, start_worker: bool = True) -> app_module.RenApp:
        backend = Backend(Store(root), start_worker=False)
        backend.inspector = TableInspector()  # type: ignore[assignment]
        return app_module.RenApp(backend)

    app_module.make_app = make_app
    app_module.main(["--store", store])


class TableInspector:
    """Answers every config from a fixed table of layer groups, as ``engine.inspector`` would."""

    GROUPS = {"text.embeddings": 8960, "text.layers[0]": 132480, "vision.embeddings": 7472,
              "vision.layers[0]": 18560, "fusion.layers[0]": 398080, "heads.task": 139277}

    def start(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def inspect(self, config: dict[str, Any]) -> dict[str, Any]:
        frozen = [n for n in self.GROUPS if any(n.startswith(p) for p in config.get("freeze", {}).get("groups", []))]
        groups = {n: {"total": t, "trainable": 0 if n in frozen else t} for n, t in self.GROUPS.items()}
        total, trainable = sum(self.GROUPS.values()), sum(g["trainable"] for g in groups.values())
        flops = {n: 10 * t for n, t in self.GROUPS.items()}
        return {"id": None, "ok": True, "config": config, "frozen_groups": frozen,
                "params": {"total": total, "trainable": trainable, "frozen": total - trainable, "groups": groups},
                "flops_per_sample": {"forward": sum(flops.values()), "train": 3 * sum(flops.values()),
                                     "groups": flops}}


@pytest.fixture
def terminal(ren_home: Path) -> Iterator[Terminal]:
    """ren-tui in tmux (120x40) on a store of two finished canned runs."""
    from engine.store import Store
    from tests.tui_fake import canned_run

    store = Store(ren_home)
    canned_run(store, "alpha-run", seed=1)
    canned_run(store, "beta-run", seed=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "REN_HOME": str(ren_home)}
    env.pop("TMUX", None)  # started from inside tmux: still a server of its own
    # The shell reports how the app ended and keeps the pane, so a crash leaves its traceback on the screen.
    command = (f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -m tests.test_tui_tmux "
               f"{shlex.quote(str(ren_home))}; echo \"{EXITED} $?\"; sleep 600")
    term = Terminal(env)
    try:
        term.start(command)
        yield term
    finally:
        term.close()


def field(screen: str, label: str) -> str:
    """The value on Compose's form row labelled ``label``."""
    match = re.search(rf"^ {re.escape(label)} +(\S+)", screen, re.MULTILINE)
    return match.group(1) if match else ""


@pytest.mark.timeout(120)
def test_screen_keys_switch_screens_and_never_type_into_a_left_field(terminal: Terminal) -> None:
    """Runs -> Monitor -> Compare -> Compose -> Freeze -> Queue by their keys. In Compose the run name is
    edited, escape leaves the field, and 1, 2 and 3 then switch screens: the name keeps what was typed.
    Escape on Compose outside a field goes back to Runs."""
    runs_marker = "2 of 2 runs"
    screen = terminal.wait(runs_marker, "alpha-run", "beta-run", what="the Runs screen")
    assert "ren — " in screen and "Monitor" in screen  # the header and the footer's enter key

    terminal.keys("Enter")  # the run under the cursor: the newest, beta-run
    screen = terminal.wait("log (L: full screen)", "Loss  LR  Throughput", what="the Monitor")
    assert "-beta-run-" in screen.splitlines()[0]
    terminal.keys("Escape")
    terminal.wait(runs_marker)

    terminal.keys("Space", "Down", "Space", "c")  # mark both runs, compare them
    screen = terminal.wait("metric loss", "─scores─", what="Compare")
    assert re.search(r"^ beta-run +finetune", screen, re.MULTILINE) and re.search(r"^ alpha-run +finetune", screen,
                                                                                 re.MULTILINE), screen
    terminal.keys("Escape")
    terminal.wait(runs_marker)

    terminal.keys("2")
    screen = terminal.wait("ren — Compose", "✓ valid", what="Compose with the inspector's answer")
    assert field(screen, "name") == "quickstart"
    terminal.keys("Tab", "Tab")  # from the preset picker through the form to the run name
    terminal.wait("esc Leave field", what="a focused field (the footer's escape)")
    # The field selects its text on focus, so typing replaces it. (Not End, then text: sent at once, End was
    # seen to act before the field's focus handler selected everything, and the text replaced it all.)
    terminal.type("tmux-run")
    terminal.wait(until=lambda s: field(s, "name") == "tmux-run", what="the typed run name")

    terminal.keys("Escape")  # leaves the field; from here the digits are screen keys
    # Wait for it: an escape and a key in one read are one key to a terminal (alt+1), as in any terminal app.
    terminal.wait("f Freeze…", until=lambda s: "Leave field" not in s, what="the field left")
    terminal.keys("1")
    screen = terminal.wait(runs_marker, what="Runs after 1")
    assert "Compose" not in screen.splitlines()[0]
    terminal.keys("2")
    screen = terminal.wait("ren — Compose", what="Compose after 2")
    assert field(screen, "name") == "tmux-run"  # not "tmux-run12": nothing leaked in
    terminal.keys("3")
    terminal.wait("Queued (0)", "Recently ended", what="the Queue after 3")
    terminal.keys("2")
    screen = terminal.wait("ren — Compose", what="Compose after 2")
    assert field(screen, "name") == "tmux-run"

    terminal.keys("f")
    terminal.wait("ren — Freeze", "[freeze] groups = (none)", what="Freeze")
    terminal.keys("v")  # the vision tower
    terminal.wait("[freeze] groups = vision", what="the vision tower frozen")
    terminal.keys("Escape")  # cancels: Compose again, its name as it was
    screen = terminal.wait("ren — Compose", what="Compose after leaving Freeze")
    assert field(screen, "name") == "tmux-run"

    terminal.keys("3")
    terminal.wait("Queued (0)", what="the Queue")
    terminal.keys("2")
    terminal.wait("ren — Compose", "esc Back", what="Compose, its footer offering escape")
    terminal.keys("Escape")  # no field has focus: back to Runs
    terminal.wait(runs_marker, what="Runs after escape on Compose")
    terminal.keys("q")
    screen = terminal.wait(EXITED, what="the app to quit")
    assert f"{EXITED} 0" in screen, screen


@pytest.mark.timeout(120)
def test_the_examples_view_draws_its_picture_in_half_blocks_and_takes_keys_after(terminal: Terminal,
                                                                                 ren_home: Path) -> None:
    """x opens the kept predictions of the run under the cursor; in tmux (as over plain SSH) the picture is
    drawn in half-block characters. textual-image is imported then, inside the running app: had it asked
    the terminal what it supports, tmux's answers would have reached the app as keys."""
    from engine.store import Store
    from tests.tui_fake import TEST_PICKS, canned_predictions

    store = Store(ren_home)
    beta = next(r for r in store.list_runs() if r.name == "beta-run")
    canned_predictions(store, beta.id, "test", TEST_PICKS, samples=700)
    terminal.wait("2 of 2 runs", what="the Runs screen")
    terminal.keys("x")
    screen = terminal.wait("picture · half-block characters", "what is the red shape?", "✗ wrong",
                           until=lambda s: s.count("▀") > 200, what="the examples and the first picture")
    assert "vqa on easy_vqa/test · vqa_score 0.9843 on 700 samples" in screen
    terminal.keys("e")
    screen = terminal.wait("errors only (e: all)", what="the errors only")
    assert "what color is the circle?" not in screen and "what is the black shape?" in screen
    terminal.keys("Escape")
    screen = terminal.wait("2 of 2 runs", what="Runs again")
    assert "beta-run" in screen and "Help" not in screen.splitlines()[0]
    terminal.keys("q")
    screen = terminal.wait(EXITED, what="the app to quit")
    assert f"{EXITED} 0" in screen, screen


if __name__ == "__main__":
    launch(sys.argv[1])
