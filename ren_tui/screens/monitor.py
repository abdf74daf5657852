"""Monitor: one run, live — its header (with the trainer's pid and an ETA while it
runs), loss / learning-rate / throughput / eval curves (one at a time, ``c``
switches; no eval chart for a run without a task) and its log, following the newest
line (``L``: the whole log, full screen, searchable).

A worker thread re-reads the run every second and its series only when new points
were flushed; the curves are recomputed only then, and drawn downsampled to the
chart's width. Another reads the lines the log gained. Each posts a message that a
newer one of its kind merges into, so a stalled screen catches up in one redraw.
``s`` smoothing, ``x`` step, samples, wall time or training compute (PFLOPs),
``z`` / ``[`` / ``]`` / ``0`` zoom (kept across the charts); the chart's own keys
(cursor, log scale, series) are in ren_tui.widgets.chart. ``X`` opens the run's kept
predictions (ren_tui.screens.examples).
"""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Log, Static
from textual.worker import Worker, get_current_worker

from engine.display import format_compute, format_duration, format_eta, format_run_scores, format_steps
from engine.errors import RenError
from engine.store import RunRecord
from ren_tui import curves as _curves
from ren_tui.backend import Series
from ren_tui.curves import ChartKeys, parse_range  # noqa: F401  (parse_range: used from here by tests)
from ren_tui.screens import KeepStyles
from ren_tui.screens.log import shown_lines
from ren_tui.text import markup
from ren_tui.widgets.chart import Chart, Curve
from ren_tui.widgets.footer import Footer

REFRESH_S = 1.0
LOG_LINES = 1000  # the log pane keeps the last this many lines (L shows them all)
SMOOTHING = (0.0, 0.6, 0.9, 0.97)
CHARTS = {"loss": "Loss", "lr": "LR", "throughput": "Throughput", "eval": "Eval"}  # name -> label
TITLES = {"loss": "loss", "lr": "learning rate", "throughput": "samples/s", "eval": "eval scores"}
UNSMOOTHED = ("lr",)  # a schedule is drawn as it is
STATUS_STYLE = {"running": "$warning", "finished": "$success", "failed": "$error", "crashed": "$error"}
NO_LOG = "(no log: only runs started by the queue have one)"


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


def curves(series: Series, x: str, batch_size: int = 1) -> tuple[dict[str, Curve], str]:
    """Every charted metric's curve against ``x`` (ren_tui.curves.curves) and the x label."""
    return _curves.curves(series, x, batch_size, keep=chart_of)


def charts_of(record: RunRecord, keys: object) -> list[str]:
    """The charts a run has: an eval chart only for a run with a task to evaluate (a pretraining
    run has none) or one that logged eval scores anyway."""
    evaluated = bool(record.config.get("task")) or any(chart_of(key) == "eval" for key in keys)
    return [name for name in CHARTS if name != "eval" or evaluated]


