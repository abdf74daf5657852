"""ren-tui's speed targets (issue 17), against a bare Textual app, in fresh processes.

    .venv/bin/python bench/tui_startup.py [--repeats 5] [--runs 500] [--points 20000] [--quick]
                                          [--tree DIR] [--baseline-tree DIR]

Builds two throw-away stores: an empty one, and one with ``--runs`` finished runs in its index of which
the middle one holds ``--points`` metric points (segment files as the metrics writer writes them). The
code measured is the checkout this script lives in (``--tree``: another one), launched as
``python -c "from ren_tui.__main__ import main; main()"`` (what the ``ren-tui`` script runs) with that
checkout first on ``PYTHONPATH``, so an installed ``ren-tui`` of another checkout is never what is timed.
Every measurement starts a fresh process, in a pseudo-terminal of 120x40 (TERM=xterm-256color), and reads what it draws:

- **first paint**: the clock runs from ``Popen`` to the moment the terminal output (escape sequences
  stripped) holds the frame's last text: the footer's ``^p palette`` for ren-tui, the label for a bare
  Textual app whose only widget is a label, launched in alternation with it (empty store; big store,
  and for it also until the newest run's name is on screen). CPU: user + system seconds of the process
  until then, which load from other processes inflates less than wall time.
- **screen switches** (big store, one fresh process per repeat): once the Runs screen shows every run
  and the process tree (ren-tui and its model inspector) has gone quiet, each key is sent and timed
  until the target screen's own text is in the output it drew since: ``2`` Compose (its first
  opening: ``start from``; then until the default preset fills the form, which is when it accepts
  input: the preset's name ``quickstart``, in the preset picker and the name field, which only Compose
  shows, and only once the preset is in the form), ``3`` Queue (``Recently ended``), ``1`` Runs (``of N runs``), ``2``
  Compose again, ``1``, ``enter`` on the newest run: Monitor (its header read: `` · finished · ``),
  ``escape`` back to Runs. The process tree is let go quiet before every key.
- **Monitor, the ``--points`` run**: in the same process, ``/`` filters the table to that run,
  ``enter`` opens it; timed until the chart is drawn (its legend ``⠒⠒ loss``, in the frame that draws
  the curve: min/max-downsampled to the chart's width).
- **Compose, early**: ``2`` pressed as soon as the runs are on screen, in a fresh process, before start-up
  has settled: the worst case of its first opening.
- imports only: ``import textual.app, textual.widgets`` against ren-tui's start-up imports, alternating.

Bytecode is cached, as after an install: every launched interpreter keeps it in a temporary
``PYTHONPYCACHEPREFIX`` (nothing is written into a checkout or the virtual environment), filled once before
timing; one first-paint row is measured without it (``PYTHONDONTWRITEBYTECODE``, which this machine's
environment sets: every launch then compiles ren's modules).
- headless (``App.run(headless=True)`` driven by a pilot): process creation to the Runs screen showing
  every run; and ``open_monitor`` on the big run until its chart holds the run's points.

``--baseline-tree DIR`` measures a second checkout (e.g. ``git archive`` of an older commit) in
alternation with the first, for before/after ratios measured side by side. ``--quick``: tiny store, two
repeats, printed only (never writes RESULTS.md).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import pty
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402

COLS, ROWS = 120, 40
PAINT_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 90.0
REN_MAIN = "from ren_tui.__main__ import main; main()"  # what the ren-tui script runs
REN_MARKER = "^p palette"  # the right end of the footer, the frame's last text
BARE_LABEL = "bare-textual-label"
BARE_APP = f"""
from textual.app import App
from textual.widgets import Label


class Bare(App):
    def compose(self):
        yield Label({BARE_LABEL!r})


Bare().run()
"""
BARE_IMPORTS = "import textual.app, textual.widgets"
REN_IMPORTS = "import ren_tui.app, ren_tui.screens.runs"
_ANSI = re.compile(rb"\x1b\[[0-9;?<>=$]*[ -/]*[@-~]|\x1b[\]P_^][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
FORM_FILLED = "quickstart"  # the default preset's name: Compose shows it once the preset fills the form
TARGETS = {"first paint": 0.5, "switch": 0.150, "compose input": 0.200, "monitor": 0.300}

HEADLESS = r"""
import sys, time, psutil
born = psutil.Process().create_time()
from ren_tui.app import make_app
from ren_tui.screens.runs import RunsScreen

