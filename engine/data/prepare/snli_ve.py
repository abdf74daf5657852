"""SNLI-VE: ``snli_ve_{train,dev,test}.jsonl`` and the Flickr30k images -> METER's ``snli_{train,dev,test}.arrow``,
one row per image. See docs/tasks-and-data.md."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from engine.data.prepare._read import _FLICKR_DIRS, _field, _find, _read_jsonl
from engine.data.prepare._writer import (
    _LIST_INT,
    _LIST_STRING,
    UNKNOWN_LABEL,
    PrepareReport,
    Progress,
    SkippedRecord,
    _Job,
    _Output,
    _plural,
    _prepare_splits,
    _Row,
)

SNLI_SCHEMA = pa.schema([("image", pa.binary()), ("sentences", pa.list_(_LIST_STRING)), ("labels", _LIST_INT)])

SNLI_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
_SNLI_FROM = ("the SNLI-VE release (github.com/necla-ml/SNLI-VE: snli_ve_{train,dev,test}.jsonl) with the Flickr30k "
              "images in flickr30k-images/")


def _snli_output(job: _Job, name: str, path: Path, folder: Path) -> _Output:
    """One SNLI-VE output: the [premise, hypothesis] pairs and labels of ``path`` grouped per image."""
    task = job.task
    output = _Output(name, SNLI_SCHEMA)
    images: dict[str, tuple[list[list[str]], list[int]]] = {}
    for number, record in _read_jsonl(path, task):
        where = f"line {number}"
        image_id = str(_field(record, "Flickr30K_ID", (str, int), path, where, task))
        premise = _field(record, "sentence1", str, path, where, task)
        hypothesis = _field(record, "sentence2", str, path, where, task)
        gold = _field(record, "gold_label", str, path, where, task)
        if gold not in SNLI_LABELS:
            output.skipped.append(SkippedRecord(name, f"{where} (image {image_id})", UNKNOWN_LABEL,
                                                f"gold_label {gold!r}, expected one of {', '.join(SNLI_LABELS)}"))
            continue
        sentences, labels = images.setdefault(image_id, ([], []))
        sentences.append([premise, hypothesis])
        labels.append(SNLI_LABELS[gold])
    for image_id, (sentences, labels) in images.items():
        output.rows.append(_Row(f"{image_id}.jpg ({_plural(len(sentences), 'pair')})", (folder / f"{image_id}.jpg",),
                                (sentences, labels), len(sentences)))
    return output


def prepare_snli_ve(source: Path, out: Path, *, progress: Progress | None = None,
                    force: bool = False) -> PrepareReport:
    """SNLI-VE in METER's layout (see docs/tasks-and-data.md)."""
    names = {split: f"snli_{split}.arrow" for split in ("train", "dev", "test")}

    def outputs(job: _Job, pending: list[str]) -> list[_Output]:
        inputs = {split: _find(job.source, job.task, (f"snli_ve_{split}.jsonl",), _SNLI_FROM) for split in pending}
        folder = _find(job.source, job.task, _FLICKR_DIRS, _SNLI_FROM, folder=True)
        return [_snli_output(job, names[split], path, folder) for split, path in inputs.items()]

    return _prepare_splits("snli_ve", source, out, progress, force, names, outputs)
