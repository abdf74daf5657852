"""Reports: what each variant of a study (or each of a set of pretraining runs) cost and what it bought.

:func:`report_rows` gathers, per variant, the downstream scores of its finetunes (mean and sample
standard deviation over seeds), the compute its pretraining used (PFLOPs, device-hours, training time,
peak memory, parameters), what that saves against the baseline variant, and the 95% confidence
interval of each score's difference to the baseline (:func:`difference_interval`). :func:`report_series`
reads the curves the figures need, and :func:`write_report` writes ``report.md``, ``table.tex``,
``loss.png`` and ``score_vs_compute.png``. Everything is plain data with ready-formatted strings,
so the TUI can show the same tables. No torch here; matplotlib is imported only to draw (Agg).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.display import eval_split_of, format_count, format_seconds, latex_escape, markdown_table
from engine.errors import RenError, RunNotFound
from engine.predictions import kept_predictions
from engine.store import RunRecord, Store, atomic_write_text
from engine.study import Study, flatten, study_runs

DASH = "—"
FIGURES = ("loss.png", "score_vs_compute.png")
_LATEX_SYMBOLS = {"±": r"$\pm$", DASH: "---", "Δ": r"$\Delta$"}


@dataclass(frozen=True)
class Stat:
    """Values over seeds (missing ones left out) and their summary."""

    values: tuple[float, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """The sample standard deviation (n - 1); None below two values."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass(frozen=True)
class RunRef:
    """One run of a variant: a pretraining, or a finetune (``task``) started from ``parent``."""

    id: str
    name: str
    stage: str
    status: str
    seed: int | None
    task: str | None = None
    parent: str | None = None
    pflops: float | None = None


@dataclass(frozen=True)
class VariantRow:
    """One variant: its runs, scores per task, pretraining compute and savings against the baseline."""

    variant: str
    is_baseline: bool
    pretrains: tuple[RunRef, ...]
    finetunes: tuple[RunRef, ...]
    scores: Mapping[str, Stat]
    score_delta: Mapping[str, float | None]
    pflops: Stat
    device_hours: Stat
    train_s: Stat
    """Seconds in the training loop, summed over every session of a resumed run (evaluations and
    start-up excluded): the record's ``compute["train_seconds"]``."""
    peak_memory_mb: Stat
    trainable: int | None
    total: int | None
    saved_pflops_pct: float | None
    saved_train_pct: float | None
    seed_scores: Mapping[str, tuple[tuple[int | None, float], ...]] = field(default_factory=dict)
    compute_stage: str = "pretrain"
    delta_ci: Mapping[str, Interval] = field(default_factory=dict)
    """Per task, the 95% CI of the score minus the baseline's (none for the baseline itself)."""
    """Whose compute the compute columns hold: ``pretrain``, ``finetune`` (a variant without
    pretraining runs), or ``""`` (no runs)."""

    @property
    def seeds(self) -> tuple[int | None, ...]:
        """Seeds of the variant's pretraining runs (of its finetunes when it has none)."""
        refs = self.pretrains or self.finetunes
        return tuple(dict.fromkeys(r.seed for r in refs))


@dataclass(frozen=True)
class CategoryRow:
    """One category of a task's data (``all``: the whole split): each variant's score on it, over the seeds
    whose finetune kept its per-category scores (``ren eval task``) on the split the report's scores are on."""

    task: str
    kind: str  # what the categories are: question type, answer type, gold label
    category: str
    scores: Mapping[str, Stat]  # variant -> its finetunes' scores on the category