store, expected, monitor = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = make_app(store, start_worker=False)
result = {}

async def drive(pilot):
    while not (isinstance(app.screen, RunsScreen) and app.screen.loaded
               and app.screen.query_one("#runs").row_count == expected):
        await pilot.pause(0.005)
    result["startup_s"] = time.time() - born
    if monitor != "-":
        await app.workers.wait_for_complete()  # start-up settled: the background warm-up import is done
        result["settled_s"] = time.time() - born
        await pilot.pause(0.2)
        t0 = time.perf_counter()
        app.open_monitor(monitor)
        from ren_tui.screens.monitor import MonitorScreen
        from ren_tui.widgets.chart import Chart
        while not (isinstance(app.screen, MonitorScreen) and app.screen.query(Chart)
                   and app.screen.chart.plotted.get("loss")):
            await pilot.pause(0.005)
        result["monitor_s"] = time.perf_counter() - t0
        result["monitor_points"] = len(app.screen._series.points)
    app.exit()

app.run(headless=True, size=(120, 40), auto_pilot=drive)
print("RESULT", __import__("json").dumps(result))
"""


def build_store(root: Path, runs: int, points: int) -> list[str]:
    """``runs`` finished runs, newest last; the middle one gets ``points`` points. Returns the ids."""
    from engine.store import Store
    from tests.tui_fake import preset_config

    store = Store(root)
    config = preset_config()
    ids = []
    for i in range(runs):
        record = store.create_run(name=f"run-{i:03d}", stage="finetune", kind="two_tower", config=config,
                                  tags=(f"study:s{i % 7}",), max_steps=points)
        ids.append(record.id)
    metrics = store.run_dir(ids[len(ids) // 2]) / "metrics"
    metrics.mkdir()
    series = [{"step": s, "time": 1.8e9 + s, "loss": 2 * math.exp(-s / points) + 0.1, "lr": 1e-4,
               "samples_per_s": 200.0, "epoch": s / 1000} for s in range(1, points + 1)]
    for k in range(0, points, 5000):
        (metrics / f"{k // 5000:06d}.json").write_text(json.dumps({"points": series[k:k + 5000]}))
    for run_id in ids:  # as the trainer leaves a finished run
        store.update_run(run_id, status="finished", step=points, best_scores={"eval/vqa_score": 0.9},
                         loss_trace=tuple(2 - j / 12 for j in range(24)), started_at=1.8e9, ended_at=1.8e9 + 600)
    return ids


BYTECODE: dict[str, str] = {}
"""Where the launched interpreters keep their bytecode (``PYTHONPYCACHEPREFIX``: a temporary folder, so
nothing is written into a checkout or the virtual environment); set by main."""


def child_env(tree: Path, *, bytecode: bool = True) -> dict[str, str]:
    """The environment of a launched interpreter: ``tree`` first on the path; bytecode cached (kept in
    BYTECODE's folder and reused, as after an install) unless ``bytecode`` is False, when nothing is cached
    and every launch compiles ren's modules from source (PYTHONDONTWRITEBYTECODE, as this machine's
    environment sets it)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if bytecode:
        env["PYTHONPYCACHEPREFIX"] = BYTECODE["prefix"]
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


WARM_IMPORTS = ("import torch, engine.models, engine.jobs.api, textual.app, textual.widgets, ren_tui.app, "
                "ren_tui.screens.runs, ren_tui.screens.compose, ren_tui.screens.queue, ren_tui.screens.monitor, "
                "ren_tui.screens.compare, ren_tui.screens.log, ren_tui.screens.freeze")


def warm_bytecode(trees: list[Path], bare: Path) -> None:
    """Compile what every side imports into BYTECODE's folder once (torch for the model inspector too), and
    launch the bare app once, so that no timed launch compiles."""
    for tree in trees:
        subprocess.run([sys.executable, "-c", WARM_IMPORTS], check=True, cwd=tree, env=child_env(tree))
    first_paint([sys.executable, str(bare)], REPO, [BARE_LABEL], [])


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ren_command(store: Path, tree: Path) -> list[str]:
    """``ren-tui --store STORE`` as ``tree``'s script runs it (a checkout older than ren_tui/__main__.py:
    ``ren_tui.app.main``, what its script ran)."""
    entry = REN_MAIN if (tree / "ren_tui" / "__main__.py").exists() else "from ren_tui.app import main; main()"
    return [sys.executable, "-c", entry, "--store", str(store)]


