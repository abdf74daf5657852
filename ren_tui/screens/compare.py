"""Compare: several runs side by side — one metric's curves overlaid, a score table,
and the config keys where each run differs from a baseline run.

``m``/``M`` go to the next/previous metric among those any of the runs logged (the
chart names the runs without it), ``s`` smoothing, ``x`` the x axis (steps, samples
seen, wall time, training compute) and ``z``/``[``/``]``/``0`` the zoom as in the
Monitor; the chart's own keys (cursor, log scale, series) work once it has focus;
``b`` the baseline, ``v`` switches the score table between runs and variants (the study
report's table: downstream scores over seeds, pretraining compute, and what each
variant saves against the first run), ``e`` exports the score table as Markdown,
LaTeX, CSV and JSON with the config keys that differ from the baseline (and copies
the Markdown to the clipboard), ``r`` re-reads the runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Static
from textual.worker import get_current_worker

from engine.errors import RenError
from engine.store import RunRecord
from ren_tui.backend import Series
from ren_tui.curves import ChartKeys, Curve, curves, pflops_per_step, time_unit
from ren_tui.export import (
    MISSING,
    Export,
    clipboard_problem,
    config_diff,
    export_stem,
    flatten,
    format_value,
    raw_report_rows,
    raw_score_rows,
    score_rows,
)
from ren_tui.screens import KeepStyles
from ren_tui.text import cell, safe
from ren_tui.widgets.chart import Chart
from ren_tui.widgets.footer import Footer

if TYPE_CHECKING:
    from engine.report import ReportTable

SMOOTHING = (0.0, 0.6, 0.9, 0.97)


def shared_metrics(series: list[Series]) -> list[str]:
    """Metrics every run logged, in the first run's order."""
    if not series:
        return []
    others = [set(s.keys()) for s in series[1:]]
    return [key for key in series[0].keys() if all(key in keys for keys in others)]


def any_metrics(series: list[Series]) -> list[str]:
    """Metrics any of the runs logged: those every run logged first (in the first run's order),
    then the others in the order the runs logged them."""
    shared = shared_metrics(series)
    return list(dict.fromkeys([*shared, *(key for s in series for key in s.keys())]))


def metric_curves(records: list[RunRecord], series: list[Series], labels: list[str], metric: str,
                  x: str) -> tuple[dict[str, Curve], str]:
    """Each run's curve of ``metric`` (runs without it left out) against the x axis ``x`` as the
    Monitor draws it, on one scale: wall time in one unit for all, and training compute only when
    every run recorded it (else steps for all, naming the runs without)."""
    fallback = ""
    if x == "compute":
        missing = [label for label, s in zip(labels, series)
                   if metric in s.keys() and pflops_per_step(s.points) is None]
        if missing:
            x, fallback = "step", f" (no compute recorded by {', '.join(missing)})"
    unit = None
    if x == "time":
        unit = time_unit(max((s.points[-1]["time"] - s.points[0]["time"] for s in series if s.points), default=0.0))
    out: dict[str, Curve] = {}
    xlabel = "step"
    for label, record, s in zip(labels, records, series):
        batch = int(record.config.get("train", {}).get("batch_size") or 1)
        found, xlabel = curves(s, x, batch, keep=lambda key: key == metric, unit=unit)
        if metric in found:
            out[label] = found[metric]
    return out, xlabel + fallback


def run_labels(records: list[RunRecord]) -> list[str]:
    """Run names, with the end of the id added where two runs share a name (control characters escaped:
    plain text, for the chart's legend; ren_tui.text.cell for a table)."""
    names = [r.name for r in records]
    return [safe(f"{r.name} ({r.id[-4:]})" if names.count(r.name) > 1 else r.name) for r in records]


