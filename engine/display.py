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