def fresh(store: Path) -> Path:
    """``store`` as a new user finds it: no saved TUI settings (last screen, filter, marks)."""
    shutil.rmtree(store / "tui", ignore_errors=True)
    return store


class Terminal:
    """A command in a fresh 120x40 pseudo-terminal, its output kept with the time it arrived."""

    def __init__(self, command: list[str], tree: Path, *, bytecode: bool = True) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = {**child_env(tree, bytecode=bytecode), "TERM": "xterm-256color"}
        for name in ("COLUMNS", "LINES", "TEXTUAL", "NO_COLOR"):
            env.pop(name, None)
        self.cpu0, self.t0 = children_cpu(), time.perf_counter()
        self.proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tree,
                                     start_new_session=True)
        os.close(slave)
        self.ps = psutil.Process(self.proc.pid)
        self.raw = b""
        self.command = command

    def text(self, since: int = 0) -> str:
        return _ANSI.sub(b"", self.raw[since:]).decode(errors="replace")

    def _fail(self, why: str) -> SystemExit:
        return SystemExit(f"{self.command} {why}; its screen ended with:\n{self.text()[-1500:]}")

    def pump(self, timeout: float) -> bool:
        """Read what arrived within ``timeout`` seconds; whether anything did."""
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.master, 1 << 16)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise self._fail("exited")
        self.raw += chunk
        return True

    def wait_for(self, markers: list[str], since: int = 0, start: float | None = None,
                 timeout: float = PAINT_TIMEOUT_S) -> list[float]:
        """Seconds from ``start`` (default: the launch) until each marker was in the output after byte
        ``since``, each taken when the chunk holding its end arrived."""
        start = self.t0 if start is None else start
        found: dict[str, float] = {}
        while True:
            text = self.text(since)
            now = time.perf_counter()
            for marker in markers:
                if marker not in found and marker in text:
                    found[marker] = now - start
            if len(found) == len(markers):
                return [found[m] for m in markers]
            if now - start > timeout:
                raise self._fail(f"showed no {[m for m in markers if m not in found]} within {timeout:.0f} s")
            self.pump(0.002)

    def tree_cpu(self) -> float:
        """CPU seconds (user + system) of the process and its living children so far."""
        total = 0.0
        for proc in [self.ps, *self.ps.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def settle(self, window: float = 0.5, busy: float = 0.1) -> bool:
        """Wait until the process tree used under ``busy`` of a core over ``window`` seconds (draining
        the output meanwhile); False if it never did within SETTLE_TIMEOUT_S."""
        deadline = time.perf_counter() + SETTLE_TIMEOUT_S
        while time.perf_counter() < deadline:
            c0, t0 = self.tree_cpu(), time.perf_counter()
            while time.perf_counter() - t0 < window:
                self.pump(0.02)
            if self.tree_cpu() - c0 < busy * (time.perf_counter() - t0):
                return True
        return False

    def press(self, keys: str, markers: list[str], timeout: float = PAINT_TIMEOUT_S) -> tuple[list[float], float]:
        """Send ``keys``; seconds until each marker was drawn after them, and the CPU seconds the
        ren-tui process used meanwhile."""
        since, c0 = len(self.raw), self.cpu()
        start = time.perf_counter()
        os.write(self.master, keys.encode())
        times = self.wait_for(markers, since, start, timeout) if markers else []
        return times, self.cpu() - c0

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.master)


def first_paint(command: list[str], tree: Path, markers: list[str], cpu: list[float], *,
                bytecode: bool = True) -> list[float]:
    """Seconds from starting ``command`` in a fresh pseudo-terminal until each marker has appeared in its
    output; the process group is killed at the last one, and the CPU seconds it used until then are
    appended to ``cpu``."""
    term = Terminal(command, tree, bytecode=bytecode)
    try:
        times = term.wait_for(markers)
    finally:
        term.close()
    cpu.append(children_cpu() - term.cpu0)
    return times


