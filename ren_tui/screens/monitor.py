"""Monitor: one run, live — its header, loss / learning-rate / throughput / eval
curves (one at a time, ``c`` switches) and the end of its log.

A worker thread re-reads the run every second and its series only when new points
were flushed; the curves are recomputed only then, and drawn downsampled to the
chart's width. ``s`` smoothing, ``x`` step, samples, wall time or training compute
(PFLOPs), ``z`` / ``[`` / ``]`` / ``0``
zoom (kept across the charts).
"""

from __future__ import annotations

import re

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, get_current_worker

from engine.display import format_compute, format_duration, format_run_scores, format_steps
from engine.errors import RenError
from engine.store import RunRecord
from ren_tui.backend import Series
from ren_tui.dialogs import Prompt
from ren_tui.text import markup, safe
from ren_tui.widgets.chart import Chart, Curve

REFRESH_S = 1.0
LOG_LINES = 50
SMOOTHING = (0.0, 0.6, 0.9, 0.97)
CHARTS = {"loss": "Loss", "lr": "LR", "throughput": "Throughput", "eval": "Eval"}  # name -> label
TITLES = {"loss": "loss", "lr": "learning rate", "throughput": "samples/s", "eval": "eval scores"}
UNSMOOTHED = ("lr",)  # a schedule is drawn as it is
STATUS_STYLE = {"running": "$warning", "finished": "$success", "failed": "$error", "crashed": "$error"}
_RANGE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:-|:|\.\.|\s)\s*(\d+(?:\.\d*)?)\s*$")


def chart_of(key: str) -> str | None:
    """Which chart draws metric ``key`` (None: not drawn)."""
    if key.startswith("loss"):
        return "loss"
    if key == "lr":
        return "lr"
    if key == "samples_per_s":
        return "throughput"
    if key.startswith("eval/"):
        return "eval"
    return None


def parse_range(text: str) -> tuple[float, float]:
    """``"100-500"`` (or ``100:500``, ``100..500``, ``100 500``) -> ``(100.0, 500.0)``."""
    match = _RANGE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a range like 100-500.")
    lo, hi = sorted((float(match.group(1)), float(match.group(2))))
    if lo == hi:
        raise ValueError(f"{text!r} is an empty range.")
    return lo, hi


X_MODES = ("step", "samples", "time", "compute")
PFLOPS = "compute/pflops"


def pflops_per_step(points: list[dict]) -> float | None:
    """Training compute per step from the run's cumulative ``compute/pflops`` points (it
    grows with samples seen, so linearly in steps); None when the run logged none."""
    last = next((p for p in reversed(points) if PFLOPS in p and p["step"] > 0), None)
    return None if last is None else last[PFLOPS] / last["step"]


def curves(series: Series, x: str, batch_size: int = 1) -> tuple[dict[str, Curve], str]:
    """Every charted metric's curve against ``x`` ("step", "samples" seen, i.e. step x
    ``batch_size``, wall "time", or training "compute" spent in PFLOPs) and the x label;
    wall time is in s, min or h, whichever reads best. One pass over the points."""
    points = series.points
    t0 = points[0]["time"] if points else 0.0
    per_step = pflops_per_step(points) if x == "compute" else None
    if x == "compute" and per_step is None:  # a run from before compute accounting: steps stand in
        x, fallback = "step", " (no compute recorded)"
    else:
        fallback = ""
    scale = {"samples": batch_size, "compute": per_step}.get(x) or 1
    out: dict[str, Curve] = {}
    skip = {"step", "time"}
    for point in points:
        at = point["time"] - t0 if x == "time" else point["step"] * scale
        for key, value in point.items():
            if key in skip:
                continue
            curve = out.get(key)
            if curve is None:
                if chart_of(key) is None:
                    skip.add(key)
                    continue
                curve = out[key] = ([], [])
            curve[0].append(at)
            curve[1].append(value)
    if x != "time":
        return out, {"samples": "samples seen", "compute": "training compute (PFLOPs)"}.get(x, "step") + fallback
    span = max((xs[-1] for xs, _ in out.values()), default=0.0)
    unit, scale = ("h", 3600.0) if span >= 7200 else ("min", 60.0) if span >= 120 else ("s", 1.0)
    if scale != 1.0:
        out = {key: ([t / scale for t in xs], ys) for key, (xs, ys) in out.items()}
    return out, f"wall time ({unit})"


