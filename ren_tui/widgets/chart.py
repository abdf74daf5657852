"""Line charts of metric series: min/max downsampling, EMA smoothing and a
plotext-backed widget that overlays named series.

Importing this module imports plotext (~40 ms), so only the screens that draw
charts (Monitor, Compare) import it, when they open.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Mapping, Sequence

from rich.console import RenderableType
from textual.reactive import reactive
from textual_plotext import PlotextPlot

Curve = tuple[list[float], list[float]]


def smooth(ys: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average: ``s[i] = alpha * s[i-1] + (1 - alpha) * ys[i]``; alpha 0 is none."""
    if not 0 <= alpha < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {alpha}.")
    if not alpha:
        return list(ys)
    out: list[float] = []
    value = None
    for y in ys:
        value = y if value is None else alpha * value + (1 - alpha) * y
        out.append(value)
    return out


def downsample(xs: Sequence[float], ys: Sequence[float], width: int) -> Curve:
    """At most ``2 * width`` points: ``width`` equal buckets over x, each keeping its
    lowest and highest point (in x order), so spikes survive. Unchanged when short.

    ``ys`` must be finite (NaN has no order).
    """
    if width < 1 or len(xs) <= 2 * width:
        return list(xs), list(ys)
    if not all(map(operator.le, xs, xs[1:])):
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs, ys = [xs[i] for i in order], [ys[i] for i in order]
    lo, hi = xs[0], xs[-1]
    step = (hi - lo) / width
    edges = [0] + [bisect.bisect_left(xs, lo + k * step) for k in range(1, width)] + [len(xs)]
    keep: list[int] = []
    for a, b in zip(edges, edges[1:]):
        if a < b:
            bucket = ys[a:b]
            keep.extend(sorted({a + bucket.index(min(bucket)), a + bucket.index(max(bucket))}))
    return [xs[i] for i in keep], [ys[i] for i in keep]


class Chart(PlotextPlot):
    """Named series overlaid with a legend, smoothed, zoomed to ``x_range`` and
    downsampled to the widget's width whenever it is drawn at a new size or state.

    ``series`` holds the raw curves; ``plotted`` what was last handed to plotext.
    Until the first :meth:`set_series` it shows "loading…" (no axes to build).
    """

    chart_title: reactive[str] = reactive("")
    smoothing: reactive[float] = reactive(0.0)
    x_range: reactive[tuple[float, float] | None] = reactive(None)
    xlabel: reactive[str] = reactive("step")

    def __init__(self, title: str = "", *, xlabel: str = "step", id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.set_reactive(Chart.chart_title, title)
        self.series: dict[str, Curve] = {}
        self.plotted: dict[str, Curve] = {}
        self._version = 0
        self._drawn: tuple[object, ...] | None = None
        self.set_reactive(Chart.xlabel, xlabel)

    def set_series(self, series: Mapping[str, Curve]) -> None:
        """Replace the curves (name -> (xs, ys)) and redraw."""
        self.series = dict(series)
        self._version += 1
        self.refresh()

    def render(self) -> RenderableType:
        if not self._version:
            return "loading…"
        state = (self._version, self.chart_title, self.smoothing, self.x_range, self.xlabel, self.size.width)
        if state != self._drawn:
            self._replot()
            self._drawn = state
        return super().render()

    def _replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.xlabel(self.xlabel)
        self.plotted = {}
        for name, (xs, ys) in self.series.items():
            if not all(map(math.isfinite, ys)):
                finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
                xs, ys = [x for x, _ in finite], [y for _, y in finite]
            ys = smooth(ys, self.smoothing)
            if self.x_range is not None:
                lo, hi = self.x_range
                kept = [(x, y) for x, y in zip(xs, ys) if lo <= x <= hi]
                xs, ys = [x for x, _ in kept], [y for _, y in kept]
            xs, ys = downsample(xs, ys, self.size.width)
            self.plotted[name] = (xs, ys)
            if xs:
                plt.plot(xs, ys, label=name, marker="braille")
        if self.x_range is not None:
            plt.xlim(*self.x_range)
        empty = not any(xs for xs, _ in self.plotted.values())
        plt.title(f"{self.chart_title} (no points yet)" if empty else self.chart_title)
