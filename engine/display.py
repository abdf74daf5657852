"""Text for run records, shared by the CLI and the TUI (no torch, no rich)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from engine.store import RunRecord

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


# Characters that act on a terminal or reorder text rather than show: C0 and C1 controls (ESC starts the ANSI
# sequences that move the cursor, clear the screen or set its title), DEL, and Unicode's line separators
# and bidirectional marks, embeddings, overrides and isolates (which can show text in another order).
_NOT_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x1f{_NOT_C0}]")
_CONTROL_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_NOT_C0}]")  # newline and tab kept
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def terminal_safe(text: str, *, lines: bool = False) -> str:
    """``text`` with each control character written as its escape (``\\x1b``, ``\\r``, ``\\u202e``), for
    printing what users and files wrote (a run's name, notes, tags, error, log): raw, an ANSI sequence in
    it would act on the terminal of whoever looks. ``lines`` keeps newlines and tabs (notes, a log tail).
    Markup is left alone: the CLI and the TUI escape it for their own renderers."""
    return (_CONTROL_LINES if lines else _CONTROL).sub(_visible, text)


def format_count(n: float | None, missing: str = "-") -> str:
    """``1234567`` -> ``"1.23M"`` (three significant digits); ``missing`` when unknown."""
    if n is None:
        return missing
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
            return f"{value:.{digits}f}{suffix}"
    return str(int(n))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", r"\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *map(line, rows)]) + "\n"


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def format_scores(scores: dict[str, float], *, short: bool = False, split: str | None = None) -> str:
    """``"vqa_score 0.9998"`` (``short``: ``"vqa 0.9998"``); ``"-"`` when empty. With ``split``, the scores
    measured on the eval split (keys without a ``/`` after ``eval/``) are named ``"val/vqa_score"``; keys
    such as ``"vqav2/test/vqa_score"`` (``ren eval task``) already name theirs."""
    parts = []
    for key, value in scores.items():
        if key == "eval_samples":
            continue
        name = key.removeprefix("eval/")
        name = name.removesuffix("_score") if short else name
        parts.append(f"{split}/{name}" if split and "/" not in name else name)
        parts[-1] += f" {value:.4f}"
    return ", ".join(parts) or "-"


def eval_split_of(record: RunRecord) -> str | None:
    """The split a run's best and final scores were measured on: recorded with them, else (records made
    before it was) the run config's ``data.eval_split``; None when neither says."""
    split = record.eval_split or record.config.get("data", {}).get("eval_split")
    return split if isinstance(split, str) else None


def format_run_scores(record: RunRecord, *, short: bool = False) -> str:
    """A run's scores, each named by its split: ``"best val/vqa_score 0.9900   final val/vqa_score 0.9800
    test/vqa_score 0.9700"`` (``short``: the best scores only, ``"val/vqa 0.9900"``)."""
    split = eval_split_of(record)
    if short:
        return format_scores(record.best_scores, short=True, split=split)
    parts = [f"{what} {format_scores(scores, split=split)}" for what, scores in
             (("best", record.best_scores), ("final", record.final_scores)) if scores]
    if record.test_scores:  # keyed "test/<metric>": named already
        parts.append(format_scores(record.test_scores))
    return "   ".join(parts) or "-"


def format_versions(record: RunRecord) -> list[str]:
    """The software a run trained with: ``"versions: python 3.12.3, ren 0.1.0, ..."``, and for a run resumed
    with other versions, ``"  before step 40 it ran with torch 2.5.1"`` per earlier session; [] for records
    made before versions were kept."""
    if not record.versions:
        return []
    latest = record.versions[-1]
    since = f" (from step {latest.get('from_step')})" if len(record.versions) > 1 else ""
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in latest.items() if k != "from_step") + since]
    for earlier, later in zip(record.versions, record.versions[1:]):
        changed = [f"{k} {earlier.get(k, '-')}" for k in {**earlier, **later}
                   if k != "from_step" and earlier.get(k) != later.get(k)]
        lines.append(f"  before step {later.get('from_step')} it ran with {', '.join(changed)}")
    return lines


def format_duration(record: RunRecord) -> str:
    """The run's session time: ``"3m10s"``, ``"2h05m"``, or ``"-"`` for a run that has not started."""
    return format_seconds(record.duration_s)


def format_seconds(seconds: float | None, missing: str = "-") -> str:
    """``"42s"``, ``"3m10s"``, ``"2h05m"``, or ``missing`` when unknown (every duration ren prints)."""
    if seconds is None:
        return missing
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def format_steps(record: RunRecord) -> str:
    return f"{record.step}/{record.max_steps}" if record.max_steps else str(record.step)