@dataclass(frozen=True)
class ReportTable:
    """The report's data: one row per variant, with the formatted tables derived from it."""

    name: str
    title: str
    description: str
    compared: tuple[str, ...]
    baseline: str
    tasks: tuple[str, ...]
    metrics: Mapping[str, str]
    rows: tuple[VariantRow, ...]
    notes: tuple[str, ...]
    splits: Mapping[str, str] = field(default_factory=dict)  # task -> the split its scores were measured on
    breakdown: tuple[CategoryRow, ...] = ()

    def score_label(self, task: str) -> str:
        """``"vqa_score on val"``: the task's metric and the split of its scores."""
        split = self.splits.get(task)
        return self.metrics.get(task, "score") + (f" on {split}" if split else "")

    def headers(self) -> list[str]:
        """Columns of the main table."""
        scores = [f"{task} ({self.score_label(task)})" for task in self.tasks]
        deltas = [f"Δ {task} [95% CI]" for task in self.tasks]
        return ["variant", "seeds", *scores, *deltas, "PFLOPs", "saved PFLOPs", "device-h", "train time",
                "saved time", "peak memory", "trainable / total params"]

    def cells(self) -> list[list[str]]:
        """The main table, every cell a string (``—`` where data is missing)."""
        out = []
        for row in self.rows:
            out.append([
                f"{row.variant} (baseline)" if row.is_baseline else row.variant,
                ", ".join(DASH if s is None else str(s) for s in row.seeds) or DASH,
                *(format_stat(row.scores.get(task, Stat()), _score) for task in self.tasks),
                *(format_delta(row, task) for task in self.tasks),
                _number(row.pflops.mean), _percent(row.saved_pflops_pct), _number(row.device_hours.mean),
                format_seconds(row.train_s.mean, DASH), _percent(row.saved_train_pct),
                format_memory(row.peak_memory_mb.mean),
                f"{format_count(row.trainable, DASH)} / {format_count(row.total, DASH)}",
            ])
        return out

    def task_headers(self) -> list[str]:
        """Columns of the per-task table."""
        return ["task", "variant", "metric", "n", "mean ± std", "per seed", "Δ vs baseline", "95% CI", "how"]

    def task_cells(self) -> list[list[str]]:
        """One line per task and variant: every seed's score and the summary."""
        out = []
        for task in self.tasks:
            for row in self.rows:
                stat = row.scores.get(task, Stat())
                per_seed = ", ".join(f"{'seed ' + str(seed) if seed is not None else '?'}: {_score(value)}"
                                     for seed, value in row.seed_scores.get(task, ()))
                out.append([task, row.variant, self.metrics.get(task, DASH), str(stat.n),
                            format_stat(stat, _score, with_n=False), per_seed or DASH,
                            _signed(row.score_delta.get(task)), *_interval_cells(row.delta_ci.get(task))])
        return out

    def breakdown_headers(self) -> list[str]:
        """Columns of the per-category table: the task, the category, then one per variant."""
        return ["task", "category", *(row.variant for row in self.rows)]

    def breakdown_cells(self) -> list[list[str]]:
        """The per-category table: each variant's mean ± std (n) of its finetunes' scores on the category."""
        return [[row.task, f"{row.category} ({row.kind})" if row.category != "all" else "all",
                 *(format_stat(row.scores.get(variant.variant, Stat()), _score) for variant in self.rows)]
                for row in self.breakdown]

    def markdown(self) -> str:
        """The main table in GitHub-flavoured Markdown."""
        return markdown_table(self.headers(), self.cells())

    def latex(self) -> str:
        """The main table as a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), ready to ``\\input``."""
        headers = ["Variant", *(f"{t} ({self.score_label(t)})" for t in self.tasks),
                   *(f"Δ {t} [95% CI]" for t in self.tasks), "PFLOPs", "Saved PFLOPs", "Train time", "Saved time",
                   "Trainable / total"]
        keep = [0, *range(2, 2 + 2 * len(self.tasks)), 2 + 2 * len(self.tasks), 3 + 2 * len(self.tasks),
                5 + 2 * len(self.tasks), 6 + 2 * len(self.tasks), 8 + 2 * len(self.tasks)]
        body = [[cells[i] for i in keep] for cells in self.cells()]
        lines = [r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", r"\toprule",
                 " & ".join(latex_cell(h) for h in headers) + r" \\", r"\midrule",
                 *(" & ".join(latex_cell(c) for c in cells) + r" \\" for cells in body),
                 r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Curve:
    """One run's curve: ``(x, y)`` points, drawn in the colour of its variant."""

    variant: str
    seed: int | None
    run_id: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ReportSeries:
    """The curves of the figures: pretraining loss per step, and per task the eval score per
    cumulative PFLOPs (pretraining + finetuning so far)."""

    loss: tuple[Curve, ...] = ()
    score_compute: Mapping[str, tuple[Curve, ...]] = field(default_factory=dict)


# --- confidence intervals ------------------------------------------------------------

LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for term in (even, odd):
            d = 1.0 + term * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + term / c
            c = c if abs(c) > tiny else tiny
            out *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return out


def _beta_inc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` (> 0, not necessarily whole) degrees of
    freedom, found by bisection on the exact two-sided tail P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)."""
    tail = 2.0 * (1.0 - p)
    low, high = 0.0, 1.0
    while _beta_inc(df / 2, 0.5, df / (df + high * high)) > tail:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _beta_inc(df / 2, 0.5, df / (df + mid * mid)) > tail else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """The 95% confidence interval of a variant's score minus the baseline's, or why there is none.
    ``how`` names the method (paired t over the seeds both ran, or Welch's unpaired t) or the reason."""

    low: float | None
    high: float | None
    how: str

    @property
    def within_noise(self) -> bool | None:
        """Whether the interval contains 0 (None without an interval)."""
        return None if self.low is None or self.high is None else self.low <= 0.0 <= self.high


def difference_interval(mine: Sequence[tuple[int | None, float]],
                        base: Sequence[tuple[int | None, float]]) -> Interval:
    """95% CI of mean(mine) - mean(base) from ``(seed, score)`` pairs. When the two share seeds, a
    paired t interval on the per-seed differences of the shared seeds (n - 1 degrees of freedom);
    with no shared seed, Welch's interval (Welch-Satterthwaite degrees of freedom)."""
    a = {seed: v for seed, v in mine if seed is not None}
    b = {seed: v for seed, v in base if seed is not None}
    shared = sorted(set(a) & set(b))
    if shared:
        if len(shared) < 2:
            return Interval(None, None, f"no interval: seed {shared[0]} is the only seed both ran, and a paired "
                                        "interval needs 2")
        diffs = [a[seed] - b[seed] for seed in shared]
        half = t_quantile(0.5 + LEVEL / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        centre = statistics.fmean(diffs)
        return Interval(centre - half, centre + half,
                        f"paired t over seeds {', '.join(map(str, shared))} (n={len(shared)})")
    x, y = [v for _, v in mine], [v for _, v in base]
    if len(x) < 2 or len(y) < 2:
        return Interval(None, None, f"no interval: no seed in common, and an unpaired interval needs 2 scores on "
                                    f"each side (n={len(x)} and {len(y)})")
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    centre = statistics.fmean(x) - statistics.fmean(y)
    if vx + vy == 0.0:
        return Interval(centre, centre, f"Welch (n={len(x)} and {len(y)}; no spread on either side)")
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = t_quantile(0.5 + LEVEL / 2, df) * math.sqrt(vx + vy)
    return Interval(centre - half, centre + half, f"Welch (n={len(x)} and {len(y)}, df={df:.1f})")


# --- formatting ------------------------------------------------------------------


def _score(value: float) -> str:
    return f"{value:.4f}"


def format_stat(stat: Stat, fmt: Any = _score, *, with_n: bool = True) -> str:
    """``"0.8123 ± 0.0130 (n=2)"``; without the spread for one value; ``—`` for none."""
    if stat.mean is None:
        return DASH
    text = fmt(stat.mean) if stat.std is None else f"{fmt(stat.mean)} ± {fmt(stat.std)}"
    return f"{text} (n={stat.n})" if with_n else text


def format_delta(row: VariantRow, task: str) -> str:
    """``"-0.0350 [-0.2256, +0.1556] within noise"``: Δ to the baseline, its 95% CI and whether that
    contains 0; ``"-0.1200 (no CI)"`` without one; the baseline's own Δ alone."""
    delta, interval = row.score_delta.get(task), row.delta_ci.get(task)
    if delta is None or interval is None:
        return _signed(delta)
    if interval.low is None or interval.high is None:
        return f"{_signed(delta)} (no CI)"
    return (f"{_signed(delta)} [{_signed(interval.low)}, {_signed(interval.high)}]"
            + (" within noise" if interval.within_noise else ""))


def _interval_cells(interval: Interval | None) -> list[str]:
    """The per-task table's ``95% CI`` and ``how`` cells."""
    if interval is None:
        return [DASH, "baseline"]
    if interval.low is None or interval.high is None:
        return [DASH, interval.how]
    verdict = "within noise (contains 0)" if interval.within_noise else "excludes 0"
    return [f"[{_signed(interval.low)}, {_signed(interval.high)}] {verdict}", interval.how]

def _number(value: float | None) -> str:
    """Three significant digits: ``1.23``, ``0.000312``, ``1,234``."""
    if value is None:
        return DASH
    if value == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1e-4 else f"{value:.2e}"


def _percent(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}%"


def _signed(value: float | None) -> str:
    return DASH if value is None else f"{value:+.4f}"


def format_memory(mb: float | None) -> str:
    """``"812 MB"``, ``"14.2 GB"``; ``—`` when unknown."""
    if mb is None:
        return DASH
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def latex_cell(text: str) -> str:
    """A table cell for LaTeX: escaped, with ``±``, ``—`` and ``Δ`` in LaTeX's spelling."""
    return "".join(_LATEX_SYMBOLS.get(ch, ch) for ch in latex_escape(text))


# --- gathering -------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _seed(record: RunRecord) -> int | None:
    if record.study and isinstance(record.study.get("seed"), int):
        return record.study["seed"]
    seed = record.config.get("run", {}).get("seed")
    return seed if isinstance(seed, int) else None


def _metric(record: RunRecord) -> str | None:
    """The task metric the trainer scored a finetune with (``vqa_score``, ``accuracy``)."""
    for key in record.final_scores:
        if key != "eval_samples" and "/" not in key:
            return key
    for key in record.best_scores:
        if key.startswith("eval/") and key.count("/") == 1:
            return key.removeprefix("eval/")
    return None


def _task_label(record: RunRecord) -> str:
    """A finetune's task: the study's name for it, else its data set, else its task."""
    if record.study and record.study.get("task"):
        return str(record.study["task"])
    dataset = record.config.get("data", {}).get("dataset")
    task = (record.config.get("task") or {}).get("name")
    return str(dataset or task or record.name)


def _parent_id(record: RunRecord) -> str | None:
    """What ``run:<id>`` the finetune started from (the record's init_from, else its config's)."""
    source = record.init_from or record.config.get("train", {}).get("init_from")
    if isinstance(source, str) and source.startswith("run:"):
        return source[4:]
    return None


def _starts_from(record: RunRecord, run_id: str) -> bool:
    parent = _parent_id(record)
    return bool(parent) and run_id.startswith(parent)


def _ref(record: RunRecord, seed: int | None, task: str | None = None, parent: str | None = None) -> RunRef:
    return RunRef(id=record.id, name=record.name, stage=record.stage, status=record.status, seed=seed, task=task,
                  parent=parent, pflops=_num(record.compute.get("pflops")))


def _describe(record: RunRecord) -> str:
    if record.status == "running":
        return f"is running (step {record.step}{f'/{record.max_steps}' if record.max_steps else ''})"
    return f"is {record.status}" if record.status in ("queued", "created") else f"ended {record.status}"


def _train_seconds(record: RunRecord, where: str, notes: list[str]) -> float | None:
    """The run's time in its training loop over all its sessions; without that record, its last
    session's start to end (``mark_running`` resets ``started_at`` at every resume), with a note."""
    if (seconds := _num(record.compute.get("train_seconds"))) is not None:
        return seconds
    if record.started_at is None or record.ended_at is None:
        return None
    notes.append(f"{where} records no training time (train_seconds); its train time is the wall time of its "
                 "last session, start-up and evaluations included, earlier sessions of a resumed run left out.")
    return record.ended_at - record.started_at


@dataclass
class _Group:
    """A variant being assembled: its pretraining runs and finetunes as records."""

    name: str
    pretrains: list[tuple[int | None, RunRecord]] = field(default_factory=list)
    finetunes: list[tuple[int | None, str, RunRecord, str | None]] = field(default_factory=list)


@dataclass
class _Compute:
    """A variant's compute columns as gathered: from its pretraining runs, or from its finetunes
    when it has none (a finetune from a hub checkpoint or from scratch is the whole cost)."""

    stage: str = ""
    pflops: list[float] = field(default_factory=list)
    hours: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    trainable: int | None = None
    total: int | None = None


def _gather_compute(group: _Group, notes: list[str]) -> _Compute:
    own = [(seed, f"pretraining {r.id}", r) for seed, r in group.pretrains]
    if not own and group.finetunes:
        notes.append(f"{group.name} has no pretraining run; its compute, train time and parameter columns are "
                     "its finetunes' (mean over the finished ones); its saved columns stay empty unless the "
                     "baseline's are finetunes' too.")
        own = [(seed, f"{task} finetune {r.id}", r) for seed, task, r, _ in group.finetunes]
    out = _Compute(stage="pretrain" if group.pretrains else "finetune" if own else "")
    for seed, what, r in own:
        where = f"{group.name}: {what}" + (f" (seed {seed})" if seed is not None else "")
        if out.trainable is None and isinstance(r.params.get("trainable"), int):
            out.trainable, total = r.params["trainable"], r.params.get("total")
            out.total = total if isinstance(total, int) else None
        if r.status != "finished":
            if r.stage == "pretrain":  # an unfinished finetune is noted with its score
                notes.append(f"{where} {_describe(r)}; its compute and training time are left out.")
            continue
        if (spent := _train_seconds(r, where, notes)) is not None:
            out.seconds.append(spent)
        values = {key: _num(r.compute.get(key)) for key in ("pflops", "device_hours", "peak_memory_mb")}
        if not r.compute:
            notes.append(f"{where} has no compute record (it was trained before compute accounting, or its "
                         "measurement failed); PFLOPs, device-hours and peak memory are left out.")
        elif lacking := [key for key, value in values.items() if value is None]:
            notes.append(f"{where}: its compute record lacks {', '.join(lacking)}.")
        for key, column in (("pflops", out.pflops), ("device_hours", out.hours), ("peak_memory_mb", out.memory)):
            if values[key] is not None:
                column.append(values[key])
    return out


def _variant_row(group: _Group, is_baseline: bool, tasks: Sequence[str], metrics: Mapping[str, str],
                 notes: list[str]) -> VariantRow:
    compute = _gather_compute(group, notes)
    scores: dict[str, list[tuple[int | None, float]]] = {task: [] for task in tasks}
    for seed, task, r, _ in group.finetunes:
        where = f"{group.name}: {task} finetune {r.id}" + (f" (seed {seed})" if seed is not None else "")
        value = _num(r.final_scores.get(metrics.get(task, "")))
        if r.status != "finished":
            notes.append(f"{where} {_describe(r)}; it has no final score yet.")
        elif value is None:
            notes.append(f"{where} finished without a final {metrics.get(task, 'score')}.")
        else:
            scores[task].append((seed, value))
    for task in tasks:
        if not any(t == task for _, t, _, _ in group.finetunes):
            notes.append(f"{group.name} has no {task} finetune yet.")
    return VariantRow(
        variant=group.name, is_baseline=is_baseline,
        pretrains=tuple(_ref(r, seed) for seed, r in group.pretrains),
        finetunes=tuple(_ref(r, seed, task, parent) for seed, task, r, parent in group.finetunes),
        scores={task: Stat(tuple(v for _, v in pairs)) for task, pairs in scores.items()},
        score_delta={}, pflops=Stat(tuple(compute.pflops)), device_hours=Stat(tuple(compute.hours)),
        train_s=Stat(tuple(compute.seconds)), peak_memory_mb=Stat(tuple(compute.memory)),
        trainable=compute.trainable, total=compute.total, saved_pflops_pct=None, saved_train_pct=None,
        seed_scores={task: tuple(sorted(pairs, key=lambda p: (p[0] is None, p[0] or 0))) for task, pairs in
                     scores.items()},
        compute_stage=compute.stage,
    )


def _saved(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or base <= 0:
        return None
    return (base - value) / base * 100.0


def _against_baseline(rows: list[VariantRow], baseline: str, tasks: Sequence[str]) -> tuple[VariantRow, ...]:
    base = next(row for row in rows if row.variant == baseline)
    out = []
    for row in rows:
        same = row.compute_stage == base.compute_stage  # savings compare like with like
        delta = {}
        for task in tasks:
            mine, theirs = row.scores[task].mean, base.scores[task].mean
            delta[task] = None if mine is None or theirs is None else mine - theirs
        intervals = {} if row is base else {
            task: difference_interval(row.seed_scores[task], base.seed_scores[task]) for task in tasks}
        out.append(dataclasses.replace(
            row, score_delta=delta, delta_ci=intervals,
            saved_pflops_pct=_saved(base.pflops.mean, row.pflops.mean) if same else None,
            saved_train_pct=_saved(base.train_s.mean, row.train_s.mean) if same else None))
    return tuple(out)


def _breakdown(store: Store, groups: Sequence[_Group], tasks: Sequence[str], notes: list[str]
               ) -> tuple[CategoryRow, ...]:
    """Per task and category, each variant's scores: from the predictions each finished finetune kept on the
    split its final score was measured on (:meth:`Store.predictions`)."""
    rows = []
    for task in tasks:
        kind, values = None, {}  # category -> variant -> scores (categories in the order the runs give them)
        missing = 0
        for g in groups:
            for _, t, r, _ in g.finetunes:
                if t != task or r.status != "finished":
                    continue
                try:
                    kept = {p.split: p for p in kept_predictions(store, r.id)}.get(eval_split_of(r) or "")
                except RenError as exc:
                    notes.append(f"{g.name}: {task} finetune {r.id}: {exc}")
                    continue
                if kept is None or kept.category_kind is None:
                    missing += kept is None
                    continue
                kind = kind or kept.category_kind
                for row in kept.breakdown:
                    values.setdefault(row.category, {}).setdefault(g.name, []).append(row.score)
        if missing:
            notes.append(f"{missing} finished {task} finetune(s) have no per-category scores on their eval split: "
                         f"`ren eval task RUN --examples 0` keeps them.")
        rows += [CategoryRow(task, kind or "", category, {v: Stat(tuple(x)) for v, x in by_variant.items()})
                 for category, by_variant in sorted(values.items(), key=lambda item: item[0] == "all")]
    return tuple(rows)


def _table(store: Store, name: str, title: str, description: str, compared: list[str], groups: list[_Group],
           baseline: str, notes: list[str], planned_tasks: Sequence[str] = ()) -> ReportTable:
    tasks = list(dict.fromkeys([*planned_tasks, *(task for g in groups for _, task, _, _ in g.finetunes)]))
    metrics: dict[str, str] = {}
    splits: dict[str, set[str]] = {}
    for g in groups:
        for _, task, r, _ in g.finetunes:
            if task not in metrics and (metric := _metric(r)):
                metrics[task] = metric
            if (split := eval_split_of(r)) is not None:
                splits.setdefault(task, set()).add(split)
    for task in tasks:
        if task not in metrics:
            notes.append(f"No {task} finetune has been scored yet.")
    rows = [_variant_row(g, g.name == baseline, tasks, metrics, notes) for g in groups]
    breakdown = _breakdown(store, groups, tasks, notes)
    return ReportTable(name=name, title=title, description=description, compared=tuple(compared),
                       baseline=baseline, tasks=tuple(tasks), metrics=metrics,
                       rows=_against_baseline(rows, baseline, tasks), notes=tuple(notes),
                       splits={task: " + ".join(sorted(seen)) for task, seen in splits.items()}, breakdown=breakdown)


def _study_table(store: Store, name: str, *, baseline: str | None, description: str, variants: Sequence[str],
                 compared: list[str], seeds: Sequence[int] = (), tasks: Sequence[str] = ()) -> ReportTable:
    runs = study_runs(store, name)
    if not runs:
        raise RenError(f"Study {name!r} has no runs in the store at {store.root}; `ren study run STUDY.toml` "
                       "queues them (runs carry the study's name in their record).")
    order = list(dict.fromkeys([*variants, *(str(r.study.get("variant")) for r in runs)]))
    slots: dict[tuple[str, int | None, str, str | None], RunRecord] = {}
    notes: list[str] = []
    for r in runs:  # oldest first: the newest run of a slot is the study's current one
        key = (str(r.study.get("variant")), _seed(r), r.stage, _task_label(r) if r.stage == "finetune" else None)
        if key in slots:
            notes.append(f"{key[0]}: run {slots[key].id} was superseded by run {r.id} (the study file changed), "
                         "so it is left out.")
        slots[key] = r
    groups = {v: _Group(v) for v in order}
    pretrain_of = {(v, seed): r.id for (v, seed, stage, _), r in slots.items() if stage == "pretrain"}
    for (variant, seed, stage, task), r in slots.items():
        if stage == "pretrain":
            groups[variant].pretrains.append((seed, r))
        else:
            parent = pretrain_of.get((variant, seed))
            groups[variant].finetunes.append((seed, task, r, parent if parent and _starts_from(r, parent)
                                              else _parent_id(r)))
    for g in groups.values():
        g.pretrains.sort(key=lambda p: (p[0] is None, p[0] or 0))
        g.finetunes.sort(key=lambda p: (p[1], p[0] is None, p[0] or 0))
    for variant in order:
        have = {seed for seed, _ in groups[variant].pretrains}
        missing = [str(s) for s in seeds if s not in have]
        if missing:
            notes.append(f"{variant}: no pretraining run for seed {', '.join(missing)} yet.")
    if baseline not in groups:  # a study known by name only: its first variant
        baseline = order[0]
    return _table(store, name, f"Study {name}", description, compared, list(groups.values()), baseline, notes,
                  tasks)


def _plain_table(store: Store, runs: Sequence[RunRecord | str]) -> ReportTable:
    if not runs:
        raise RenError("A report needs a study or at least one run id.")
    records = [r if isinstance(r, RunRecord) else store.get_run(r) for r in runs]
    everything = store.list_runs()
    notes: list[str] = []
    heads: list[RunRecord] = []
    for r in records:
        head = r
        if r.stage == "finetune" and (parent := _parent_id(r)):
            try:
                head = store.get_run(parent)
            except RunNotFound:
                notes.append(f"Finetune {r.id} started from run {parent}, which is no longer in the store; "
                             "it is reported on its own.")
        if head.id not in {h.id for h in heads}:
            heads.append(head)
    pools = _pool_seeds(heads)
    names = [pool[0].name for pool in pools]
    groups = []
    for pool in pools:
        label = pool[0].name if names.count(pool[0].name) == 1 else f"{pool[0].name}@{pool[0].id[-4:]}"
        group = _Group(label)
        for head in pool:
            if head.stage == "pretrain":
                group.pretrains.append((_seed(head), head))
                for r in sorted(everything, key=lambda r: (r.created_at or 0.0, r.id)):
                    if r.stage == "finetune" and _starts_from(r, head.id):
                        group.finetunes.append((_seed(r), _task_label(r), r, head.id))
            else:
                group.finetunes.append((_seed(head), _task_label(head), head, None))
        groups.append(group)
    compared = [f"{g.name}: {'pretraining' if pool[0].stage == 'pretrain' else 'finetune'} run(s) "
                + ", ".join(f"{h.id} (seed {_seed(h)})" for h in pool)
                + (f" and {len(g.finetunes)} finetune(s) started from them" if pool[0].stage == "pretrain" else "")
                for g, pool in zip(groups, pools)]
    title_names = [g.name for g in groups]
    title = "Runs " + ", ".join(title_names) if len(title_names) <= 4 else f"{len(title_names)} runs"
    return _table(store, _runs_name(heads), title, "", compared, groups, groups[0].name, notes)


def _without_seed(record: RunRecord) -> str:
    """The run's stage and config with ``run.seed`` left out, canonical: equal for the seeds of one variant."""
    config = {**record.config, "run": {k: v for k, v in record.config.get("run", {}).items() if k != "seed"}}
    return json.dumps([record.stage, config], sort_keys=True, default=str)


def _pool_seeds(heads: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """The listed runs as variants: runs whose configs differ only in their seed are one variant
    (seeds over which its scores are averaged); a run repeating a seed of its pool starts another."""
    pools: list[list[RunRecord]] = []
    for head in heads:
        key = _without_seed(head)
        pool = next((p for p in pools if _without_seed(p[0]) == key
                     and all(_seed(h) != _seed(head) for h in p)), None)
        if pool is None:
            pools.append([head])
        else:
            pool.append(head)
    return pools


def _runs_name(heads: Sequence[RunRecord]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", heads[0].name.lower()).strip("-")[:40] or "runs"
    return f"{slug}-{hashlib.sha1(' '.join(sorted(h.id for h in heads)).encode()).hexdigest()[:8]}"


def report_rows(store: Store, source: Study | str | Sequence[RunRecord | str]) -> ReportTable:
    """The report's table for ``source``: a study (loaded, or its name) or a sequence of runs
    (records or ids). A study's variants are its runs' ``study["variant"]``, compared against its
    baseline. Otherwise each listed pretraining run is a variant of its own, with every finetune
    started from it (``init_from = "run:<id>"``), compared against the first; a listed finetune
    stands for the run it started from (for itself when it started from none). Listed runs whose
    configs differ only in ``run.seed`` are one variant, its seeds pooled."""
    if isinstance(source, Study):
        return _study_table(store, source.name, baseline=source.baseline, description=source.description,
                            variants=list(source.variants), compared=_study_compared(source),
                            seeds=source.seeds, tasks=[f.name for f in source.finetunes])
    if isinstance(source, str):
        return _study_table(store, source, baseline=None, description="", variants=(),
                            compared=["the study's file is not readable: variants as its runs recorded them"])
    return _plain_table(store, source)


def _shown_path(path: Path, study: Study) -> str:
    try:
        return str(path.relative_to(study.path.parent))
    except ValueError:
        return str(path)


def _study_compared(study: Study) -> list[str]:
    lines = [f"study file: {study.path}", f"pretraining preset: {_shown_path(study.pretrain, study)}"]
    if study.overrides:
        lines.append("every variant: " + ", ".join(f"{k} = {v!r}" for k, v in flatten(study.overrides).items()))
    for name, patch in study.variants.items():
        text = ", ".join(f"{k} = {v!r}" for k, v in flatten(patch).items()) or "the preset as it is"
        lines.append(f"variant {name}{' (baseline)' if name == study.baseline else ''}: {text}")
    lines.append(f"seeds: {', '.join(map(str, study.seeds))}")
    lines += [f"finetune {f.name}: {_shown_path(f.preset, study)}" for f in study.finetunes]
    return lines


# --- series ----------------------------------------------------------------------


def _points(store: Store, run_id: str) -> list[dict[str, Any]]:
    try:
        return store.read_metrics(run_id)
    except RunNotFound:
        return []


def report_series(store: Store, table: ReportTable) -> ReportSeries:
    """The curves for the figures, read through the store: each pretraining run's ``loss`` per
    step, and each finetune's ``eval/<metric>`` against ``compute/pflops`` logged at the same
    steps, offset by its pretraining run's PFLOPs (a finetune whose pretraining has no compute
    record gets no curve)."""
    loss: list[Curve] = []
    curves: dict[str, list[Curve]] = {}
    for row in table.rows:
        offsets = {ref.id: ref.pflops if ref.status == "finished" else None for ref in row.pretrains}
        for ref in row.pretrains:
            points = [(float(p["step"]), float(p["loss"])) for p in _points(store, ref.id)
                      if _num(p.get("loss")) is not None]
            if points:
                loss.append(Curve(row.variant, ref.seed, ref.id, tuple(points)))
        for ref in row.finetunes:
            offset = 0.0 if ref.parent is None else offsets.get(ref.parent)
            key = f"eval/{table.metrics.get(ref.task or '', '')}"
            if offset is None:
                continue
            pflops, scores = {}, {}
            for p in _points(store, ref.id):
                if _num(p.get("compute/pflops")) is not None:
                    pflops[p["step"]] = float(p["compute/pflops"])
                if _num(p.get(key)) is not None:
                    scores[p["step"]] = float(p[key])
            points = [(offset + pflops[step], score) for step, score in sorted(scores.items()) if step in pflops]
            if points:
                curves.setdefault(ref.task or "", []).append(Curve(row.variant, ref.seed, ref.id, tuple(points)))
    return ReportSeries(loss=tuple(loss), score_compute={k: tuple(v) for k, v in curves.items()})


# --- writing ---------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(table: ReportTable) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.get_cmap("tab10")
    return {row.variant: cycle(i % 10) for i, row in enumerate(table.rows)}


def _draw_loss(table: ReportTable, series: ReportSeries, path: Path) -> None:
    plt = _pyplot()
    colours = _colours(table)
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for row in table.rows:
        curves = [c for c in series.loss if c.variant == row.variant]
        for c in curves:
            xs, ys = zip(*c.points)
            ax.plot(xs, ys, color=colours[row.variant], linewidth=0.8 if len(curves) > 1 else 1.6,
                    alpha=0.55 if len(curves) > 1 else 1.0, label=None if len(curves) > 1 else row.variant)
        if len(curves) > 1:
            common = sorted(set.intersection(*(set(x for x, _ in c.points) for c in curves)))
            by_step = [dict(c.points) for c in curves]
            if common:
                ax.plot(common, [statistics.fmean(d[x] for d in by_step) for x in common],
                        color=colours[row.variant], linewidth=2.0, label=f"{row.variant} (mean of {len(curves)})")
    ax.set_xlabel("step")
    ax.set_ylabel("pretraining loss")
    ax.set_title(f"{table.title}: pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_scores(table: ReportTable, series: ReportSeries, path: Path) -> None:
    plt = _pyplot()
    colours = _colours(table)
    with_curves = bool(series.score_compute)
    fig, axes = plt.subplots(len(table.tasks), 2 if with_curves else 1, squeeze=False, layout="constrained",
                             figsize=(11 if with_curves else 6, 4 * len(table.tasks)))
    for i, task in enumerate(table.tasks):
        metric = table.metrics.get(task, "score")
        ax = axes[i][0]
        for row in table.rows:
            stat = row.scores.get(task, Stat())
            if stat.mean is None or row.pflops.mean is None:
                continue
            ax.errorbar(row.pflops.mean, stat.mean, xerr=row.pflops.std or 0.0, yerr=stat.std or 0.0, fmt="o",
                        capsize=4, color=colours[row.variant], label=f"{row.variant} (n={stat.n})")
        ax.set_xlabel("pretraining PFLOPs")
        ax.set_ylabel(f"{task} {metric}")
        ax.set_title(f"{task}: final score vs pretraining compute")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no finished finetune with pretraining compute", ha="center", va="center",
                    transform=ax.transAxes)
        if with_curves:
            ax = axes[i][1]
            labelled: set[str] = set()
            for c in series.score_compute.get(task, ()):
                xs, ys = zip(*c.points)
                ax.plot(xs, ys, marker=".", color=colours[c.variant], linewidth=1.0,
                        label=None if c.variant in labelled else c.variant)
                labelled.add(c.variant)
            ax.set_xlabel("cumulative PFLOPs (pretraining + finetuning)")
            ax.set_ylabel(f"eval {metric}")
            ax.set_title(f"{task}: eval score during finetuning")
            ax.grid(alpha=0.3)
            if labelled:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no eval and compute series", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def difference_lines(table: ReportTable) -> list[str]:
    """One plain sentence per task and non-baseline variant: Δ, its interval, and whether it is noise."""
    lines = []
    for task in table.tasks:
        for row in table.rows:
            interval, delta = row.delta_ci.get(task), row.score_delta.get(task)
            if interval is None or delta is None:
                continue
            head = f"{task}, {row.variant} − {table.baseline}: Δ {_signed(delta)}"
            if interval.low is None or interval.high is None:
                lines.append(f"{head}; {interval.how}.")
                continue
            verdict = ("within noise (the interval contains 0)" if interval.within_noise
                       else "the interval excludes 0")
            lines.append(f"{head}, {LEVEL:.0%} CI [{_signed(interval.low)}, {_signed(interval.high)}] "
                         f"({interval.how}): {verdict}.")
    return lines


def report_markdown(table: ReportTable, figures: Sequence[str] = ()) -> str:
    """The whole ``report.md``: title, what was compared, the tables, notes and figure links."""
    parts = [f"# {table.title}\n"]
    if table.description:
        parts.append(f"{table.description}\n")
    parts.append("## What was compared\n")
    parts.append("".join(f"- {line}\n" for line in table.compared) or "- (nothing recorded)\n")
    parts.append("## Results\n")
    parts.append(table.markdown())
    parts.append(
        f"Scores are each finetune's final score, mean ± sample standard deviation over seeds (n finetunes). "
        f"Compute columns are the pretraining's (a variant without one: its finetunes'), mean over its finished "
        f"seeds; train time = seconds in the training "
        f"loop summed over every session of a resumed run (evaluations and start-up excluded); saved = how much "
        f"less than the "
        f"baseline variant {table.baseline} (negative: more), Δ = score minus the baseline's. {DASH} = no data.\n")
    parts.append(f"[low, high] is the {LEVEL:.0%} confidence interval of Δ: a paired t interval on the per-seed "
                 "differences over the seeds both variants ran, when they share seeds (fewer than 2 shared seeds: "
                 "no interval); Welch's unpaired t interval when they share none. *Within noise* = the interval "
                 "contains 0: the seeds do not show the difference to be real.\n")
    if lines := difference_lines(table):
        parts.append("## Differences to the baseline\n")
        parts.append("".join(f"- {line}\n" for line in lines))
    if table.tasks:
        parts.append("## Per task\n")
        parts.append(markdown_table(table.task_headers(), table.task_cells()))
    if table.breakdown:
        parts.append("## Per category\n")
        parts.append(markdown_table(table.breakdown_headers(), table.breakdown_cells()))
        parts.append("Each finetune's score on the items of one category of its eval split, over the whole split "
                     "(`ren eval task` scores every item, so `all` can differ from a final score measured on "
                     "`data.eval_max_samples` items), mean ± sample standard deviation over seeds (n finetunes).\n")
    parts.append("## Missing data\n")
    parts.append("".join(f"- {note}\n" for note in table.notes) or "Nothing is missing.\n")
    if figures:
        parts.append("## Figures\n")
        parts.append("\n".join(f"![{name.removesuffix('.png')}]({name})\n" for name in figures))
    return "\n".join(parts)


def write_report(table: ReportTable, series: ReportSeries, out_dir: Path | str) -> list[Path]:
    """Write ``report.md``, ``table.tex`` and the figures that have data into ``out_dir``
    (created); returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RenError(f"Cannot create the report directory {out}: {exc.strerror or exc}.") from exc
    written: list[Path] = []
    figures = []
    if series.loss:
        _draw_loss(table, series, out / FIGURES[0])
        figures.append(FIGURES[0])
    has_points = any(r.pflops.mean is not None and r.scores.get(t, Stat()).mean is not None
                     for r in table.rows for t in table.tasks)
    if table.tasks and (has_points or series.score_compute):
        _draw_scores(table, series, out / FIGURES[1])
        figures.append(FIGURES[1])
    notes = list(table.notes)
    if not series.loss:
        notes.append("No pretraining loss series: loss.png is not drawn.")
    if FIGURES[1] not in figures:
        notes.append("No finetune score with pretraining compute: score_vs_compute.png is not drawn.")
    shown = dataclasses.replace(table, notes=tuple(notes))
    for name, text in (("report.md", report_markdown(shown, figures)), ("table.tex", table.latex())):
        atomic_write_text(out / name, text)
        written.append(out / name)
    return written + [out / name for name in figures]