class MonitorScreen(Screen[None]):
    """One run, live: header, one chart at a time, log tail."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "next_chart", "Chart"),
        Binding("s", "smoothing", "Smooth"),
        Binding("x", "x_axis", "X axis"),
        Binding("z", "zoom", "Zoom"),
        Binding("left_square_bracket", "shift(-1)", "◂ Window"),
        Binding("right_square_bracket", "shift(1)", "Window ▸"),
        Binding("0", "reset_zoom", "Reset zoom"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.shown = "loss"
        self.smoothing = 0.0
        self.x_mode = "step"
        self.curves: dict[str, Curve] = {}
        self._series: Series | None = None
        self._stamp: tuple = ()
        self._drawn: tuple[tuple, str] | None = None  # (series stamp, x mode) of self.curves
        self._worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        yield Static(f"{self.run_id} · loading…", id="header")
        yield Static(id="controls")
        yield Chart(TITLES[self.shown], id="chart")
        yield Static(id="log", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log", Static).border_title = "log"
        self._show_controls()
        self._refresh()
        self.set_interval(REFRESH_S, self._refresh)

    @property
    def chart(self) -> Chart:
        return self.query_one("#chart", Chart)

    # --- loading --------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        """Start a read unless one is under way (``force``: replace it)."""
        if force or self._worker is None or self._worker.is_finished:
            self._worker = self._load()

    @work(thread=True, exclusive=True, group="monitor-load")
    def _load(self) -> None:
        worker = get_current_worker()
        backend = self.app.backend
        x_mode = self.x_mode
        try:
            record = backend.run(self.run_id)
            stamp = backend.series_stamp(self.run_id)
            series = self._series
            if series is None or stamp != self._stamp:
                series = backend.series(self.run_id)
            lines = backend.log_tail(self.run_id, LOG_LINES)
        except RenError as exc:
            if not worker.is_cancelled:
                self.app.call_from_thread(self._failed, str(exc))
            return
        drawn = (stamp, x_mode)
        batch = int(record.config.get("train", {}).get("batch_size") or 1)
        plotted = curves(series, x_mode, batch) if drawn != self._drawn else None
        if not worker.is_cancelled:
            self.app.call_from_thread(self._apply, record, series, plotted, drawn, lines)

    def _apply(self, record: RunRecord, series: Series, plotted: tuple[dict[str, Curve], str] | None,
               drawn: tuple[tuple, str], lines: list[str]) -> None:
        self._series, self._stamp = series, drawn[0]
        self._show_header(record)
        log = self.query_one("#log", Static)
        log.update(safe("\n".join(lines), lines=True) if lines else "(no log: only runs started by the queue have one)")
        if plotted is None or drawn[1] != self.x_mode:
            return
        self._drawn = drawn
        self.curves, self.chart.xlabel = plotted
        self._show_chart()

    def _show_chart(self) -> None:
        chart = self.chart
        chart.chart_title = TITLES[self.shown]
        chart.smoothing = 0.0 if self.shown in UNSMOOTHED else self.smoothing
        chart.set_series({key.removeprefix("eval/"): curve for key, curve in self.curves.items()
                          if chart_of(key) == self.shown})

    def _failed(self, message: str) -> None:
        self.query_one("#header", Static).update(markup("[$error]$msg", msg=message))

    def _show_header(self, r: RunRecord) -> None:
        style = STATUS_STYLE.get(r.status, "$text-muted")
        self.query_one("#header", Static).update(markup(
            f"[b]$id[/b] · [{style}]$status[/] · $steps steps · $duration · $device · best $best",
            id=r.id, status=r.status, steps=format_steps(r), duration=format_duration(r),
            device=r.device or "no device", best=format_run_scores(r, short=True),
        ) + (markup("\n[$text-muted]$compute", compute=compute) if (compute := format_compute(r)) else ""))

    def _show_controls(self) -> None:
        x_range = self.chart.x_range
        zoom = "all" if x_range is None else f"{x_range[0]:g}-{x_range[1]:g}"
        tabs = "  ".join(f"[b $accent]{label}[/]" if name == self.shown else label for name, label in CHARTS.items())
        self.query_one("#controls", Static).update(
            f"{tabs}  │  smoothing {self.smoothing:g} · x {self.x_mode} · zoom {zoom}")

    # --- actions --------------------------------------------------------------

    def action_next_chart(self) -> None:
        names = list(CHARTS)
        self.shown = names[(names.index(self.shown) + 1) % len(names)]
        self._show_chart()
        self._show_controls()

    def action_smoothing(self) -> None:
        self.smoothing = SMOOTHING[(SMOOTHING.index(self.smoothing) + 1) % len(SMOOTHING)]
        if self.shown not in UNSMOOTHED:
            self.chart.smoothing = self.smoothing
        self._show_controls()

    def action_x_axis(self) -> None:
        self.x_mode = X_MODES[(X_MODES.index(self.x_mode) + 1) % len(X_MODES)]
        self._set_range(None)
        self._refresh(force=True)

    def action_zoom(self) -> None:
        def zoom(answer: str | None) -> None:
            if answer is None:
                return
            if not answer.strip():
                self._set_range(None)
                return
            try:
                self._set_range(parse_range(answer))
            except ValueError as exc:
                self.notify(str(exc), severity="error", markup=False)

        x_range = self.chart.x_range
        current = "" if x_range is None else f"{x_range[0]:g}-{x_range[1]:g}"
        prompt = Prompt(f"Show the x range ({self.chart.xlabel})", current, "e.g. 100-500; empty shows all")
        self.app.push_screen(prompt, zoom)

    def action_shift(self, direction: int) -> None:
        """Without zoom, show the first or last half; with zoom, move by half a window."""
        xs = [x for curve_xs, _ in self.curves.values() for x in curve_xs[:1] + curve_xs[-1:]]
        if not xs:
            self.notify("No points yet.")
            return
        lo, hi = min(xs), max(xs)
        if self.chart.x_range is None:
            half = (hi - lo) / 2
            self._set_range((lo, lo + half) if direction < 0 else (hi - half, hi))
            return
        start, end = self.chart.x_range
        width = end - start
        start = min(max(start + direction * width / 2, lo), max(hi - width, lo))
        self._set_range((start, start + width))

    def action_reset_zoom(self) -> None:
        self._set_range(None)

    def _set_range(self, x_range: tuple[float, float] | None) -> None:
        self.chart.x_range = x_range
        self._show_controls()
