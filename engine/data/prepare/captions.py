"""COCO and Flickr30k captions: Karpathy's ``dataset_coco.json``/``dataset_flickr30k.json`` and the images ->
``coco_caption_karpathy_*.arrow``, ``f30k_caption_karpathy_*.arrow``, one row per image. See docs/tasks-and-data.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from engine.data.prepare import read, writer

CAPTION_SCHEMA = pa.schema([("image", pa.binary()), ("caption", writer.LIST_STRING), ("image_id", writer.STRING),
                            ("split", writer.STRING)])

_KARPATHY_FROM = "Karpathy's caption_datasets.zip (dataset_coco.json, dataset_flickr30k.json)"


def _karpathy_outputs(job: writer.Job, pending: Sequence[str], names: dict[str, str], annotations: tuple[str, ...],
                      ) -> list[writer.Output]:
    """The outputs of the ``pending`` Karpathy splits; records of no known split go into the report."""
    task, source = job.task, job.source
    path = read.find(source, task, annotations, _KARPATHY_FROM + " and the images")
    flickr = None if task == "coco_caption" else read.find(source, task, read.FLICKR_DIRS, "the Flickr30k images "
                                                           "(flickr30k-images/) and " + _KARPATHY_FROM, folder=True)
    folders: dict[str, Path] = {}

    def coco_folder(filepath: str) -> Path:
        if filepath not in folders:
            folders[filepath] = read.find(source, task, (filepath,), "the COCO images (train2014/, val2014/ from "
                                          "cocodataset.org) and " + _KARPATHY_FROM, folder=True)
        return folders[filepath]

    outputs = {split: writer.Output(names[split], CAPTION_SCHEMA) for split in pending}
    for index, record in enumerate(read.top_list(read.read_json(path, task), "images", path, task)):
        where = f"images[{index}]"
        filename = read.field(record, "filename", str, path, where, task)
        split = read.field(record, "split", str, path, where, task)
        captions = [read.field(sentence, "raw", str, path, f"{where}.sentences[{k}]", task)
                    for k, sentence in enumerate(read.field(record, "sentences", list, path, where, task))]
        if split not in names:
            job.report.skipped.append(writer.SkippedRecord("", f"{where} ({filename})", writer.UNKNOWN_SPLIT,
                                                           f"split {split!r}, expected one of {', '.join(names)}"))
        elif split in outputs and not captions:
            outputs[split].skipped.append(writer.SkippedRecord(names[split], filename, writer.MISSING_ANNOTATION,
                                                               f"{where} has no sentences"))
        elif split in outputs:
            folder = (
                flickr if flickr is not None else coco_folder(read.field(record, "filepath", str, path, where, task))
            )
            outputs[split].rows.append(writer.Row(filename, (folder / filename,), (captions, filename, split),
                                                  len(captions)))
    return [outputs[split] for split in pending]


def _prepare_karpathy(task: str, source: Path, out: Path, progress: writer.Progress | None, force: bool,
                      annotations: tuple[str, ...], splits: tuple[str, ...], prefix: str) -> writer.PrepareReport:
    names = {split: f"{prefix}_{split}.arrow" for split in splits}
    return writer.prepare_splits(task, source, out, progress, force, names,
                                 lambda job, pending: _karpathy_outputs(job, pending, names, annotations))


def prepare_coco_caption(source: Path, out: Path, *, progress: writer.Progress | None = None,
                         force: bool = False) -> writer.PrepareReport:
    """COCO captions, Karpathy splits (see docs/tasks-and-data.md)."""
    return _prepare_karpathy("coco_caption", source, out, progress, force,
                             ("dataset_coco.json", "karpathy/dataset_coco.json"),
                             ("train", "restval", "val", "test"), "coco_caption_karpathy")


def prepare_f30k_caption(source: Path, out: Path, *, progress: writer.Progress | None = None,
                         force: bool = False) -> writer.PrepareReport:
    """Flickr30k captions, Karpathy splits (see docs/tasks-and-data.md)."""
    return _prepare_karpathy("f30k_caption", source, out, progress, force,
                             ("dataset_flickr30k.json", "karpathy/dataset_flickr30k.json"),
                             ("train", "val", "test"), "f30k_caption_karpathy")