# (label, keys, markers): the session of screen switches, in order; "compose" is the first opening
def switches(runs: int) -> list[tuple[str, str, list[str]]]:
    shown = f" of {runs} runs"
    return [
        ("Runs -> Compose (first opening)", "2", ["start from", FORM_FILLED]),
        ("Compose -> Queue", "3", ["Recently ended"]),
        ("Queue -> Runs", "1", [shown]),
        ("Runs -> Compose (again)", "2", ["start from"]),
        ("Compose -> Runs", "1", [shown]),
        ("Runs -> Monitor (enter)", "\r", [" · finished · "]),
        ("Monitor -> Runs (escape)", "\x1b", [shown]),
    ]


def session(store: Path, tree: Path, runs: int, big_run: str) -> dict[str, tuple[float, float]]:
    """One fresh ren-tui on the big store: every switch's (seconds, CPU seconds), then the big run's
    Monitor; keys are sent once the process tree is quiet."""
    term = Terminal(ren_command(fresh(store), tree), tree)
    out: dict[str, tuple[float, float]] = {}
    unsettled = 0
    try:
        term.wait_for([REN_MARKER, f"run-{runs - 1:03d}"])
        for label, keys, markers in switches(runs):
            unsettled += not term.settle()
            times, cpu = term.press(keys, markers)
            out[label] = (times[0], cpu)
            if len(markers) > 1:
                out["Compose accepts input (first opening, form filled)"] = (times[1], cpu)
        unsettled += not term.settle()
        term.press("/", ["filter:"])
        term.press(big_run, [big_run])
        unsettled += not term.settle()
        term.press("\r", [])  # the filter's enter: the table takes the keyboard
        unsettled += not term.settle()
        times, cpu = term.press("\r", ["⠒⠒ loss"])
        out["Monitor, big run: chart drawn"] = (times[0], cpu)
    finally:
        term.close()
    out["unsettled"] = (float(unsettled), 0.0)
    return out


def compose_early(store: Path, tree: Path, runs: int) -> tuple[float, float]:
    """``2`` pressed as soon as the runs are on screen, before start-up has settled (the warm-up imports and
    the screens made behind have not run): seconds and CPU seconds until the default preset fills the form."""
    term = Terminal(ren_command(fresh(store), tree), tree)
    try:
        term.wait_for([REN_MARKER, f"run-{runs - 1:03d}"])
        times, cpu = term.press("2", ["start from", FORM_FILLED])
    finally:
        term.close()
    return times[1], cpu


def import_time(statement: str, tree: Path, cpu: list[float]) -> float:
    """Seconds a fresh interpreter takes to run ``statement`` and exit (its CPU seconds go to ``cpu``)."""
    c0, t0 = children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=tree, env=child_env(tree))
    elapsed = time.perf_counter() - t0
    cpu.append(children_cpu() - c0)
    return elapsed


def headless(store: Path, tree: Path, expected: int, monitor: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", HEADLESS, str(fresh(store)), str(expected), monitor],
                          capture_output=True, text=True, cwd=tree, timeout=120, env=child_env(tree))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def row(label: str, values: list[float], cpu: list[float] | None = None, target: float | None = None
        ) -> list[object]:
    verdict = "" if target is None else f"{target * 1e3:.0f} ms: " + ("met" if median(values) < target else "missed")
    return [label, f"{median(values) * 1e3:.0f}", f"{min(values) * 1e3:.0f}", f"{max(values) * 1e3:.0f}",
            f"{median(cpu) * 1e3:.0f}" if cpu else "", len(values), verdict]


