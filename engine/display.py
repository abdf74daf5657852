"""Text for run records, shared by the CLI and the TUI (no torch, no rich)."""

from __future__ import annotations

from engine.store import RunRecord


def format_scores(scores: dict[str, float], *, short: bool = False) -> str:
    """``"vqa_score 0.9998"`` (``short``: ``"vqa 0.9998"``); ``"-"`` when empty."""
    parts = []
    for key, value in scores.items():
        if key == "eval_samples":
            continue
        name = key.removeprefix("eval/")
        parts.append(f"{name.removesuffix('_score') if short else name} {value:.4f}")
    return ", ".join(parts) or "-"


def format_duration(record: RunRecord) -> str:
    """``"3m10s"``, ``"2h05m"``, or ``"-"`` for a run that has not started."""
    d = record.duration_s
    if d is None:
        return "-"
    return f"{int(d // 3600)}h{int(d % 3600 // 60):02d}m" if d >= 3600 else f"{int(d // 60)}m{int(d % 60):02d}s"


def format_steps(record: RunRecord) -> str:
    return f"{record.step}/{record.max_steps}" if record.max_steps else str(record.step)


SPARK = "▁▂▃▄▅▆▇█"


def bucket_means(values: list[float], buckets: int) -> list[float]:
    """``values`` reduced to at most ``buckets`` means of consecutive runs, in order."""
    if len(values) <= buckets:
        return list(values)
    edges = [round(i * len(values) / buckets) for i in range(buckets + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]


def sparkline(values: list[float] | tuple[float, ...]) -> str:
    """``"█▆▄▃▂▁"``: one block per value, scaled between the values' min and max."""
    finite = [v for v in values if v == v]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(" " if v != v else SPARK[min(int((v - low) / span * len(SPARK)), len(SPARK) - 1)]
                   for v in values)