class MonitorScreen(ChartKeys, KeepStyles, Screen[None]):
    """One run, live: header, one chart at a time, the log following its newest line."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "next_chart", "Chart"),
        Binding("L", "full_log", "Full log"),
        Binding("X", "examples", "Examples", show=False,  # x is the X axis here; Runs opens them with x
                tooltip="the run's kept predictions with their pictures (ren eval task RUN --examples N)"),
        Binding("s", "smoothing", "Smooth"),
        *ChartKeys.CHART_BINDINGS,
        *ChartKeys.CHART_WIDGET_BINDINGS,
    ]
    AUTO_FOCUS = ""  # nothing: the chart's keys act from the screen; tab focuses the log pane to scroll it

    class Loaded(Message):
        """The run as a worker read it: the record, the series and the curves recomputed for them (None:
        unchanged). A newer one replaces it (keeping its curves if the newer has none), so a screen that
        fell behind draws once."""

        def __init__(self, record: RunRecord, series: Series, plotted: tuple[dict[str, Curve], str] | None,
                     drawn: tuple[tuple, str]) -> None:
            super().__init__()
            self.record, self.series, self.plotted, self.drawn = record, series, plotted, drawn

        def can_replace(self, message: Message) -> bool:
            if not isinstance(message, MonitorScreen.Loaded):
                return False
            if message.plotted is None and self.plotted is not None and message.drawn == self.drawn:
                message.plotted = self.plotted
            return message.plotted is not None or self.plotted is None

    class LogRead(Message):
        """Lines the log gained; consecutive ones merge (the newer carries both, in order)."""

        def __init__(self, lines: list[str], exists: bool) -> None:
            super().__init__()
            self.lines, self.exists = lines, exists

        def can_replace(self, message: Message) -> bool:
            if isinstance(message, MonitorScreen.LogRead):
                message.lines[:0] = self.lines
                return True
            return False

    class Failed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.shown = "loss"
        self.charts = list(CHARTS)
        self.smoothing = 0.0
        self.x_mode = "step"
        self.curves: dict[str, Curve] = {}
        self.record: RunRecord | None = None
        self._series: Series | None = None
        self._stamp: tuple = ()
        self._drawn: tuple[tuple, str] | None = None  # (series stamp, x mode) of self.curves
        self._worker: Worker[None] | None = None
        self._log_worker: Worker[None] | None = None
        self._log_position: tuple[int, int] | None = None
        self._log_empty = True

    def compose(self) -> ComposeResult:
        yield Static(f"{self.run_id} · loading…", id="header")
        yield Static(id="controls")
        chart = Chart(TITLES[self.shown], id="chart")
        chart.keys_hint = True
        yield chart
        yield Log(id="log", max_lines=LOG_LINES)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log", Log).border_title = "log (L: full screen)"
        self._show_controls()
        self._refresh()
        self.set_interval(REFRESH_S, self._refresh)

    @property
    def chart(self) -> Chart:
        return self.query_one("#chart", Chart)

    # --- loading --------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        """Start the reads unless they are under way (``force``: replace the run's)."""
        if force or self._worker is None or self._worker.is_finished:
            self._worker = self._load()
        if self._log_worker is None or self._log_worker.is_finished:
            self._log_worker = self._read_log()

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
        except RenError as exc:
            if not worker.is_cancelled:
                self.post_message(self.Failed(str(exc)))
            return
        drawn = (stamp, x_mode)
        batch = int(record.config.get("train", {}).get("batch_size") or 1)
        plotted = curves(series, x_mode, batch) if drawn != self._drawn else None
        if not worker.is_cancelled:
            self.post_message(self.Loaded(record, series, plotted, drawn))

    @work(thread=True, group="monitor-log")
    def _read_log(self) -> None:
        """Read the lines the run's log gained since the last read (the last 64 KB the first time)."""
        try:
            chunk = self.app.backend.read_log(self.run_id, self._log_position)
        except RenError as exc:
            self.post_message(self.LogRead([f"({exc})"], True))
            return
        self._log_position = chunk.position
        self.post_message(self.LogRead(shown_lines(chunk), chunk.position is not None))

    def on_monitor_screen_loaded(self, message: Loaded) -> None:
        """Show what a read found: the header always, the chart when its curves changed (and, after
        the first curves are on screen, focus the chart for its keys: the footer redraws for them)."""
        record, series, plotted, drawn = message.record, message.series, message.plotted, message.drawn
        self.record, self._series, self._stamp = record, series, drawn[0]
        self._show_header(record)
        if plotted is None or drawn[1] != self.x_mode:
            return
        self._drawn = drawn
        self.curves, self.chart.xlabel = plotted
        self.charts = charts_of(record, self.curves)
        if self.shown not in self.charts:
            self.shown = "loss"
        self._show_chart()
        self._show_controls()

    def on_monitor_screen_log_read(self, message: LogRead) -> None:
        """Add the new lines to the log pane: it follows them unless scrolled up to read."""
        log = self.query_one("#log", Log)
        if message.lines:
            if self._log_empty:
                log.clear()
                self._log_empty = False
            log.write_lines(message.lines)
        elif self._log_empty and not log.line_count:
            log.write_line(NO_LOG if not message.exists else "(the log is empty so far)")

    def on_monitor_screen_failed(self, message: Failed) -> None:
        self.query_one("#header", Static).update(markup("[$error]$msg", msg=message.error))

    def _show_chart(self) -> None:
        chart = self.chart
        chart.chart_title = TITLES[self.shown]
        chart.smoothing = 0.0 if self.shown in UNSMOOTHED else self.smoothing
        chart.set_series({key.removeprefix("eval/"): curve for key, curve in self.curves.items()
                          if chart_of(key) == self.shown})

    def _show_header(self, r: RunRecord) -> None:
        style = STATUS_STYLE.get(r.status, "$text-muted")
        live = ""
        if r.status == "running":  # the trainer's own pid once it took over from the queue's runner
            live = " · ETA $eta · " + ("pid $pid" if r.pid else "trainer starting")
        self.query_one("#header", Static).update(markup(
            f"[b]$id[/b] · [{style}]$status[/] · $steps steps · $duration{live} · $device · best $best",
            id=r.id, status=r.status, steps=format_steps(r), duration=format_duration(r),
            eta=format_eta(r, self._series.points if self._series else None), pid=str(r.pid),
            device=r.device or "no device", best=format_run_scores(r, short=True),
        ) + (markup("\n[$text-muted]$compute", compute=compute) if (compute := format_compute(r)) else ""))

    def _show_controls(self) -> None:
        zoom = self.zoom_text()
        tabs = "  ".join(f"[b $accent]{CHARTS[name]}[/]" if name == self.shown else CHARTS[name]
                         for name in self.charts)
        self.query_one("#controls", Static).update(
            f"{tabs}  │  smoothing {self.smoothing:g} · x {self.x_mode} · zoom {zoom}")

    # --- actions --------------------------------------------------------------

    def action_next_chart(self) -> None:
        self.shown = self.charts[(self.charts.index(self.shown) + 1) % len(self.charts)]
        self._show_chart()
        self._show_controls()

    def action_smoothing(self) -> None:
        self.smoothing = SMOOTHING[(SMOOTHING.index(self.smoothing) + 1) % len(SMOOTHING)]
        if self.shown not in UNSMOOTHED:
            self.chart.smoothing = self.smoothing
        self._show_controls()

    def x_mode_changed(self) -> None:
        self._refresh(force=True)

    def action_full_log(self) -> None:
        from ren_tui.screens.log import LogScreen

        self.app.push_screen(LogScreen(self.run_id))

    def action_examples(self) -> None:
        self.app.open_examples(self.run_id)
