"""ren-tui start-up against a bare Textual app, and the Monitor-open time.

    .venv/bin/python bench/tui_startup.py [--repeats 5] [--runs 500] [--points 20000] [--quick]

Builds two throw-away stores: an empty one, and one with ``--runs`` finished runs in its index
(start-up reads only the index) of which the one the Monitor opens holds ``--points`` metric
points (segment files as the metrics writer writes them). Then, always in fresh processes, so
that every number includes the interpreter's start and all imports:

- first paint, in a pseudo-terminal (120x40, TERM=xterm-256color): the real ``ren-tui`` entry
  point (empty store; big store) and a bare Textual app whose only widget is a label, launched in
  alternation; the clock runs from ``Popen`` to the moment the terminal output (escape sequences
  stripped) holds the frame's last text: the footer's ``^p palette`` for ren-tui, the label for
  the bare app. For the big store also until the newest run's name is on screen. The process
  group is then killed. Ratio: medians, ren-tui / bare, of the wall time and of the CPU time
  (user + system) the process used until then, which load from other processes inflates less.
- imports only: ``import textual.app, textual.widgets`` against ren-tui's start-up imports
  (``ren_tui.app`` and the Runs screen), alternating, to tell import time from the rest.
- headless (``App.run(headless=True)`` driven by a pilot): process creation to the Runs screen
  showing every run; then, once start-up has settled (the app imports the chart screens in the
  background after the first paint), ``open_monitor`` on the big run until its chart holds the
  run's points (downsampled to the terminal width).

``--quick``: tiny store, two repeats, printed only (never writes RESULTS.md).
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
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402

REN_TUI = Path(sys.executable).with_name("ren-tui")
COLS, ROWS = 120, 40
PAINT_TIMEOUT_S = 60.0
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


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_paint(command: list[str], markers: list[str], cpu: list[float]) -> list[float]:
    """Seconds from starting ``command`` in a fresh pseudo-terminal until each marker has appeared
    in its output; the process group is killed at the last one, and the CPU seconds the process
    used until then are appended to ``cpu``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    for name in ("COLUMNS", "LINES", "TEXTUAL", "NO_COLOR"):
        env.pop(name, None)
    c0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                            start_new_session=True)
    os.close(slave)
    raw = b""
    found: dict[str, float] = {}
    try:
        while len(found) < len(markers):
            if time.perf_counter() - t0 > PAINT_TIMEOUT_S:
                text = _ANSI.sub(b"", raw).decode(errors="replace")
                raise SystemExit(f"{command} showed no {markers} within {PAINT_TIMEOUT_S:.0f} s; "
                                 f"its screen ended with:\n{text[-1500:]}")
            if not select.select([master], [], [], 0.002)[0]:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                text = _ANSI.sub(b"", raw).decode(errors="replace")
                raise SystemExit(f"{command} exited before showing {markers}:\n{text[-1500:]}")
            now = time.perf_counter() - t0
            raw += chunk
            text = _ANSI.sub(b"", raw).decode(errors="replace")
            for marker in markers:
                if marker not in found and marker in text:
                    found[marker] = now
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(master)
    cpu.append(children_cpu() - c0)
    return [found[m] for m in markers]


def import_time(statement: str, cpu: list[float]) -> float:
    """Seconds a fresh interpreter takes to run ``statement`` and exit (its CPU seconds go to ``cpu``)."""
    c0, t0 = children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=REPO)
    elapsed = time.perf_counter() - t0
    cpu.append(children_cpu() - c0)
    return elapsed


def headless(store: Path, expected: int, monitor: str, repeats: int) -> list[dict]:
    out = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", HEADLESS, str(store), str(expected), monitor],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        out.append(json.loads(line[len("RESULT "):]))
    return out