def measure(args: argparse.Namespace, trees: dict[str, Path], empty: Path, big: Path, bare: Path,
            big_run: str, big_name: str) -> dict[str, dict[str, list[float]]]:
    """Every measurement, each tree's alternating with the others' (and the bare app's)."""
    newest = f"run-{args.runs - 1:03d}"
    m: dict[str, dict[str, list[float]]] = {}

    def put(key: str, value: float, cpu: float | None = None) -> None:
        m.setdefault(key, {"s": [], "cpu": []})["s"].append(value)
        if cpu is not None:
            m[key]["cpu"].append(cpu)

    def bare_paint() -> float:
        cpu: list[float] = []
        t = first_paint([sys.executable, str(bare)], REPO, [BARE_LABEL], cpu)[0]
        put("paint bare", t, cpu[0])
        return t

    sides: dict[str, Callable[[], float]] = {"bare": bare_paint}
    for name, tree in trees.items():
        def paint_empty(name: str = name, tree: Path = tree) -> float:
            cpu: list[float] = []
            t = first_paint(ren_command(fresh(empty), tree), tree, [REN_MARKER], cpu)[0]
            put(f"paint empty {name}", t, cpu[0])
            return t

        def paint_big(name: str = name, tree: Path = tree, bytecode: bool = True) -> float:
            cpu: list[float] = []
            paint, shown = first_paint(ren_command(fresh(big), tree), tree, [REN_MARKER, newest], cpu,
                                       bytecode=bytecode)
            key = "" if bytecode else " uncached"
            put(f"paint big{key} {name}", paint, cpu[0])
            put(f"shown big{key} {name}", shown)
            return paint

        sides[f"empty {name}"], sides[f"big {name}"] = paint_empty, paint_big
        sides[f"big uncached {name}"] = partial(paint_big, bytecode=False)
    alternate(sides, args.repeats)

    def one_session(name: str, tree: Path) -> float:
        for label, (t, cpu) in session(big, tree, args.runs, big_name).items():
            put(f"{label} {name}", t, cpu)
        return 0.0

    alternate({name: (lambda name=name, tree=tree: one_session(name, tree)) for name, tree in trees.items()},
              args.repeats)

    def one_early(name: str, tree: Path) -> float:
        t, cpu = compose_early(big, tree, args.runs)
        put(f"compose early {name}", t, cpu)
        return t

    alternate({name: partial(one_early, name, tree) for name, tree in trees.items()}, args.repeats)

    imports: dict[str, Callable[[], float]] = {}
    for name, tree in [("bare", REPO), *trees.items()]:
        def imp(name: str = name, tree: Path = tree) -> float:
            cpu: list[float] = []
            t = import_time(BARE_IMPORTS if name == "bare" else REN_IMPORTS, tree, cpu)
            put(f"imports {name}", t, cpu[0])
            return t
        imports[name] = imp
    alternate(imports, args.repeats)

    def one_headless(name: str, tree: Path) -> float:
        put(f"headless empty {name}", headless(empty, tree, 0, "-")["startup_s"])
        r = headless(big, tree, args.runs, big_run)
        put(f"headless big {name}", r["startup_s"])
        put(f"headless monitor {name}", r["monitor_s"])
        return 0.0

    alternate({name: (lambda name=name, tree=tree: one_headless(name, tree)) for name, tree in trees.items()},
              args.repeats)
    return m


