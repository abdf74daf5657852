"""Score tables and config diffs for Compare, as pure functions: rows from run
records, and the same rows as Markdown and LaTeX (formatted, for reading) and as CSV
and JSON (values: numbers stay numbers, units in the column names), and the files of
an export."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.display import eval_split_of, format_count, format_seconds, format_steps, latex_escape, markdown_table
from engine.store import RunRecord

if TYPE_CHECKING:
    from engine.report import ReportTable


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


def _score_columns(records: Sequence[RunRecord]) -> tuple[list[str], list[str], bool]:
    """(tasks, their score column names, whether a test column is there)."""
    tasks = task_names(records)
    splits = {eval_split_of(r) for r in records if r.best_scores or r.final_scores}
    split = splits.pop() if len(splits) == 1 and None not in splits else "eval split"
    tested = any(r.test_scores for r in records)
    columns = []
    for task in tasks:
        columns += [f"best {split}/{task}", f"final {split}/{task}"] + ([f"test/{task}"] if tested else [])
    return tasks, columns, tested


def _raw_score(scores: Mapping[str, float], task: str) -> float | None:
    value = scores.get(f"eval/{task}", scores.get(task))
    return None if value is None else float(value)


def score_rows(records: Sequence[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """The Compare score table: one row per run, every cell a string.

    Columns: run, stage/kind, steps, best and final value per task (named by their split: the scored runs'
    common eval split, else "eval split"), the test value per task where a run has one, trainable
    params, train time (over every session of a resumed run) and samples seen.
    """
    tasks, columns, tested = _score_columns(records)
    headers = ["run", "stage/kind", "steps", *columns, "trainable params", "train time", "samples seen"]
    rows = []
    for r in records:
        row = [r.name, f"{r.stage}/{r.kind}", format_steps(r)]
        for task in tasks:
            row += [_score(r.best_scores, task), _score(r.final_scores, task)]
            row += [_score(r.test_scores, f"test/{task}")] if tested else []
        row += [format_count(r.params.get("trainable")), format_seconds(r.train_s), format_count(samples_seen(r))]
        rows.append(row)
    return headers, rows


def raw_score_rows(records: Sequence[RunRecord]) -> tuple[list[str], list[list[Any]]]:
    """The score table as values, for CSV and JSON: one row per run with its id, numbers as numbers (units in
    the column names), None where a run has no value."""
    tasks, columns, tested = _score_columns(records)
    headers = ["run id", "run", "stage", "kind", "steps", "max steps", *columns, "trainable params",
               "total params", "train time (s)", "samples seen", "training compute (PFLOP)"]
    rows = []
    for r in records:
        row: list[Any] = [r.id, r.name, r.stage, r.kind, r.step, r.max_steps]
        for task in tasks:
            row += [_raw_score(r.best_scores, task), _raw_score(r.final_scores, task)]
            row += [_raw_score(r.test_scores, f"test/{task}")] if tested else []
        pflops = r.compute.get("pflops")
        row += [r.params.get("trainable"), r.params.get("total"), r.train_s, samples_seen(r),
                float(pflops) if isinstance(pflops, (int, float)) else None]
        rows.append(row)
    return headers, rows


def raw_report_rows(report: ReportTable) -> tuple[list[str], list[list[Any]]]:
    """The study report's variant table as values (see :func:`raw_score_rows`): per task the mean, standard
    deviation and number of seeds, the difference to the baseline and its 95% interval; the compute columns
    as means over seeds; the run ids of each variant."""
    headers = ["variant", "baseline", "seeds", "pretraining run ids", "finetuning run ids"]
    for task in report.tasks:
        label = report.score_label(task)
        headers += [f"{task} {label} mean", f"{task} {label} std", f"{task} {label} n",
                    f"Δ {task}", f"Δ {task} 95% CI low", f"Δ {task} 95% CI high"]
    headers += ["PFLOP (mean)", "saved PFLOP (%)", "device hours (mean)", "train time (s, mean)",
                "saved time (%)", "peak memory (MiB, mean)", "trainable params", "total params"]
    rows = []
    for row in report.rows:
        cells: list[Any] = [row.variant, row.is_baseline, list(row.seeds), [r.id for r in row.pretrains],
                            [r.id for r in row.finetunes]]
        for task in report.tasks:
            stat = row.scores.get(task)
            interval = row.delta_ci.get(task)
            cells += [stat.mean if stat else None, stat.std if stat else None, stat.n if stat else 0,
                      row.score_delta.get(task), interval.low if interval else None,
                      interval.high if interval else None]
        cells += [row.pflops.mean, row.saved_pflops_pct, row.device_hours.mean, row.train_s.mean,
                  row.saved_train_pct, row.peak_memory_mb.mean, row.trainable, row.total]
        rows.append(cells)
    return headers, rows


def to_latex(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A ``tabular`` (left-aligned columns, ``\\hline`` rules; no package needed)."""
    def line(cells: Sequence[str]) -> str:
        return " & ".join(latex_escape(str(c)) for c in cells) + r" \\"

    return "\n".join([
        r"\begin{tabular}{" + "l" * len(headers) + "}", r"\hline", line(headers), r"\hline",
        *map(line, rows), r"\hline", r"\end{tabular}",
    ]) + "\n"