ETA_WINDOW = 50  # metric points: about the last 50 logging intervals


def seconds_per_step(points: Sequence[Mapping[str, float]], window: int = ETA_WINDOW) -> float | None:
    """Wall seconds per training step over the last ``window`` metric points (each has ``step`` and ``time``),
    evaluations and checkpoints included, as the clock sees them; None until two steps were logged."""
    recent = points[-window:]
    if len(recent) < 2:
        return None
    first, last = recent[0], recent[-1]
    steps = last["step"] - first["step"]
    seconds = last["time"] - first["time"]
    return seconds / steps if steps > 0 and seconds >= 0 else None


def estimate_eta(record: RunRecord, points: Sequence[Mapping[str, float]] | None = None) -> float | None:
    """Seconds until a running run reaches ``max_steps``, at its measured pace: the recent metric ``points``
    when given (wall time per step), else the trainer's last measured throughput in its compute record
    (``samples_per_s`` and the config's ``train.batch_size``). None when the run is not running, has no
    step budget, or nothing was measured yet."""
    if record.status != "running" or not record.max_steps:
        return None
    step = max(record.step, int(points[-1]["step"]) if points else 0)
    per_step = seconds_per_step(points) if points else None
    if per_step is None:
        samples_per_s = record.compute.get("samples_per_s")
        batch = record.config.get("train", {}).get("batch_size")
        if isinstance(samples_per_s, (int, float)) and samples_per_s > 0 and isinstance(batch, int) and batch > 0:
            per_step = batch / samples_per_s
    if per_step is None:
        return None
    return max(record.max_steps - step, 0) * per_step


def format_eta(record: RunRecord, points: Sequence[Mapping[str, float]] | None = None) -> str:
    """:func:`estimate_eta` as ``"12m30s"``; ``"-"`` when it cannot be estimated."""
    return format_seconds(estimate_eta(record, points))


SPARK = "▁▂▃▄▅▆▇█"


def bucket_means(values: list[float], buckets: int) -> list[float | None]:
    """``values`` reduced to at most ``buckets`` means of consecutive runs, in order; None for a run that
    holds a NaN or infinity (a run record holds standard JSON only)."""
    edges = ([round(i * len(values) / buckets) for i in range(buckets + 1)] if len(values) > buckets
             else list(range(len(values) + 1)))
    means: list[float | None] = []
    for a, b in zip(edges, edges[1:]):
        run = values[a:b]
        means.append(sum(run) / len(run) if all(map(math.isfinite, run)) else None)
    return means


def sparkline(values: Sequence[float | None]) -> str:
    """``"█▆▄▃▂▁"``: one block per value, scaled between the finite values' min and max; a blank for
    None, NaN or infinity."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return " " * len(values) if values else ""
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(SPARK[min(int((v - low) / span * len(SPARK)), len(SPARK) - 1)]
                   if v is not None and math.isfinite(v) else " " for v in values)


def si(value: float, unit: str) -> str:
    """``1.23e9, "FLOP"`` -> ``"1.23 GFLOP"``; ``1.19e6, ""`` -> ``"1.19M"``."""
    sep = " " if unit else ""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{sep}{prefix}{unit}"
    return f"{value:.3g}{sep}{unit}"


def format_compute(record: RunRecord) -> str:
    """One line of a run's compute accounting (``RunRecord.compute``): parameters trained,
    FLOPs per sample, achieved FLOP/s against the device peak, cumulative PFLOPs and
    device-hours, peak memory; empty when the run recorded none."""
    c, params = record.compute, record.params
    parts = []
    if params.get("total"):
        parts.append(f"{si(params['trainable'], '')}/{si(params['total'], '')} params trained")
    per_sample = c.get("flops_per_sample") or {}
    if per_sample.get("train"):
        parts.append(f"{si(per_sample['train'], 'FLOP')}/sample")
    if c.get("achieved_flops"):
        util = c.get("utilisation")
        util = "" if util is None else f" ({util:.0%} of peak{', above 100%' if util > 1 else ''})"
        parts.append(f"{si(c['achieved_flops'], 'FLOP/s')}{util}")
    if c.get("pflops") is not None:
        parts.append(f"{c['pflops']:.3g} PFLOPs")
    if c.get("device_hours") is not None:
        parts.append(f"{c['device_hours']:.3g} device-h")
    if c.get("peak_memory_mb"):
        parts.append(f"peak {c['peak_memory_mb'] / 1024:.2f} GB")
    return " · ".join(parts)
