"""Line charts of metric series, drawn the way TensorBoard users read them.

Pure Python on a braille canvas (no plotting library): each series is smoothed (EMA),
zoomed to ``x_range`` and downsampled to the plot's width keeping every bucket's
minimum and maximum, so a loss spike never disappears. With smoothing on, the raw
curve is drawn faint under the smoothed one (bold). The first series is a braille
line, every other one a glyph of its own (``•``, ``+``, ``×``…) as well as a colour
of its own, so curves stay apart without colour (``NO_COLOR``) and for colour-blind
eyes. The legend sits above the plot, never on it; the x axis has integer ticks when
x is a step count; ``log_y`` draws the y axis in log scale.

Keys when the chart has focus: ``←``/``→`` (or ``,``/``.``) move a cursor one column
(shift: ten), ``home``/``end`` to the first/last point, and the line under the plot
reads out the step and the value of every series there; ``l`` toggles log scale;
``↑``/``↓`` pick a series in the legend and ``space`` shows or hides it (a click on
its legend entry too; a click in the plot moves the cursor there).
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.reactive import reactive
from textual.widget import Widget

Curve = tuple[list[float], list[float]]

# Okabe & Ito's palette, told apart by the common kinds of colour blindness.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#CC79A7", "#D55E00", "#0072B2")
GLYPHS = ("", "•", "+", "×", "o", "*", "#", "%")  # "": a braille line
LINE_SAMPLE = "⠒⠒"  # the braille series in the legend
HINT = "←→ cursor · ↑↓ space series · l log y"
# Braille dot bits by (dot column, dot row) within a cell: MASK[column][first row][last row].
_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
MASK = tuple(tuple(tuple(sum(_DOT[c][r] for r in range(a, b + 1)) for b in range(4)) for a in range(4))
             for c in range(2))


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


# --- axes ------------------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, target: int, integer: bool = False) -> list[float]:
    """About ``target`` round values (1, 2 or 5 times a power of ten apart) in ``[lo, hi]``;
    whole numbers only when ``integer``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def log_ticks(lo: float, hi: float, target: int) -> list[float]:
    """Ticks for a log axis over ``[lo, hi]`` (both > 0): the powers of ten inside it (every n-th
    when there are many); under two decades, 1, 2 and 5 times them; else round linear values."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for multiples in ((1,), (1, 2, 5)):
        ticks = [m * 10.0 ** k for k in range(first, last + 1) for m in multiples
                 if lo * (1 - 1e-9) <= m * 10.0 ** k <= hi * (1 + 1e-9)]
        if len(ticks) >= 2 and (len(multiples) > 1 or len(ticks) >= 3 or target < 3):
            every = max(1, math.ceil(len(ticks) / max(target, 1)))
            return ticks[::every]
    return [v for v in nice_ticks(lo, hi, target) if v > 0] or [lo, hi]


def tick_labels(values: Sequence[float], integer: bool = False, log: bool = False) -> list[str]:
    """Labels that tell neighbouring ticks apart: whole numbers (``12k``, ``1.5M`` when large) on an
    integer axis, as many decimals as the tick spacing needs otherwise."""
    if not values:
        return []
    if log:
        return [f"{v:g}" for v in values]
    if integer and all(float(v).is_integer() for v in values):
        big = max(abs(v) for v in values)
        for scale, least, suffix in ((1e6, 1e6, "M"), (1e3, 1e4, "k")):
            if big >= least and all(v % (scale / 10) == 0 for v in values):
                return [f"{v / scale:g}{suffix}" if v else "0" for v in values]
        return [str(int(v)) for v in values]
    step = min((b - a for a, b in zip(values, values[1:])), default=abs(values[0]) or 1.0)
    big = max(abs(v) for v in values)
    if big >= 1e6 or (step < 1e-4 and big > 0):
        return [f"{v:.3g}" for v in values]
    decimals = max(0, -math.floor(math.log10(step)) if step > 0 else 0)
    return [f"{v:.{decimals}f}" for v in values]


def format_x(x: float, integer: bool) -> str:
    return str(int(x)) if integer and float(x).is_integer() else f"{x:.4g}"


# --- drawing ---------------------------------------------------------------------------------------------

def trace(xs: Sequence[float], ys: Sequence[float], to_px: Callable[[float], float],
          to_py: Callable[[float], float], width: int, height: int) -> dict[tuple[int, int], int]:
    """The braille dots of the line through the points, as {(cell row, cell column): dot bits},
    on a canvas of ``width`` x ``height`` dots. Each dot column gets the span the line crosses in it,
    so a spike drawn between two points of one column is a vertical stroke."""
    cells: dict[tuple[int, int], int] = {}
    top, right = height - 1, width - 1

    def fill(ix: int, ya: float, yb: float) -> None:
        a = min(max(round(min(ya, yb)), 0), top)
        b = min(max(round(max(ya, yb)), 0), top)
        ix = min(max(ix, 0), right)
        column, sub = ix >> 1, ix & 1
        for row in range(a >> 2, (b >> 2) + 1):
            base = row * 4
            key = (row, column)
            cells[key] = cells.get(key, 0) | MASK[sub][max(a, base) - base][min(b, base + 3) - base]

    pts = [(to_px(x), to_py(y)) for x, y in zip(xs, ys)]
    if len(pts) == 1:
        fill(round(pts[0][0]), pts[0][1], pts[0][1])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x1 < x0:
            x0, y0, x1, y1 = x1, y1, x0, y0
        i0, i1 = round(x0), round(x1)
        if i0 == i1:
            fill(i0, y0, y1)
            continue
        slope = (y1 - y0) / (x1 - x0)
        for ix in range(i0, i1 + 1):
            ya = y0 + slope * (max(ix - 0.5, x0) - x0)
            yb = y0 + slope * (min(ix + 0.5, x1) - x0)
            fill(ix, ya, yb)
    return cells


@dataclass
class _Prepared:
    """The visible series at full resolution: smoothed (``curves``) and raw (``raw``, with smoothing on),
    zoomed; and what the axes need."""

    curves: dict[str, Curve] = field(default_factory=dict)
    raw: dict[str, Curve] = field(default_factory=dict)
    x_lo: float = 0.0
    x_hi: float = 1.0
    y_lo: float = 0.0
    y_hi: float = 1.0
    integer_x: bool = False
    dropped: int = 0  # points at or below zero left out of a log plot
    empty: bool = True
    xs: list[float] | None = None  # every visible x, sorted (for the cursor; built on first use)


@dataclass
class _Frame:
    """One drawing at one size: the lines above and below the plot, the plot's cells, the mapping."""

    top: list[Text]
    label_width: int
    labels: dict[int, str]
    chars: list[list[str]]
    styles: list[list[Style | None]]
    bottom: list[Text]
    to_px: Callable[[float], float]
    to_py: Callable[[float], float]
    legend: list[tuple[int, int, int, int]]  # (row, first column, end column, series index)


