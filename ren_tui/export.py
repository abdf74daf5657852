"""Score tables and config diffs for Compare, as pure functions: rows from run
records, and the same rows as Markdown, LaTeX and CSV."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from engine.display import eval_split_of, format_count, format_seconds, format_steps, latex_escape
from engine.store import RunRecord


def task_names(records: Iterable[RunRecord]) -> list[str]:
    """Scored tasks in first-seen order: ``eval/NAME`` keys of best scores, ``NAME`` keys of final ones."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record.best_scores:
            if key.startswith("eval/"):
                seen.setdefault(key.removeprefix("eval/"), None)
        for key in record.final_scores:
            if key != "eval_samples":
                seen.setdefault(key.removeprefix("eval/"), None)
    return list(seen)


def samples_seen(record: RunRecord) -> int | None:
    """Training samples the run consumed: steps times the global ``train.batch_size``."""
    batch = record.config.get("train", {}).get("batch_size")
    return record.step * batch if isinstance(batch, int) else None


def _score(scores: Mapping[str, float], task: str) -> str:
    value = scores.get(f"eval/{task}", scores.get(task))
    return "-" if value is None else f"{value:.4f}"


def score_rows(records: Sequence[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """The Compare score table: one row per run, every cell a string.

    Columns: run, stage/kind, steps, best and final value per task (named by their split: the scored runs'
    common eval split, else "eval split"), the test value per task where a run has one, trainable
    params, train time (over every session of a resumed run) and samples seen.
    """
    tasks = task_names(records)
    splits = {eval_split_of(r) for r in records if r.best_scores or r.final_scores}
    split = splits.pop() if len(splits) == 1 and None not in splits else "eval split"
    tested = any(r.test_scores for r in records)
    headers = ["run", "stage/kind", "steps"]
    for task in tasks:
        headers += [f"best {split}/{task}", f"final {split}/{task}"] + ([f"test/{task}"] if tested else [])
    headers += ["trainable params", "train time", "samples seen"]
    rows = []
    for r in records:
        row = [r.name, f"{r.stage}/{r.kind}", format_steps(r)]
        for task in tasks:
            row += [_score(r.best_scores, task), _score(r.final_scores, task)]
            row += [_score(r.test_scores, f"test/{task}")] if tested else []
        row += [format_count(r.params.get("trainable")), format_seconds(r.train_s), format_count(samples_seen(r))]
        rows.append(row)
    return headers, rows


def to_latex(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A ``tabular`` (left-aligned columns, ``\\hline`` rules; no package needed)."""
    def line(cells: Sequence[str]) -> str:
        return " & ".join(latex_escape(str(c)) for c in cells) + r" \\"

    return "\n".join([
        r"\begin{tabular}{" + "l" * len(headers) + "}", r"\hline", line(headers), r"\hline",
        *map(line, rows), r"\hline", r"\end{tabular}",
    ]) + "\n"


def to_csv(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """RFC 4180 CSV with ``\\n`` line ends."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return out.getvalue()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict keyed by dotted paths; lists and empty dicts stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


class _Missing:
    """The value of a config key a run does not have."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def config_diff(baseline: Mapping[str, Any], other: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, baseline value, other value)`` for every key whose value differs,
    in config order; a key one side lacks has the value :data:`MISSING` there."""
    base, mine = flatten(baseline), flatten(other)
    keys = list(base) + [k for k in mine if k not in base]
    return [(k, base.get(k, MISSING), mine.get(k, MISSING)) for k in keys
            if (k in base) != (k in mine) or base[k] != mine[k]]


def format_value(value: Any) -> str:
    """A config value as the diff panel shows it: strings bare, others as JSON, ``(unset)`` for MISSING."""
    if value is MISSING:
        return "(unset)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def export_stem(run_ids: Iterable[str]) -> str:
    """The file name (no suffix) of an export of these runs: the same runs, the same name."""
    digest = hashlib.sha1("\n".join(sorted(run_ids)).encode()).hexdigest()[:8]
    return f"compare-{digest}"
