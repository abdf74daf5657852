"""A finetuned run's predictions on one split, kept for people to look at: a few scored examples (the
model's most confident errors and a sample of the rest) and the score per category of the data.

``ren eval task RUN --examples N`` (:func:`engine.evaluate.split_predictions`) fills a
:class:`SplitPredictions`; :func:`keep_predictions` writes it into the run's directory and
:func:`kept_predictions` reads it back for ``ren report`` and the TUI's examples view (the store's façade for
predictions: the store itself never imports this module). This module is
plain data (no torch), so the TUI may import it. The rules (what an error is, which examples are kept,
where categories come from): docs/tasks-and-data.md, "Looking at the predictions".
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import RenError
from engine.store import Store, StoreError, _atomic_write_json

SCHEMA = "ren.predictions/1"
DIRECTORY = "predictions"  # in the run's directory
EXAMPLE_SEED = 0  # the sample of non-errors is drawn with this seed, so a re-evaluation keeps the same items

# What the categories of each data set are, and where they come from.
CATEGORY_KINDS = {
    "easy_vqa": "question type",  # colour, shape, yes/no: the answer sets are disjoint, so the answer says which
    "vqav2": "answer type",  # VQA's yes/no, number, other, read from the most-agreed answer
    "snli_ve": "gold label",
    "nlvr2": "gold label",
}
_ORDER = ("colour", "shape", "yes/no", "number", "other")  # known categories first, in this order; then by name
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_NUMBER_WORDS = frozenset({"none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                           "ten"})


def category_of(dataset: str, truth: str) -> str | None:
    """The category of an item whose right answer (or gold label) is ``truth``, for ``dataset``; None where
    the data set has no categories (RefCOCO) or the item has no answer.

    easy-VQA: ``colour``, ``shape`` or ``yes/no`` (its answer sets are disjoint). VQAv2: VQA's answer types
    ``yes/no``, ``number`` and ``other``, by the rule the VQA annotations were typed with, applied to the
    most-agreed answer (ViLT-format files carry no answer_type column). SNLI-VE, NLVR2: the gold label."""
    if not truth:
        return None
    if dataset == "easy_vqa":
        from engine.data.easyvqa import PALETTE, SHAPES

        if truth in ("yes", "no"):
            return "yes/no"
        if truth in SHAPES:
            return "shape"
        return "colour" if truth in PALETTE else None
    if dataset == "vqav2":
        answer = truth.strip().lower()
        if answer in ("yes", "no"):
            return "yes/no"
        return "number" if _NUMBER.match(answer.replace(",", "")) or answer in _NUMBER_WORDS else "other"
    if dataset in ("snli_ve", "nlvr2"):
        return truth
    return None


@dataclass(frozen=True)
class Example:
    """One scored item. ``image``: where the item's image is (file and row, or the easy-VQA image);
    ``thumbnail``: its picture kept with the predictions (a file name in :attr:`SplitPredictions.directory`),
    None when it could not be kept; ``why``: ``confident error`` or ``sample``."""

    index: int  # the item's position in the split, as ``ren eval`` reads it
    text: str  # the question, hypothesis, sentence or referring expression
    image: str
    thumbnail: str | None
    prediction: str
    truth: str
    score: float
    confidence: float  # the model's probability of its prediction
    category: str | None
    why: str

    @property
    def error(self) -> bool:
        return is_error(self.score)


def is_error(score: float) -> bool:
    """An error scores nothing: a wrong class, a VQA answer no annotator gave (or too few, under the
    soft score's rounding), a RefCOCO box overlapping the referred one by less than IoU 0.5."""
    return score <= 0.0


@dataclass(frozen=True)
class CategoryScore:
    """The split's score over the items of one category (``all`` for the whole split)."""

    category: str
    n: int
    score: float
    errors: int


@dataclass(frozen=True)
class SplitPredictions:
    """What ``ren eval task --examples`` keeps of one split. ``directory`` holds the thumbnails."""

    run_id: str
    task: str
    dataset: str
    split: str
    metric: str
    score: float
    samples: int
    category_kind: str | None
    breakdown: tuple[CategoryScore, ...]
    examples: tuple[Example, ...]
    created_at: float
    directory: Path | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """``{dataset}/{split}``, as the run's final scores name the split."""
        return f"{self.dataset}/{self.split}"

    def thumbnail_path(self, example: Example) -> Path | None:
        """Where ``example``'s picture is on disk (None when it has none or the predictions are unsaved)."""
        if example.thumbnail is None or self.directory is None:
            return None
        return self.directory / example.thumbnail

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("directory")
        return {"schema": SCHEMA, **doc}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], directory: Path | None = None) -> SplitPredictions:
        fields = {key: value for key, value in doc.items() if key != "schema"}
        fields["breakdown"] = tuple(CategoryScore(**item) for item in doc["breakdown"])
        fields["examples"] = tuple(Example(**item) for item in doc["examples"])
        return cls(**fields, directory=directory)