class Chart(Widget, can_focus=True):
    """Named series overlaid, with a legend above, a cursor readout below, log scale, and
    series shown or hidden.

    ``series`` holds the raw curves; ``plotted`` the smoothed (or plain) curves last drawn, per
    visible series, downsampled to the plot's width; ``plotted_raw`` the raw curves drawn faint
    under them while smoothing is on. Until the first :meth:`set_series` it shows "loading…".
    """

    DEFAULT_CSS = """
    Chart { width: 1fr; height: 1fr; }
    Chart > .chart--title { text-style: bold; }
    Chart > .chart--axis { color: $text-muted; }
    Chart > .chart--cursor { color: $foreground 60%; }
    Chart > .chart--hidden { color: $text-muted; text-style: strike; }
    Chart > .chart--selected { text-style: reverse; }
    """
    COMPONENT_CLASSES = {"chart--title", "chart--axis", "chart--cursor", "chart--hidden", "chart--selected"}
    BINDINGS = [
        Binding("left,comma", "move_cursor(-1)", "Cursor left", show=False),
        Binding("right,full_stop", "move_cursor(1)", "Cursor right", show=False),
        Binding("shift+left", "move_cursor(-10)", "Cursor ten left", show=False),
        Binding("shift+right", "move_cursor(10)", "Cursor ten right", show=False),
        Binding("home", "cursor_to_end(-1)", "Cursor to the first point", show=False),
        Binding("end", "cursor_to_end(1)", "Cursor to the last point", show=False),
        Binding("l", "log_scale", "Log y"),
        Binding("up", "select_series(-1)", "Previous series", show=False),
        Binding("down", "select_series(1)", "Next series", show=False),
        Binding("space", "toggle_series", "Show/hide series", show=False),
    ]

    keys_hint = False  # show the hint line of the chart's keys without focus (a screen forwards them)
    chart_title: reactive[str] = reactive("")
    smoothing: reactive[float] = reactive(0.0)
    x_range: reactive[tuple[float, float] | None] = reactive(None)
    xlabel: reactive[str] = reactive("step")
    log_y: reactive[bool] = reactive(False)
    hidden: reactive[frozenset[str]] = reactive(frozenset())
    cursor_x: reactive[float | None] = reactive(None)
    selected: reactive[int] = reactive(0)

    def __init__(self, title: str = "", *, xlabel: str = "step", id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.set_reactive(Chart.chart_title, title)
        self.set_reactive(Chart.xlabel, xlabel)
        self.series: dict[str, Curve] = {}
        self.plotted: dict[str, Curve] = {}
        self.plotted_raw: dict[str, Curve] = {}
        self._version = 0
        self.show_selection = False  # the legend marks the selected series (with focus, or once it was moved)
        self._prepared: tuple[tuple, _Prepared] | None = None
        self._frame: tuple[tuple, _Frame] | None = None

    # --- data in ---------------------------------------------------------------------------------------

    def set_series(self, series: Mapping[str, Curve]) -> None:
        """Replace the curves (name -> (xs, ys)) and redraw; hidden series stay hidden."""
        self.series = dict(series)
        self._version += 1
        self.selected = min(self.selected, max(len(self.series) - 1, 0))
        self.refresh()

    def on_focus(self) -> None:
        self.refresh()  # the legend shows the selected series while the chart has focus

    def on_blur(self) -> None:
        self.refresh()

    def watch_x_range(self) -> None:
        self.cursor_x = None

    def watch_xlabel(self) -> None:
        self.cursor_x = None

    def shifted(self, direction: int) -> tuple[float, float] | None:
        """The x range half a window left (``direction`` -1) or right (+1) of the current one, kept
        within the data; without zoom, the first or last half. None when there are no points."""
        ends = [x for xs, _ in self.series.values() for x in xs[:1] + xs[-1:]]
        if not ends:
            return None
        lo, hi = min(ends), max(ends)
        if self.x_range is None:
            half = (hi - lo) / 2
            return (lo, lo + half) if direction < 0 else (hi - half, hi)
        start, end = self.x_range
        width = end - start
        start = min(max(start + direction * width / 2, lo), max(hi - width, lo))
        return start, start + width

    # --- state to pictures ------------------------------------------------------------------------------

    def _prepare(self) -> _Prepared:
        """Smooth, filter and zoom the visible series (at full resolution), once per data state."""
        key = self._prepare_key()
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        out = _Prepared()
        ys_seen: list[float] = []
        xs_seen: list[float] = []
        integer = True
        for name, (xs, ys) in self.series.items():
            if name in self.hidden:
                continue
            if not all(map(math.isfinite, ys)):
                finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
                xs, ys = [x for x, _ in finite], [y for _, y in finite]
            raw_ys = list(ys)
            main_ys = smooth(raw_ys, self.smoothing)
            xs = list(xs)
            if self.x_range is not None:
                lo, hi = self.x_range
                keep = [i for i, x in enumerate(xs) if lo <= x <= hi]
                xs = [xs[i] for i in keep]
                raw_ys = [raw_ys[i] for i in keep]
                main_ys = [main_ys[i] for i in keep]
            if self.log_y:
                keep = [i for i, y in enumerate(raw_ys) if y > 0 and main_ys[i] > 0]
                out.dropped += len(xs) - len(keep)
                xs = [xs[i] for i in keep]
                raw_ys = [raw_ys[i] for i in keep]
                main_ys = [main_ys[i] for i in keep]
            out.curves[name] = (xs, main_ys)
            if self.smoothing:
                out.raw[name] = (xs, raw_ys)
            if xs:
                xs_seen += (min(xs), max(xs))
                ys_seen += (min(raw_ys), max(raw_ys), min(main_ys), max(main_ys))
                integer = integer and all(float(x).is_integer() for x in xs)
        if xs_seen:
            out.empty = False
            out.x_lo, out.x_hi = self.x_range if self.x_range is not None else (min(xs_seen), max(xs_seen))
            out.y_lo, out.y_hi = min(ys_seen), max(ys_seen)
            out.integer_x = integer
            if out.y_lo == out.y_hi:  # a flat line: give it room
                if self.log_y:
                    out.y_lo, out.y_hi = out.y_lo / 2, out.y_hi * 2
                else:
                    pad = abs(out.y_lo) * 0.1 or 1.0
                    out.y_lo, out.y_hi = out.y_lo - pad, out.y_hi + pad
            if out.x_lo == out.x_hi:
                out.x_lo, out.x_hi = out.x_lo - 1, out.x_hi + 1
        self._prepared = (key, out)
        return out

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(name, partial=True)

    def _series_style(self, index: int) -> tuple[str, Style]:
        return GLYPHS[index % len(GLYPHS)], Style(color=PALETTE[index % len(PALETTE)])

    def _legend(self, width: int) -> tuple[list[Text], list[tuple[int, int, int, int]]]:
        """The legend as lines of at most ``width`` cells, and where each entry is."""
        lines: list[Text] = [Text()]
        spans = []
        hidden_style, selected_style = self._style("chart--hidden"), self._style("chart--selected")
        for index, name in enumerate(self.series):
            glyph, colour = self._series_style(index)
            sample = glyph * 2 if glyph else LINE_SAMPLE
            entry_width = len(sample) + 1 + len(name)
            line = lines[-1]
            if line.cell_len and line.cell_len + 2 + entry_width > width:
                lines.append(line := Text())
            if line.cell_len:
                line.append("  ")
            start = line.cell_len
            hidden = name in self.hidden
            line.append(sample, hidden_style if hidden else colour)
            line.append(" ")
            style = hidden_style if hidden else Style()
            if index == self.selected and (self.has_focus or self.show_selection):
                style = style + selected_style
            line.append(name, style)
            spans.append((len(lines) - 1, start, line.cell_len, index))
        return ([] if not self.series else lines), spans

    def _draw(self) -> _Frame:
        """The chart at the widget's size, from the prepared series (cursor and selection excluded)."""
        prep = self._prepare()
        width, height = self.size
        axis = self._style("chart--axis")
        title = self.chart_title
        if prep.empty:
            title += " (every series hidden)" if self.series and len(self.hidden) >= len(self.series) else \
                " (no points yet)"
        elif self.log_y:
            title += " · log y" + (f" ({prep.dropped} points at or below 0 left out)" if prep.dropped else "")
        top = [Text(title.center(width).rstrip(), style=self._style("chart--title"), no_wrap=True)]
        legend, spans = self._legend(width)
        top += legend
        spans = [(row + 1, a, b, i) for row, a, b, i in spans]
        plot_rows = height - len(top) - 3
        if plot_rows < 2:  # too short for a title: drop it
            top, spans = top[1:], [(row - 1, a, b, i) for row, a, b, i in spans]
            plot_rows += 1
        if prep.empty or plot_rows < 2 or width < 12:
            self.plotted = {name: downsample(xs, ys, max(width, 1)) for name, (xs, ys) in prep.curves.items()}
            self.plotted_raw = {}
            return _Frame(top, 0, {}, [], [], [], float, float, spans)

        # y axis: ticks and their labels decide the plot's width
        log = self.log_y
        transform = math.log10 if log else float
        t_lo, t_hi = transform(prep.y_lo), transform(prep.y_hi)
        y_ticks = (log_ticks(prep.y_lo, prep.y_hi, max(2, plot_rows // 3)) if log
                   else nice_ticks(prep.y_lo, prep.y_hi, max(2, plot_rows // 3)))
        y_labels = tick_labels(y_ticks, log=log)
        label_width = max(map(len, y_labels), default=1)
        columns = width - label_width - 1
        dots_x, dots_y = columns * 2, plot_rows * 4
        x_lo, x_span = prep.x_lo, prep.x_hi - prep.x_lo
        y_scale = (dots_y - 1) / (t_hi - t_lo)

        def to_px(x: float) -> float:
            return (x - x_lo) / x_span * (dots_x - 1)

        def to_py(y: float) -> float:
            return (t_hi - transform(y)) * y_scale

        labels: dict[int, str] = {}
        for value, label in zip(y_ticks, y_labels):
            row = round(to_py(value)) >> 2
            labels.setdefault(min(max(row, 0), plot_rows - 1), label)

        # the curves: raw ones faint first, then each series' main curve (bold when smoothed) on top
        chars = [[" "] * columns for _ in range(plot_rows)]
        styles: list[list[Style | None]] = [[None] * columns for _ in range(plot_rows)]
        self.plotted, self.plotted_raw = {}, {}
        layers = []
        order = {name: i for i, name in enumerate(self.series)}
        for name, (xs, ys) in prep.raw.items():
            self.plotted_raw[name] = downsample(xs, ys, columns)
            glyph, colour = self._series_style(order[name])
            layers.append((self.plotted_raw[name], glyph, colour + Style(dim=True)))
        for name, (xs, ys) in prep.curves.items():
            self.plotted[name] = downsample(xs, ys, columns)
            glyph, colour = self._series_style(order[name])
            layers.append((self.plotted[name], glyph, colour + Style(bold=True) if self.smoothing else colour))
        for (xs, ys), glyph, style in layers:
            for (row, column), bits in trace(xs, ys, to_px, to_py, dots_x, dots_y).items():
                chars[row][column] = glyph or chr(0x2800 | bits)
                styles[row][column] = style

        # x axis: the line with its ticks, the labels under them
        x_ticks = nice_ticks(prep.x_lo, prep.x_hi, max(2, columns // 12), integer=prep.integer_x)
        x_labels = tick_labels(x_ticks, integer=prep.integer_x)
        line = ["─"] * columns
        under = [" "] * width
        free = 0
        for value, label in zip(x_ticks, x_labels):
            column = round(to_px(value)) >> 1
            if not 0 <= column < columns:
                continue
            line[column] = "┬"
            at = min(max(label_width + 1 + column - len(label) // 2, 0), width - len(label))
            if at >= free:
                under[at:at + len(label)] = label
                free = at + len(label) + 1
        bottom = [Text(" " * label_width + "└" + "".join(line), style=axis, no_wrap=True),
                  Text("".join(under).rstrip(), style=axis, no_wrap=True)]
        return _Frame(top, label_width, labels, chars, styles, bottom, to_px, to_py, spans)

    def frame(self) -> _Frame:
        key = (self._prepare_key(), self.size, self.chart_title, self.xlabel, len(self.series),
               self.selected, self.has_focus, self.show_selection)
        if self._frame is None or self._frame[0] != key:
            self._frame = (key, self._draw())
        return self._frame[1]

    def _prepare_key(self) -> tuple:
        return (self._version, self.smoothing, self.x_range, self.log_y, self.hidden)

    def render(self) -> Text:
        if not self._version:
            return Text("loading…")
        frame = self.frame()
        width = self.size.width
        axis = self._style("chart--axis")
        out = Text(no_wrap=True, overflow="crop")
        lines: list[Text] = list(frame.top)
        cursor = self._cursor_cells(frame)
        cursor_style = self._style("chart--cursor")
        for row, (chars, styles) in enumerate(zip(frame.chars, frame.styles)):
            line = Text(no_wrap=True)
            label = frame.labels.get(row)
            line.append((label or "").rjust(frame.label_width) + ("┤" if label is not None else "│"), axis)
            run, run_style = [], None
            for column, (char, style) in enumerate(zip(chars, styles)):
                if cursor is not None and column == cursor[0]:
                    if char == " ":
                        char, style = "│", cursor_style
                    elif (row, column) in cursor[1]:
                        style = (style or Style()) + Style(reverse=True)
                if style != run_style and run:
                    line.append("".join(run), run_style)
                    run = []
                run.append(char)
                run_style = style
            if run:
                line.append("".join(run), run_style)
            lines.append(line)
        lines += frame.bottom
        if frame.chars:
            lines.append(self._readout_line(width))
        for i, line in enumerate(lines):
            if i:
                out.append("\n")
            line.truncate(width)
            out.append_text(line)
        return out

    # --- the cursor -----------------------------------------------------------------------------------

    def _visible_xs(self) -> list[float]:
        prep = self._prepare()
        if prep.xs is None:
            prep.xs = sorted({x for xs, _ in prep.curves.values() for x in xs})
        return prep.xs

    def _column(self, frame: _Frame, x: float) -> int:
        return round(frame.to_px(x)) >> 1

    def _cursor_cells(self, frame: _Frame) -> tuple[int, set[tuple[int, int]]] | None:
        """The cursor's column and the cells of the points it reads out."""
        if self.cursor_x is None or not frame.chars:
            return None
        column = self._column(frame, self.cursor_x)
        if not 0 <= column < len(frame.chars[0]):
            return None
        marks = set()
        for _, x, y in self._nearest():
            marks.add((min(max(round(frame.to_py(y)) >> 2, 0), len(frame.chars) - 1), self._column(frame, x)))
        return column, marks

    def _nearest(self) -> list[tuple[str, float, float]]:
        """Each visible series' point nearest the cursor: (name, x, y)."""
        out = []
        if self.cursor_x is None:
            return out
        for name, (xs, ys) in self._prepare().curves.items():
            if not xs:
                continue
            i = bisect.bisect_left(xs, self.cursor_x)
            if i == len(xs) or (i and self.cursor_x - xs[i - 1] <= xs[i] - self.cursor_x):
                i -= 1
            out.append((name, xs[i], ys[i]))
        return out

    def readout(self) -> str:
        """The line under the plot: the x label, and at the cursor, its x and every visible series'
        value there (``@x`` where a series' nearest point is elsewhere; its raw value while smoothed)."""
        if self.cursor_x is None:
            return self.xlabel
        prep = self._prepare()
        integer = prep.integer_x
        parts = [f"{self.xlabel} {format_x(self.cursor_x, integer)}"]
        for name, x, y in self._nearest():
            text = f"{name} {y:.4g}"
            if name in prep.raw:
                xs, raw = prep.raw[name]
                text += f" (raw {raw[bisect.bisect_left(xs, x)]:.4g})"
            if x != self.cursor_x:
                text += f" @{format_x(x, integer)}"
            parts.append(text)
        return " · ".join(parts)

    def _readout_line(self, width: int) -> Text:
        text = self.readout()
        if self.cursor_x is None:
            line = text.center(width).rstrip()
            if (self.has_focus or self.keys_hint) and len(line) + 2 + len(HINT) <= width:  # its keys, where they act
                line = line.ljust(width - len(HINT)) + HINT
            return Text(line, style=self._style("chart--axis"), no_wrap=True)
        if len(text) > width:
            text = text[:width - 1] + "…"
        return Text(text, no_wrap=True)

    def action_move_cursor(self, columns: int) -> None:
        """Move the cursor ``columns`` plot columns, to the nearest point there (past empty columns);
        the first move puts it on the newest point."""
        xs = self._visible_xs()
        if not xs:
            return
        if self.cursor_x is None:
            self.cursor_x = xs[-1]
            return
        frame = self.frame()
        if not frame.chars:
            return
        target = self._column(frame, self.cursor_x) + columns

        def column(x: float) -> int:
            return self._column(frame, x)

        if columns > 0:  # the first point at or right of the target column
            i = bisect.bisect_left(xs, target, lo=bisect.bisect_right(xs, self.cursor_x), key=column)
            self.cursor_x = xs[min(i, len(xs) - 1)]
        else:  # the last point at or left of it
            i = bisect.bisect_right(xs, target, hi=bisect.bisect_left(xs, self.cursor_x), key=column) - 1
            self.cursor_x = xs[max(i, 0)]

    def action_cursor_to_end(self, end: int) -> None:
        xs = self._visible_xs()
        if xs:
            self.cursor_x = xs[-1] if end > 0 else xs[0]

    # --- scale and series ---------------------------------------------------------------------------------

    def action_log_scale(self) -> None:
        """Toggle log scale; refused, with a notice, while a shown series has values at or below 0."""
        if self.log_y:
            self.log_y = False
            return
        for name, (_, ys) in self.series.items():
            if name in self.hidden:
                continue
            low = min((y for y in ys if math.isfinite(y)), default=1.0)
            if low <= 0:
                self.notify(f"No log scale: {name} has values at or below 0 (down to {low:.4g}). "
                            "Hide it (space in the legend) first.", severity="warning", markup=False)
                return
        self.log_y = True

    def action_select_series(self, step: int) -> None:
        self.show_selection = True
        if self.series:
            self.selected = (self.selected + step) % len(self.series)

    def action_toggle_series(self, index: int | None = None) -> None:
        """Show or hide the selected series (or series ``index``)."""
        names = list(self.series)
        index = self.selected if index is None else index
        if not 0 <= index < len(names):
            return
        self.selected = index
        self.show_selection = True
        self.hidden = self.hidden ^ {names[index]}

    def on_click(self, event: events.Click) -> None:
        """A click on a legend entry shows or hides that series; one in the plot puts the cursor there."""
        if not self._version:
            return
        frame = self.frame()
        for row, start, end, index in frame.legend:
            if event.y == row and start <= event.x < end:
                self.action_toggle_series(index)
                return
        column = event.x - frame.label_width - 1
        first_row = len(frame.top)
        if frame.chars and 0 <= column < len(frame.chars[0]) and first_row <= event.y < first_row + len(frame.chars):
            xs = self._visible_xs()
            if xs:
                prep = self._prepare()
                x = prep.x_lo + (column * 2 + 0.5) / max(len(frame.chars[0]) * 2 - 1, 1) * (prep.x_hi - prep.x_lo)
                i = min(max(bisect.bisect_left(xs, x), 0), len(xs) - 1)
                if i and x - xs[i - 1] < xs[i] - x:
                    i -= 1
                self.cursor_x = xs[i]