def row(label: str, values: list[float], cpu: list[float] | None = None) -> list[object]:
    return [label, f"{median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}",
            f"{median(cpu):.3f}" if cpu else "", len(values)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="tiny store, 2 repeats; print only")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.points, args.repeats = 20, 2000, 2
    with tempfile.TemporaryDirectory(prefix="ren-tui-startup-") as tmp:
        empty, big, bare = Path(tmp) / "empty", Path(tmp) / "big", Path(tmp) / "bare_app.py"
        empty.mkdir()
        bare.write_text(BARE_APP)
        t0 = time.perf_counter()
        ids = build_store(big, args.runs, args.points)
        built = time.perf_counter() - t0
        newest = f"run-{args.runs - 1:03d}"
        shown: list[float] = []
        cpu: dict[str, list[float]] = {name: [] for name in ("bare", "ren_empty", "ren_big", "imp_bare", "imp_ren")}

        def ren_big() -> float:
            paint, runs = first_paint([str(REN_TUI), "--store", str(big)], [REN_MARKER, newest], cpu["ren_big"])
            shown.append(runs)
            return paint

        paint = alternate({
            "bare": lambda: first_paint([sys.executable, str(bare)], [BARE_LABEL], cpu["bare"])[0],
            "ren_empty": lambda: first_paint([str(REN_TUI), "--store", str(empty)], [REN_MARKER],
                                             cpu["ren_empty"])[0],
            "ren_big": ren_big,
        }, args.repeats)
        imports = alternate({"bare": lambda: import_time(BARE_IMPORTS, cpu["imp_bare"]),
                             "ren": lambda: import_time(REN_IMPORTS, cpu["imp_ren"])}, args.repeats)
        cold_empty = headless(empty, 0, "-", args.repeats)
        cold_big = headless(big, args.runs, ids[len(ids) // 2], args.repeats)
    bare_s = median(paint["bare"])
    rows = [
        row("bare Textual app (one label): first paint", paint["bare"], cpu["bare"]),
        row("`ren-tui`, empty store: first paint", paint["ren_empty"], cpu["ren_empty"]),
        row(f"`ren-tui`, {args.runs}-run store: first paint", paint["ren_big"], cpu["ren_big"]),
        row(f"`ren-tui`, {args.runs}-run store: newest run on screen", shown),
        row(f"imports only: `{BARE_IMPORTS}`", imports["bare"], cpu["imp_bare"]),
        row(f"imports only: `{REN_IMPORTS}`", imports["ren"], cpu["imp_ren"]),
        row("headless, empty store: Runs screen loaded", [r["startup_s"] for r in cold_empty]),
        row(f"headless, {args.runs}-run store: every run in the table", [r["startup_s"] for r in cold_big]),
        row(f"headless, {args.runs}-run store: start-up settled (warm-up import done)",
            [r["settled_s"] for r in cold_big]),
        row(f"Monitor open, {args.points:,}-point run, to its plotted chart", [r["monitor_s"] for r in cold_big]),
    ]
    bare_cpu = median(cpu["bare"])
    ratios = [
        ["`ren-tui` empty store / bare Textual, first paint", f"{median(paint['ren_empty']) / bare_s:.2f}",
         f"{median(cpu['ren_empty']) / bare_cpu:.2f}"],
        [f"`ren-tui` {args.runs}-run store / bare Textual, first paint", f"{median(paint['ren_big']) / bare_s:.2f}",
         f"{median(cpu['ren_big']) / bare_cpu:.2f}"],
        ["ren-tui / bare, imports only", f"{median(imports['ren']) / median(imports['bare']):.2f}",
         f"{median(cpu['imp_ren']) / median(cpu['imp_bare']):.2f}"],
    ]
    body = (f"Fresh processes, alternating; first paint in a {COLS}x{ROWS} pseudo-terminal. Big store: "
            f"{args.runs} finished runs (built in {built:.0f} s), the Monitor's run holding "
            f"{cold_big[0]['monitor_points']:,} points. CPU: user + system seconds of the launched process "
            "until it was killed, which other load on the machine inflates far less than wall time.\n\n"
            + table(["measure", "median s", "min s", "max s", "CPU median s", "n"], rows)
            + "\n\n" + table(["ratio of medians", "wall", "CPU"], ratios))
    print(body)
    if not args.quick:
        import textual  # noqa: F401 - so that the machine line names its version

        write_section("tui_startup", "ren-tui start-up against a bare Textual app", body)


if __name__ == "__main__":
    main()