def breakdown(categories: Sequence[str | None], scores: Sequence[float]) -> tuple[CategoryScore, ...]:
    """The mean score and error count of each category (items without one only count in ``all``), known
    categories in a fixed order, the rest by name, then ``all``."""
    if len(categories) != len(scores):
        raise ValueError(f"{len(categories)} categories for {len(scores)} scores")
    groups: dict[str, list[float]] = {}
    for category, score in zip(categories, scores):
        if category is not None:
            groups.setdefault(category, []).append(score)
    order = sorted(groups, key=lambda c: (_ORDER.index(c) if c in _ORDER else len(_ORDER), c))
    rows = [CategoryScore(c, len(groups[c]), statistics.fmean(groups[c]), sum(map(is_error, groups[c])))
            for c in order]
    if scores:
        rows.append(CategoryScore("all", len(scores), statistics.fmean(scores), sum(map(is_error, scores))))
    return tuple(rows)


def pick_examples(scores: Sequence[float], confidences: Sequence[float], n: int,
                  seed: int = EXAMPLE_SEED) -> list[tuple[int, str]]:
    """Which ``n`` items to keep, as ``(position, why)``: up to half (rounded up) are the errors the model was
    most sure of, by confidence (ties by position); the rest a random sample (``seed``) of the other items,
    errors included, in position order. Fewer when there are fewer items; none for ``n = 0``."""
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    errors = sorted((i for i, s in enumerate(scores) if is_error(s)), key=lambda i: (-confidences[i], i))
    confident = errors[:(n + 1) // 2]
    taken = set(confident)
    rest = [i for i in range(len(scores)) if i not in taken]
    sample = sorted(random.Random(seed).sample(rest, min(n - len(confident), len(rest))))
    return [(i, "confident error") for i in confident] + [(i, "sample") for i in sample]


def _split_directory(run_dir: Path, dataset: str, split: str) -> Path:
    return run_dir / DIRECTORY / f"{dataset}-{split}".replace("/", "_")


def save_predictions(run_dir: Path, predictions: SplitPredictions, thumbnails: Mapping[str, bytes]) -> Path:
    """Write ``predictions`` and its ``thumbnails`` (file name -> PNG bytes) into ``run_dir``, replacing what an
    earlier evaluation kept for the same split. The images go into a fresh folder first; ``examples.json``
    there, written last (atomically), is what makes the folder count, and the previous folder is then
    removed, so a kill at any point leaves the old predictions or the new ones, whole. Returns the folder."""
    final = _split_directory(run_dir, predictions.dataset, predictions.split)
    fresh = final.with_name(f".{final.name}.{secrets.token_hex(4)}")
    try:
        fresh.mkdir(parents=True)
        for name, data in thumbnails.items():
            (fresh / name).write_bytes(data)
    except OSError as exc:
        shutil.rmtree(fresh, ignore_errors=True)
        raise StoreError(f"Cannot write the predictions of {predictions.key} into {fresh}: {exc}.") from exc
    _atomic_write_json(fresh / "examples.json", predictions.to_doc())
    old = final.with_name(f".{final.name}.old.{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        final.rename(old)
    fresh.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_predictions(run_dir: Path) -> list[SplitPredictions]:
    """Every split's kept predictions in ``run_dir``, by key; folders left half-written by a kill are
    skipped. A :class:`RenError` names a file that cannot be read."""
    import json

    base = run_dir / DIRECTORY
    found = []
    for path in sorted(base.glob("*/examples.json")) if base.is_dir() else ():
        if path.parent.name.startswith("."):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            found.append(SplitPredictions.from_doc(doc, path.parent))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RenError(f"Cannot read the kept predictions {path}: {exc}. Evaluate again with "
                           "`ren eval task RUN --split SPLIT --examples N` to rewrite them.") from exc
    return sorted(found, key=lambda p: p.key)


def keep_predictions(store: Store, run_id: str, predictions: SplitPredictions, thumbnails: Mapping[str, bytes]
                     ) -> Path:
    """Keep a split's scored examples and per-category scores (and the examples' pictures, PNG bytes by file
    name) with run ``run_id`` of ``store``, replacing what was kept for that split before; returns their
    folder (:func:`save_predictions`)."""
    return save_predictions(store.run_dir(run_id), predictions, thumbnails)


def kept_predictions(store: Store, run_id: str) -> list[SplitPredictions]:
    """Run ``run_id``'s kept predictions, one per evaluated split (``ren eval task``), by ``dataset/split``."""
    return load_predictions(store.run_dir(run_id))