def to_csv(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """RFC 4180 CSV with ``\\n`` line ends. Numbers are written in full (``repr``: they read back equal),
    None as an empty cell, booleans as ``true``/``false``, lists and tables as JSON."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([csv_cell(value) for value in row] for row in rows)
    return out.getvalue()


def csv_cell(value: Any) -> str:
    """One value as a CSV cell (see :func:`to_csv`)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


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


def diff_entries(records: Sequence[RunRecord], baseline: int) -> list[dict[str, Any]]:
    """The config keys where a run differs from ``records[baseline]``, as values: ``{"key", "values":
    {run id: value}, "unset": [run ids without the key]}``, in config order, the baseline's value first."""
    base = records[baseline]
    others = [r for i, r in enumerate(records) if i != baseline]
    keys = list(dict.fromkeys(key for r in others for key, _, _ in config_diff(base.config, r.config)))
    flat = {r.id: flatten(r.config) for r in records}
    ordered = [base, *others]
    return [{"key": key, "values": {r.id: flat[r.id][key] for r in ordered if key in flat[r.id]},
             "unset": [r.id for r in ordered if key not in flat[r.id]]} for key in keys]


@dataclasses.dataclass(frozen=True)
class Export:
    """What Compare writes: the score table formatted (Markdown, LaTeX) and as values (CSV, JSON), and the
    config keys that differ from the baseline run (in the Markdown, a CSV of their values and the JSON)."""

    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    raw_headers: Sequence[str]
    raw_rows: Sequence[Sequence[Any]]
    records: Sequence[RunRecord]
    baseline: int
    view: str = "runs"

    def markdown(self) -> str:
        """The score table, then the config keys that differ from the baseline (what is copied)."""
        text = markdown_table(self.headers, self.rows)
        diff = diff_entries(self.records, self.baseline)
        if not diff:
            return text
        base, others = self.records[self.baseline], [r for i, r in enumerate(self.records) if i != self.baseline]
        cells = [[entry["key"], *(format_value(entry["values"].get(r.id, MISSING)) if r.id not in entry["unset"]
                                  else format_value(MISSING) for r in (base, *others))] for entry in diff]
        headers = ["config key", f"{base.name} (baseline)", *(r.name for r in others)]
        return f"{text}\n{markdown_table(headers, cells)}"

    def config_csv(self) -> str:
        """The differing config keys, one column per run (headed by its id, the baseline's first)."""
        base = self.records[self.baseline]
        ordered = [base, *(r for i, r in enumerate(self.records) if i != self.baseline)]
        rows = [[entry["key"], *(entry["values"].get(r.id) for r in ordered)]
                for entry in diff_entries(self.records, self.baseline)]
        return to_csv(["config key", *(r.id for r in ordered)], rows)

    def json(self) -> str:
        base = self.records[self.baseline]
        document = {"view": self.view, "columns": list(self.raw_headers),
                    "rows": [dict(zip(self.raw_headers, row, strict=True)) for row in self.raw_rows],
                    "baseline": {"id": base.id, "name": base.name},
                    "config_diff": diff_entries(self.records, self.baseline)}
        return json.dumps(document, indent=1, ensure_ascii=False) + "\n"

    def write(self, directory: Path, stem: str) -> list[Path]:
        """Write ``stem.md``, ``.tex``, ``.csv``, ``.json`` and ``stem-config.csv`` in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        files = {f"{stem}.md": self.markdown(), f"{stem}.tex": to_latex(self.headers, self.rows),
                 f"{stem}.csv": to_csv(self.raw_headers, self.raw_rows), f"{stem}.json": self.json(),
                 f"{stem}-config.csv": self.config_csv()}
        paths = []
        for name, text in files.items():
            path = directory / name
            path.write_text(text, encoding="utf-8")
            paths.append(path)
        return paths


OSC52_LIMIT = 74_994
"""Bytes of text an OSC 52 copy may carry: 100,000 base64 characters, the limit of hterm and of many
terminal multiplexers."""


def clipboard_problem(env: Mapping[str, str], size: int) -> str | None:
    """Why an OSC 52 copy (how a terminal app reaches your clipboard over SSH) would not reach the clipboard
    of the terminal described by ``env`` (the environment), for ``size`` bytes of text; None when it should."""
    if size > OSC52_LIMIT:
        return f"the table is too long to copy through the terminal ({size:,} bytes; {OSC52_LIMIT:,} at most)"
    if env.get("TERM_PROGRAM") == "Apple_Terminal":
        return "macOS Terminal does not take clipboard copies from programs (OSC 52)"
    if env.get("STY"):
        return "GNU screen does not pass clipboard copies (OSC 52) on to the terminal"
    if env.get("TMUX"):
        return ("inside tmux a copy (OSC 52) reaches the clipboard only with `set -g set-clipboard on` in "
                "~/.tmux.conf")
    if env.get("TERM") in ("linux", "dumb"):
        return f"this terminal (TERM={env['TERM']}) has no clipboard"
    return None
