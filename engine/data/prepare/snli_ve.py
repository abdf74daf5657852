"""SNLI-VE: ``snli_ve_{train,dev,test}.jsonl`` and the Flickr30k images -> METER's ``snli_{train,dev,test}.arrow``,
one row per image. See docs/tasks-and-data.md."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from engine.data.prepare import read, writer

SNLI_SCHEMA = pa.schema(
    [("image", pa.binary()), ("sentences", pa.list_(writer.LIST_STRING)), ("labels", writer.LIST_INT)]
)

SNLI_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
_SNLI_FROM = ("the SNLI-VE release (github.com/necla-ml/SNLI-VE: snli_ve_{train,dev,test}.jsonl) with the Flickr30k "
              "images in flickr30k-images/")


def _snli_output(job: writer.Job, name: str, path: Path, folder: Path) -> writer.Output:
    """One SNLI-VE output: the [premise, hypothesis] pairs and labels of ``path`` grouped per image."""
    task = job.task
    output = writer.Output(name, SNLI_SCHEMA)
    images: dict[str, tuple[list[list[str]], list[int]]] = {}
    for number, record in read.read_jsonl(path, task):
        where = f"line {number}"
        image_id = str(read.field(record, "Flickr30K_ID", (str, int), path, where, task))
        premise = read.field(record, "sentence1", str, path, where, task)
        hypothesis = read.field(record, "sentence2", str, path, where, task)
        gold = read.field(record, "gold_label", str, path, where, task)
        if gold not in SNLI_LABELS:
            problem = f"gold_label {gold!r}, expected one of {', '.join(SNLI_LABELS)}"
            output.skipped.append(writer.SkippedRecord(name, f"{where} (image {image_id})", writer.UNKNOWN_LABEL,
                                                       problem))
            continue
        sentences, labels = images.setdefault(image_id, ([], []))
        sentences.append([premise, hypothesis])
        labels.append(SNLI_LABELS[gold])
    for image_id, (sentences, labels) in images.items():
        output.rows.append(
            writer.Row(
                f"{image_id}.jpg ({writer.plural(len(sentences), 'pair')})",
                (folder / f"{image_id}.jpg",),
                (sentences, labels),
                len(sentences),
            )
        )
    return output


def prepare_snli_ve(source: Path, out: Path, *, progress: writer.Progress | None = None,
                    force: bool = False) -> writer.PrepareReport:
    """SNLI-VE in METER's layout (see docs/tasks-and-data.md)."""
    names = {split: f"snli_{split}.arrow" for split in ("train", "dev", "test")}

    def outputs(job: writer.Job, pending: list[str]) -> list[writer.Output]:
        inputs = {split: read.find(job.source, job.task, (f"snli_ve_{split}.jsonl",), _SNLI_FROM) for split in pending}
        folder = read.find(job.source, job.task, read.FLICKR_DIRS, _SNLI_FROM, folder=True)
        return [_snli_output(job, names[split], path, folder) for split, path in inputs.items()]

    return writer.prepare_splits("snli_ve", source, out, progress, force, names, outputs)
