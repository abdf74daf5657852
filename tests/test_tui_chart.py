"""The chart widget: min/max downsampling, EMA smoothing, and drawing at the widget's width."""

from __future__ import annotations

import math
import random

import pytest
from textual.app import App, ComposeResult

from ren_tui.widgets.chart import Chart, downsample, smooth


def reference_buckets(xs: list[float], ys: list[float], width: int) -> list[set[int]]:
    """Indices of each bucket's lowest and highest point, found the slow way."""
    lo, hi = min(xs), max(xs)
    step = (hi - lo) / width
    out = []
    for k in range(width):
        start = lo + k * step
        members = [i for i, x in enumerate(xs) if x >= start and (k == width - 1 or x < lo + (k + 1) * step)]
        if members:
            values = [ys[i] for i in members]
            out.append({members[values.index(min(values))], members[values.index(max(values))]})
    return out


def noisy_curve(n: int, spike_at: int) -> tuple[list[float], list[float]]:
    rng = random.Random(1)
    xs = [float(i) for i in range(n)]
    ys = [math.exp(-i / n) + rng.uniform(-0.01, 0.01) for i in range(n)]
    ys[spike_at] = 5.0
    return xs, ys


def test_downsample_keeps_the_spike_and_every_buckets_min_and_max() -> None:
    xs, ys = noisy_curve(10_000, spike_at=6_001)
    ys[7_777] = -3.0  # a dip as well
    out_x, out_y = downsample(xs, ys, 80)
    assert len(out_x) <= 160
    assert 5.0 in out_y and -3.0 in out_y
    assert out_x == sorted(out_x)
    kept = {int(x) for x in out_x}
    expected = reference_buckets(xs, ys, 80)
    assert len(expected) == 80
    assert set().union(*expected) == kept
    assert out_y == [ys[int(x)] for x in out_x]


def test_downsample_leaves_short_series_alone_and_sorts_shuffled_ones() -> None:
    xs, ys = [0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0]
    assert downsample(xs, ys, 2) == (xs, ys)
    assert downsample(xs, ys, 0) == (xs, ys)
    long_x, long_y = noisy_curve(1_000, spike_at=500)
    order = list(range(1_000))
    random.Random(2).shuffle(order)
    shuffled = downsample([long_x[i] for i in order], [long_y[i] for i in order], 50)
    assert shuffled == downsample(long_x, long_y, 50)


def test_downsample_of_a_constant_x_keeps_the_extremes() -> None:
    assert downsample([5.0] * 10, [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0], 2) == ([5.0, 5.0], [1.0, 9.0])


def test_smooth_is_an_exponential_moving_average() -> None:
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert smooth([0.0, 1.0, 1.0], 0.5) == [0.0, 0.5, 0.75]
    smoothed = smooth([0.0] * 50 + [1.0] * 50, 0.9)
    assert smoothed[50] == pytest.approx(0.1) and 0.99 < smoothed[-1] < 1.0
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


class ChartApp(App[None]):
    def compose(self) -> ComposeResult:
        yield Chart("loss", id="chart")


async def test_chart_draws_downsampled_to_its_width_smoothed_and_zoomed() -> None:
    xs, ys = noisy_curve(20_000, spike_at=12_000)
    ys[100] = math.nan
    app = ChartApp()
    async with app.run_test(size=(80, 20)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": (xs, ys), "other": (xs[:10], ys[:10])})
        await pilot.pause()
        plotted_x, plotted_y = chart.plotted["loss"]
        assert len(plotted_x) <= 2 * 80 and 5.0 in plotted_y
        assert not any(math.isnan(y) for y in plotted_y)
        assert chart.plotted["other"] == (xs[:10], ys[:10])

        await pilot.resize_terminal(40, 20)
        await pilot.pause()
        assert len(chart.plotted["loss"][0]) <= 2 * 40

        chart.smoothing = 0.9
        await pilot.pause()
        assert max(chart.plotted["loss"][1]) < 1.5  # the spike is averaged away

        chart.x_range = (1_000.0, 2_000.0)
        await pilot.pause()
        zoomed = chart.plotted["loss"][0]
        assert min(zoomed) >= 1_000 and max(zoomed) <= 2_000 and len(zoomed) <= 80

        chart.set_series({})
        await pilot.pause()
        assert chart.plotted == {}