class CompareScreen(ChartKeys, KeepStyles, Screen[None]):
    """Curves, scores and config differences of ``run_ids``; exports go to
    ``export_dir`` (default: ``./ren-exports``)."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("m", "metric(1)", "Metric"),
        Binding("M", "metric(-1)", "Previous metric", show=False),
        Binding("s", "smoothing", "Smooth"),
        *ChartKeys.CHART_BINDINGS,
        Binding("b", "baseline", "Baseline"),
        Binding("v", "view", "Runs/variants"),
        Binding("e", "export", "Export"),
        Binding("r", "reload", "Reload"),
    ]

    def __init__(self, run_ids: list[str], export_dir: Path | None = None) -> None:
        super().__init__()
        self.run_ids = list(run_ids)
        self.export_dir = export_dir
        self.records: list[RunRecord] = []
        self.series: list[Series] = []
        self.metrics: list[str] = []
        self.metric: str | None = None
        self.baseline = 0
        self.smoothing = 0.0
        self.x_mode = "step"
        self.view = "runs"
        self.report: ReportTable | None = None

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="controls")
        yield Chart(id="curves")
        yield DataTable(id="scores", zebra_stripes=True, cursor_type="row")
        yield DataTable(id="diff", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#scores", DataTable).border_title = "scores"
        self._load()

    @property
    def chart(self) -> Chart:
        return self.query_one("#curves", Chart)

    @property
    def labels(self) -> list[str]:
        return run_labels(self.records)

    @work(thread=True, exclusive=True, group="compare-load")
    def _load(self) -> None:
        worker = get_current_worker()
        backend = self.app.backend
        try:
            records = [backend.run(run_id) for run_id in self.run_ids]
            series = [backend.series(r.id) for r in records]
            report = backend.report([r.id for r in records])
        except RenError as exc:
            if not worker.is_cancelled:
                self.app.call_from_thread(self._failed, str(exc))
            return
        if not worker.is_cancelled:
            self.app.call_from_thread(self._apply, records, series, report)

    def _apply(self, records: list[RunRecord], series: list[Series], report: ReportTable | None = None) -> None:
        self.records, self.series, self.report = records, series, report
        self.metrics = any_metrics(series)
        if self.metric not in self.metrics:
            self.metric = "loss" if "loss" in self.metrics else next(iter(self.metrics), None)
        self.baseline = min(self.baseline, max(len(records) - 1, 0))
        self._show_curves()
        self._show_scores()
        self._show_diff()

    def _failed(self, message: str) -> None:
        self.query_one("#controls", Static).update(Text(message))
        self.notify(message, severity="error", markup=False)

    # --- panels ---------------------------------------------------------------

    def _show_controls(self) -> None:
        base = self.labels[self.baseline] if self.records else "-"
        where = f" ({self.metrics.index(self.metric) + 1}/{len(self.metrics)})" if self.metric else ""
        self.query_one("#controls", Static).update(Text(
            f"metric {self.metric or '(none logged)'}{where} · smoothing {self.smoothing:g} · x {self.x_mode} · "
            f"zoom {self.zoom_text()} · baseline {base}"))

    def _show_curves(self) -> None:
        chart = self.chart
        if self.metric is None:
            chart.chart_title = "no metric logged by these runs"
            chart.set_series({})
            self._show_controls()
            return
        shown, chart.xlabel = metric_curves(self.records, self.series, self.labels, self.metric, self.x_mode)
        without = [label for label in self.labels if label not in shown]
        chart.chart_title = self.metric + (f" (not logged by {', '.join(without)})" if without else "")
        chart.smoothing = self.smoothing
        chart.set_series(shown)
        self._show_controls()

    def x_mode_changed(self) -> None:
        self._show_curves()

    def score_table(self) -> tuple[list[str], list[list[str]]]:
        """The score table shown and exported: one row per run, or per variant."""
        if self.view == "variants" and self.report is not None:
            return self.report.headers(), self.report.cells()
        return score_rows(self.records)

    def _show_scores(self) -> None:
        headers, rows = self.score_table()
        table = self.query_one("#scores", DataTable)
        table.clear(columns=True)
        table.add_columns(*map(cell, headers))
        keys = ([r.variant for r in self.report.rows] if self.view == "variants" and self.report is not None
                else [r.id for r in self.records])
        for key, row in zip(keys, rows):
            table.add_row(*(cell(value) if isinstance(value, str) else value for value in row), key=key)
        table.border_title = ("variants: scores over seeds, pretraining compute, savings against the first run"
                              if self.view == "variants" else "scores")

    def _show_diff(self) -> None:
        table = self.query_one("#diff", DataTable)
        table.clear(columns=True)
        if not self.records:
            return
        base = self.records[self.baseline]
        labels = self.labels
        others = [(label, r) for i, (label, r) in enumerate(zip(labels, self.records)) if i != self.baseline]
        diffs = {r.id: {key: other for key, _, other in config_diff(base.config, r.config)} for _, r in others}
        keys = list(dict.fromkeys(key for diff in diffs.values() for key in diff))
        base_values = flatten(base.config)
        table.add_columns("key", cell(f"{labels[self.baseline]} (baseline)"), *(cell(label) for label, _ in others))
        for key in keys:
            cells = [cell(format_value(diffs[r.id][key])) if key in diffs[r.id] else Text("=", style="dim")
                     for _, r in others]
            table.add_row(cell(key), cell(format_value(base_values.get(key, MISSING))), *cells, key=key)
        table.border_title = (f"config: {len(keys)} key{'s' * (len(keys) != 1)} differ from the baseline"
                              if keys else "config: every run matches the baseline")

    # --- actions --------------------------------------------------------------

    def action_metric(self, step: int) -> None:
        if self.metrics:
            self.metric = self.metrics[(self.metrics.index(self.metric) + step) % len(self.metrics)]
            self._show_curves()

    def action_smoothing(self) -> None:
        self.smoothing = SMOOTHING[(SMOOTHING.index(self.smoothing) + 1) % len(SMOOTHING)]
        self.chart.smoothing = self.smoothing
        self._show_controls()

    def action_baseline(self) -> None:
        if self.records:
            self.baseline = (self.baseline + 1) % len(self.records)
            self._show_diff()
            self._show_controls()

    def action_view(self) -> None:
        self.view = "runs" if self.view == "variants" else "variants"
        self._show_scores()

    def action_reload(self) -> None:
        self._load()

    def action_export(self) -> None:
        """Write the score table (Markdown, LaTeX, CSV and JSON) and the config keys that differ from the
        baseline; copy the Markdown to the clipboard (ren_tui.export)."""
        if not self.records:
            self.notify("Nothing to export yet.", severity="warning")
            return
        headers, rows = self.score_table()
        variants = self.view == "variants" and self.report is not None
        raw_headers, raw_rows = raw_report_rows(self.report) if variants else raw_score_rows(self.records)
        export = Export(headers, rows, raw_headers, raw_rows, self.records, self.baseline,
                        "variants" if variants else "runs")
        directory = (self.export_dir or Path.cwd() / "ren-exports").absolute()
        try:
            paths = export.write(directory, export_stem(r.id for r in self.records))
        except OSError as exc:
            self.notify(f"Cannot write the export to {directory}: {exc.strerror or exc}.", severity="error",
                        markup=False)
            return
        markdown = export.markdown()
        self.app.copy_to_clipboard(markdown)
        problem = clipboard_problem(os.environ, len(markdown.encode()))
        copied = (f"The Markdown may not be on your clipboard: {problem}. It is in {paths[0]}." if problem
                  else "Markdown copied to the clipboard.")
        self.notify(f"{copied}\n" + "\n".join(map(str, paths)), title="Exported", markup=False,
                    severity="warning" if problem else "information", timeout=15 if problem else 8)