def report(args: argparse.Namespace, m: dict[str, dict[str, list[float]]], names: list[str], built: float,
           load: tuple[float, float]) -> str:
    def r(key: str, label: str, target: float | None = None) -> list[object]:
        return row(label, m[key]["s"], m[key]["cpu"] or None, target)

    tables = []
    for name in names:
        rows = [r("paint bare", "bare Textual app (one label): first paint"),
                r(f"paint empty {name}", "`ren-tui`, empty store: first paint"),
                r(f"paint big {name}", f"`ren-tui`, {args.runs}-run store: first paint", TARGETS["first paint"]),
                r(f"shown big {name}", f"`ren-tui`, {args.runs}-run store: newest run on screen",
                  TARGETS["first paint"]),
                r(f"paint big uncached {name}",
                  f"`ren-tui`, {args.runs}-run store: first paint, bytecode not cached (PYTHONDONTWRITEBYTECODE)")]
        for label, _, _ in switches(args.runs):
            target = None if "first opening" in label else TARGETS["switch"]
            rows.append(r(f"{label} {name}", label, target))
            if "first opening" in label:
                rows.append(r(f"Compose accepts input (first opening, form filled) {name}",
                              "Compose accepts input (first opening: the default preset in the form)",
                              TARGETS["compose input"]))
        rows.append(r(f"compose early {name}",
                      "Compose accepts input, `2` pressed as soon as the runs are on screen (start-up not settled)"))
        rows.append(r(f"Monitor, big run: chart drawn {name}",
                      f"Runs -> Monitor of the {args.points:,}-point run: chart drawn", TARGETS["monitor"]))
        rows += [r("imports bare", f"imports only: `{BARE_IMPORTS}`"),
                 r(f"imports {name}", f"imports only: `{REN_IMPORTS}`"),
                 r(f"headless empty {name}", "headless, empty store: Runs screen loaded"),
                 r(f"headless big {name}", f"headless, {args.runs}-run store: every run in the table"),
                 r(f"headless monitor {name}",
                   f"headless, `open_monitor` on the {args.points:,}-point run to its plotted chart",
                   TARGETS["monitor"])]
        unsettled = int(sum(m[f"unsettled {name}"]["s"]))
        note = (f"{unsettled} key(s) were sent before the process tree went quiet (it did not within "
                f"{SETTLE_TIMEOUT_S:.0f} s).\n\n" if unsettled else "")
        tables.append((f"**{name}**\n\n" if len(names) > 1 else "") + note
                      + table(["measure", "median ms", "min ms", "max ms", "CPU median ms", "n", "target"], rows))
    bare_s, bare_cpu = median(m["paint bare"]["s"]), median(m["paint bare"]["cpu"])
    ratios = []
    for name in names:
        for what, key in (("empty store", "paint empty"), (f"{args.runs}-run store", "paint big")):
            k = f"{key} {name}"
            ratios.append([f"`ren-tui` ({name}) {what} / bare Textual, first paint",
                           f"{median(m[k]['s']) / bare_s:.2f}", f"{median(m[k]['cpu']) / bare_cpu:.2f}"])
        ratios.append([f"ren-tui ({name}) / bare, imports only",
                       f"{median(m[f'imports {name}']['s']) / median(m['imports bare']['s']):.2f}",
                       f"{median(m[f'imports {name}']['cpu']) / median(m['imports bare']['cpu']):.2f}"])
    if len(names) == 2:
        new, old = names
        for key, label in (("paint big", f"first paint, {args.runs} runs"),
                           ("Compose accepts input (first opening, form filled)", "Compose accepts input"),
                           ("Runs -> Compose (again)", "Runs -> Compose (again)"),
                           ("Queue -> Runs", "Queue -> Runs"),
                           ("Runs -> Monitor (enter)", "Runs -> Monitor"),
                           ("Monitor, big run: chart drawn", "Monitor of the big run")):
            a, b = m[f"{key} {new}"], m[f"{key} {old}"]
            ratios.append([f"{label}: {new} / {old}", f"{median(a['s']) / median(b['s']):.2f}",
                           f"{median(a['cpu']) / median(b['cpu']):.2f}" if a["cpu"] and b["cpu"] else ""])
    return (f"Fresh processes; the sides alternate. Pseudo-terminal {COLS}x{ROWS}. Big store: {args.runs} finished "
            f"runs (built in {built:.0f} s), the Monitor's run holding {args.points:,} points. CPU: user + system "
            "time of the ren-tui process (first paint: until it was killed; a switch: from the key to the marker; "
            "its threads included), which other load on the machine inflates far less than wall time. Bytecode "
            "cached, as after an install (compiled once into a temporary PYTHONPYCACHEPREFIX before timing; one row "
            "without). Load "
            f"average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} cores.\n\n"
            + "\n\n".join(tables) + "\n\n" + table(["ratio of medians", "wall", "CPU"], ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout to measure (default: this one)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a second checkout, measured in alternation (before/after ratios)")
    parser.add_argument("--quick", action="store_true", help="tiny store, 2 repeats; print only")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.points, args.repeats = 20, 2000, 2
    trees = {"this tree" if args.tree.resolve() == REPO else args.tree.name: args.tree.resolve()}
    if args.baseline_tree is not None:
        trees[f"baseline {args.baseline_tree.name}"] = args.baseline_tree.resolve()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ren-tui-startup-") as tmp:
        empty, big, bare = Path(tmp) / "empty", Path(tmp) / "big", Path(tmp) / "bare_app.py"
        empty.mkdir()
        bare.write_text(BARE_APP)
        t0 = time.perf_counter()
        ids = build_store(big, args.runs, args.points)
        built = time.perf_counter() - t0
        BYTECODE["prefix"] = str(Path(tmp) / "bytecode")
        warm_bytecode(list(trees.values()), bare)
        m = measure(args, trees, empty, big, bare, ids[len(ids) // 2], f"run-{len(ids) // 2:03d}")
    body = report(args, m, list(trees), built, (load0, os.getloadavg()[0]))
    print(body)
    if not args.quick:
        import textual  # noqa: F401 - so that the machine line names its version

        write_section("tui_startup", "ren-tui speed: first paint, screen switches, Compose, Monitor", body)


if __name__ == "__main__":
    main()
