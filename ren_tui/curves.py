"""Metric series as chart curves against a chosen x axis, and the keys that change the
axis and the zoom (shared by Monitor and Compare): steps, samples seen, wall time or
training compute; ``z`` asks for a range, ``[``/``]`` move half a window, ``0`` shows all."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from textual.binding import Binding

from ren_tui.backend import Series
from ren_tui.widgets.chart import Chart

Curve = tuple[list[float], list[float]]

X_MODES = ("step", "samples", "time", "compute")
PFLOPS = "compute/pflops"
_RANGE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:-|:|\.\.|\s)\s*(\d+(?:\.\d*)?)\s*$")


def parse_range(text: str) -> tuple[float, float]:
    """``"100-500"`` (or ``100:500``, ``100..500``, ``100 500``) -> ``(100.0, 500.0)``."""
    match = _RANGE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a range like 100-500.")
    lo, hi = sorted((float(match.group(1)), float(match.group(2))))
    if lo == hi:
        raise ValueError(f"{text!r} is an empty range.")
    return lo, hi


def pflops_per_step(points: list[dict]) -> float | None:
    """Training compute per step from the run's cumulative ``compute/pflops`` points (it
    grows with samples seen, so linearly in steps); None when the run logged none."""
    last = next((p for p in reversed(points) if PFLOPS in p and p["step"] > 0), None)
    return None if last is None else last[PFLOPS] / last["step"]


def curves(series: Series, x: str, batch_size: int = 1, keep: Callable[[str], object] = lambda key: True,
           unit: tuple[str, float] | None = None) -> tuple[dict[str, Curve], str]:
    """The curve of every metric ``keep(key)`` accepts against ``x`` ("step", "samples" seen,
    i.e. step x ``batch_size``, wall "time", or training "compute" spent in PFLOPs) and the x
    label; wall time is in ``unit`` (name, seconds), by default s, min or h, whichever reads
    best. One pass over the points."""
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
                if not keep(key):
                    skip.add(key)
                    continue
                curve = out[key] = ([], [])
            curve[0].append(at)
            curve[1].append(value)
    if x != "time":
        return out, {"samples": "samples seen", "compute": "training compute (PFLOPs)"}.get(x, "step") + fallback
    name, scale = unit or time_unit(max((xs[-1] for xs, _ in out.values()), default=0.0))
    if scale != 1.0:
        out = {key: ([t / scale for t in xs], ys) for key, (xs, ys) in out.items()}
    return out, f"wall time ({name})"


def time_unit(span_s: float) -> tuple[str, float]:
    """The unit wall times up to ``span_s`` seconds read best in, and its length in seconds."""
    return ("h", 3600.0) if span_s >= 7200 else ("min", 60.0) if span_s >= 120 else ("s", 1.0)


def forwarded(binding: Binding) -> Binding:
    """The chart's ``binding`` as a screen's: its action ``name(args)`` run on the chart (``chart('name', args)``)."""
    name, _, args = binding.action.partition("(")
    args = args.removesuffix(")")
    return dataclasses.replace(binding, action=f"chart({name!r}{', ' + args if args else ''})")


class ChartKeys:
    """The x-axis and zoom keys of a screen with a :class:`Chart` (``self.chart``) whose curves it
    computes for ``self.x_mode``: it redraws them in :meth:`x_mode_changed` and shows the state
    in :meth:`_show_controls`."""

    CHART_BINDINGS = [
        Binding("x", "x_axis", "X axis"),
        Binding("z", "zoom", "Zoom"),
        Binding("left_square_bracket", "shift(-1)", "◂ Window"),
        Binding("right_square_bracket", "shift(1)", "Window ▸"),
        Binding("0", "reset_zoom", "Reset zoom"),
    ]
    # The chart's own keys (ren_tui.widgets.chart.Chart.BINDINGS) for a screen where they act without
    # the chart having focus: focusing it on opening would redraw the footer, which costs more than the chart.
    CHART_WIDGET_BINDINGS = [forwarded(binding) for binding in Chart.BINDINGS]
    x_mode = "step"
    chart: Chart

    def action_chart(self, action: str, *args: int) -> None:
        """Run one of the chart's key actions."""
        getattr(self.chart, f"action_{action}")(*args)

    def x_mode_changed(self) -> None:
        raise NotImplementedError

    def _show_controls(self) -> None:
        raise NotImplementedError

    def zoom_text(self) -> str:
        x_range = self.chart.x_range
        return "all" if x_range is None else f"{x_range[0]:g}-{x_range[1]:g}"

    def action_x_axis(self) -> None:
        """Next x axis: step, samples seen, wall time, training compute."""
        self.x_mode = X_MODES[(X_MODES.index(self.x_mode) + 1) % len(X_MODES)]
        self._set_range(None)
        self.x_mode_changed()

    def action_zoom(self) -> None:
        from ren_tui.dialogs import Prompt

        def zoom(answer: str | None) -> None:
            if answer is None:
                return
            if not answer.strip():
                self._set_range(None)
                return
            try:
                self._set_range(parse_range(answer))
            except ValueError as exc:
                self.notify(str(exc), severity="error", markup=False)  # type: ignore[attr-defined]

        current = "" if self.chart.x_range is None else self.zoom_text()
        prompt = Prompt(f"Show the x range ({self.chart.xlabel})", current, "e.g. 100-500; empty shows all")
        self.app.push_screen(prompt, zoom)  # type: ignore[attr-defined]

    def action_shift(self, direction: int) -> None:
        """Without zoom, show the first or last half; with zoom, move by half a window."""
        x_range = self.chart.shifted(direction)
        if x_range is None:
            self.notify("No points yet.")  # type: ignore[attr-defined]
            return
        self._set_range(x_range)

    def action_reset_zoom(self) -> None:
        self._set_range(None)

    def _set_range(self, x_range: tuple[float, float] | None) -> None:
        self.chart.x_range = x_range
        self._show_controls()
