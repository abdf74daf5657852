"""The chart widget: min/max downsampling, EMA smoothing, and drawing at the widget's width."""

from __future__ import annotations

import math
import random
import re

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


# --- what a TensorBoard user expects of a chart (issue 17) ----------------------------------------------

BRAILLE = range(0x2801, 0x2900)  # a braille cell with at least one dot


def screen_lines(app: App) -> list[str]:
    """The terminal's text as the app paints it, one string per row."""
    return [strip.text.rstrip() for strip in app.screen._compositor.render_strips()]


def plot_rows(lines: list[str]) -> list[str]:
    """The rows inside the plot's axes: those with the y axis (``┤`` or ``│`` after the labels)."""
    return [line for line in lines if "┤" in line or ("│" in line and "└" not in line)]


def cells(row: str) -> str:
    """A plot row's cells, right of its y axis."""
    return re.split("[┤│]", row, maxsplit=1)[1]


def decaying(n: int, scale: float = 1.0, offset: float = 0.0) -> tuple[list[float], list[float]]:
    return [float(i) for i in range(1, n + 1)], [offset + scale * math.exp(-i / (n / 3)) for i in range(1, n + 1)]


async def test_chart_cursor_reads_out_step_and_value_of_every_series(ren_home) -> None:
    loss_x, loss_y = decaying(500)
    eval_x = [float(s) for s in range(50, 501, 50)]
    eval_y = [s / 1000 for s in range(50, 501, 50)]
    app = ChartApp()
    async with app.run_test(size=(100, 24)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": (loss_x, loss_y), "acc": (eval_x, eval_y)})
        chart.focus()
        await pilot.pause()
        await pilot.press("end")  # the cursor on the newest point
        await pilot.pause()
        readout = screen_lines(app)[-1]
        assert readout.startswith("step 500") and f"loss {loss_y[-1]:.4g}" in readout and "acc 0.5" in readout
        await pilot.press("home")
        await pilot.pause()
        assert screen_lines(app)[-1].startswith("step 1 ") and f"loss {loss_y[0]:.4g}" in screen_lines(app)[-1]
        assert "acc 0.05 @50" in screen_lines(app)[-1]  # the nearest eval point, with its own step
        steps = []
        for _ in range(5):
            await pilot.press("right")
            await pilot.pause()
            steps.append(int(screen_lines(app)[-1].split()[1]))
        assert steps == sorted(steps) and len(set(steps)) == 5 and steps[-1] < 100  # one column at a time
        await pilot.press("left", "comma")
        await pilot.pause()
        assert int(screen_lines(app)[-1].split()[1]) < steps[-1]
        value = loss_y[loss_x.index(float(screen_lines(app)[-1].split()[1]))]
        assert f"loss {value:.4g}" in screen_lines(app)[-1]


async def test_chart_log_scale_toggles_and_refuses_values_at_or_below_zero(ren_home) -> None:
    xs = [float(i) for i in range(1, 101)]
    ys = [10.0 ** (-i / 25) for i in range(1, 101)]  # 4 decades, a straight line in log scale
    app = ChartApp()
    async with app.run_test(size=(80, 24)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": (xs, ys)})
        chart.focus()
        await pilot.pause()
        linear = "\n".join(screen_lines(app))
        await pilot.press("l")
        await pilot.pause()
        assert chart.log_y
        lines = screen_lines(app)
        assert "log" in lines[0]
        labels = [line.split("┤")[0].strip() for line in plot_rows(lines) if "┤" in line]
        assert {"0.001", "0.01", "0.1"} <= set(labels)  # decades as ticks
        await pilot.press("l")
        await pilot.pause()
        assert not chart.log_y and "\n".join(screen_lines(app)) == linear

        chart.set_series({"loss": (xs, ys), "margin": (xs, [y - 0.5 for y in ys])})
        await pilot.pause()
        await pilot.press("l")
        await pilot.pause()
        assert not chart.log_y
        notes = [n.message for n in app._notifications]
        assert any("margin" in note and "log" in note for note in notes)


async def test_chart_series_are_shown_and_hidden_from_the_legend(ren_home) -> None:
    a, b, c = decaying(200, 3.0), decaying(200, 2.0), decaying(200, 1.0)
    app = ChartApp()
    async with app.run_test(size=(80, 24)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": a, "loss_mlm": b, "loss_itm": c})
        chart.focus()
        await pilot.pause()
        await pilot.press("down", "space")  # the second series
        await pilot.pause()
        assert list(chart.plotted) == ["loss", "loss_itm"]
        await pilot.press("up", "space")  # the first
        await pilot.pause()
        assert list(chart.plotted) == ["loss_itm"]
        ys = chart.plotted["loss_itm"][1]
        labels = [float(line.split("┤")[0]) for line in plot_rows(screen_lines(app)) if "┤" in line]
        assert max(labels) <= max(ys) * 1.1  # the axes fit the series still shown
        await pilot.press("space")
        await pilot.pause()
        assert list(chart.plotted) == ["loss", "loss_itm"]
        legend = next(line for line in screen_lines(app) if "loss_mlm" in line)
        chart.set_series({"loss": a, "loss_mlm": b, "loss_itm": c})  # new points keep the choice
        await pilot.pause()
        assert list(chart.plotted) == ["loss", "loss_itm"]
        assert legend in screen_lines(app)
        x0 = legend.index("loss_mlm")
        await pilot.click(Chart, offset=(x0, screen_lines(app).index(legend)))  # a click on it shows it again
        await pilot.pause()
        assert list(chart.plotted) == ["loss", "loss_mlm", "loss_itm"]


async def test_chart_draws_raw_faint_under_smoothed_bold(ren_home) -> None:
    xs, ys = noisy_curve(2_000, spike_at=1_200)
    app = ChartApp()
    async with app.run_test(size=(80, 24)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": (xs, ys)})
        chart.smoothing = 0.9
        await pilot.pause()
        assert 5.0 in chart.plotted_raw["loss"][1]  # the raw spike is still drawn
        assert max(chart.plotted["loss"][1]) < 1.5  # the smoothed curve has averaged it away
        drawn = {(seg.style.color.triplet, bool(seg.style.bold)) for strip in app.screen._compositor.render_strips()
                 for seg in strip if any(ord(ch) in BRAILLE for ch in seg.text)}
        bold = {colour for colour, is_bold in drawn if is_bold}
        faint = {colour for colour, is_bold in drawn if not is_bold}
        assert bold and faint  # Textual draws dim text in a colour blended toward the background: darker here
        assert min(map(sum, faint)) < min(map(sum, bold))
        chart.smoothing = 0.0
        await pilot.pause()
        assert chart.plotted_raw == {}


async def test_chart_step_axis_has_integer_ticks(ren_home) -> None:
    app = ChartApp()
    async with app.run_test(size=(80, 20)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])})
        await pilot.pause()
        lines = screen_lines(app)
        axis = next(i for i, line in enumerate(lines) if "└" in line)
        ticks = lines[axis + 1].split()
        assert len(ticks) >= 3 and all(tick.isdigit() for tick in ticks), ticks
        assert [int(t) for t in ticks] == sorted({int(t) for t in ticks})
        chart.set_series({"loss": ([0.0, 0.25, 0.5], [1.0, 2.0, 3.0])})  # wall time in minutes: fractions stay
        await pilot.pause()
        lines = screen_lines(app)
        axis = next(i for i, line in enumerate(lines) if "└" in line)
        assert any("." in tick for tick in lines[axis + 1].split())


async def test_chart_legend_never_covers_the_data(ren_home) -> None:
    app = ChartApp()
    async with app.run_test(size=(80, 20)) as pilot:
        chart = app.query_one(Chart)
        chart.set_series({"loss": decaying(300, 4.0), "loss_mlm": decaying(300, 3.0)})  # both start top left
        await pilot.pause()
        lines = screen_lines(app)
        legend = [line for line in lines if "loss_mlm" in line]
        assert legend and not any(ch in line for line in legend for ch in "│┤┼└")
        assert "".join(cells(row)[:3] for row in plot_rows(lines)[:2]).strip()  # the highest points, top left



async def test_chart_series_have_distinct_glyphs_without_colour(ren_home, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = ChartApp()
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.no_color
        chart = app.query_one(Chart)
        first, second = decaying(300, 4.0), decaying(300, 2.0, 1.0)
        chart.set_series({"first": first, "second": second})
        await pilot.pause()
        lines = screen_lines(app)
        plotted = "".join(cells(row) for row in plot_rows(lines))
        glyphs = {ch for ch in plotted if ch.strip() and ord(ch) not in BRAILLE}
        assert any(ord(ch) in BRAILLE for ch in plotted) and glyphs  # one series in braille, one in a glyph
        legend_first = next(line for line in lines if "first" in line and "second" in line)
        mark = {name: legend_first[legend_first.index(name) - 3:legend_first.index(name)].strip()
                for name in ("first", "second")}
        assert mark["first"] != mark["second"] and mark["second"][0] in glyphs
