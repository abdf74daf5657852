"""Conceptual Captions and SBU Captions in ViLT's layout: ``[image path, caption]`` lists and the image folders ->
``conceptual_caption_{train,val}_{i}.arrow`` and ``sbu_{i}.arrow``, in shards of ``shard_rows`` images. See
docs/tasks-and-data.md."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from engine.data.prepare import read, writer
from engine.data.prepare.captions import CAPTION_SCHEMA
from engine.errors import RenError

SHARD_ROWS = 100_000  # ViLT's images per conceptual_caption_*/sbu_* shard

_CC_FROM = ("ViLT's layout of a Conceptual Captions download (see ViLT's DATA.md): train_annot.json and "
            "val_annot.json, each a JSON list of [image path, caption], and the images in images_train/<folder>/ "
            "and images_val/<folder>/")
_SBU_FROM = ("ViLT's layout of an SBU Captions download (see ViLT's DATA.md): annot.json, a JSON list of [image path, "
             "caption], and the images in images_train/<folder>/")


@dataclass
class _Annotated:
    """The annotated images of a CC/SBU split: (file name, index of its folder, captions), in annotation order."""

    items: list[tuple[str, int, list[str]]]
    folders: list[Path]
    skipped: list[writer.SkippedRecord]
    notes: list[str]


def _annotated_images(job: writer.Job, annotations: str, images: str, expected: str, output: str) -> _Annotated:
    """The captions of ``annotations`` matched by file name to the files in ``images`` and its subfolders."""
    task = job.task
    path = read.find(job.source, task, (annotations,), expected)
    root = read.find(job.source, task, (images,), expected, folder=True)
    with os.scandir(root) as entries:
        folders = [root, *sorted(Path(entry.path) for entry in entries if entry.is_dir())]
    found: dict[str, int] = {}
    repeated = 0
    for number, folder in enumerate(folders):
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and not entry.name.startswith("."):
                    repeated += entry.name in found
                    found.setdefault(entry.name, number)
    captions: dict[str, list[str]] = {}
    for index, entry in enumerate(read.json_list(path, task, "[image path, caption] pairs")):
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(value, str) for value in entry)):
            raise RenError(f"{task}: entry [{index}] of {path} is {str(entry)[:80]!r}, expected [image path, caption] "
                           "(two strings).")
        captions.setdefault(entry[0].rsplit("/", 1)[-1], []).append(entry[1])
    annotated = _Annotated([], folders, [], [])
    for name, texts in captions.items():
        if name in found:
            annotated.items.append((name, found[name], texts))
        else:
            annotated.skipped.append(
                writer.SkippedRecord(output, name, writer.MISSING_IMAGE, f"no file {name} in {root}/ or its subfolders")
            )
    if unannotated := len(found) - len(annotated.items):
        annotated.notes.append(f"{writer.plural(unannotated, 'image file')} in {root}/ had no caption in {path.name}; "
                               "they were not written.")
    if repeated:
        annotated.notes.append(
            f"{writer.plural(repeated, 'image file name')} stood in more than one folder of {root}/; "
            "the first folder's file (by name) was used."
        )
    return annotated


def _shard_row(split: str, folders: list[Path], item: tuple[str, int, list[str]]) -> writer.Row:
    name, folder, captions = item
    return writer.Row(name, (folders[folder] / name,), (captions, name, split), len(captions))


def _prepare_shards(task: str, source: Path, out: Path, progress: writer.Progress | None, force: bool, shard_rows: int,
                    splits: dict[str, tuple[str, str, str]], expected: str) -> writer.PrepareReport:
    """CC or SBU: ``splits`` maps split -> (annotation file, image folder, shard name prefix)."""
    if shard_rows < 1:
        raise RenError(f"{task}: shard_rows must be at least 1, got {shard_rows}.")
    with writer.Job(task, source, out, progress, force) as job:
        names: list[str] = []
        outputs: list[writer.Output] = []
        for split, (annotations, images, prefix) in splits.items():
            annotated = _annotated_images(job, annotations, images, expected, f"{prefix}_*.arrow")
            total = len(annotated.items)
            shards = {f"{prefix}_{k}.arrow": (k * shard_rows, min(total, (k + 1) * shard_rows))
                      for k in range(max(1, -(-total // shard_rows)))}
            job.remove_stale(split, list(shards))
            names.extend(shards)
            pending = []
            for name, (start, stop) in shards.items():
                metadata = {b"ren.shard": f"images {start}-{stop} of {total}".encode()}
                if not job.complete(name, metadata):
                    pending.append(writer.Output(name, CAPTION_SCHEMA.with_metadata(metadata), writer.LazyRows(
                        annotated.items[start:stop], partial(_shard_row, split, annotated.folders))))
            if pending:
                job.report.skipped.extend(annotated.skipped)
                job.report.notes.extend(annotated.notes)
                outputs.extend(pending)
        if outputs:
            job.write(outputs)
        return job.finish(names)


def prepare_cc(source: Path, out: Path, *, progress: writer.Progress | None = None, force: bool = False,
               shard_rows: int = SHARD_ROWS) -> writer.PrepareReport:
    """Conceptual Captions in ViLT's layout, ``shard_rows`` images per shard (see docs/tasks-and-data.md)."""
    return _prepare_shards("cc", source, out, progress, force, shard_rows,
                           {split: (f"{split}_annot.json", f"images_{split}", f"conceptual_caption_{split}")
                            for split in ("train", "val")}, _CC_FROM)


def prepare_sbu(source: Path, out: Path, *, progress: writer.Progress | None = None, force: bool = False,
                shard_rows: int = SHARD_ROWS) -> writer.PrepareReport:
    """SBU Captions in ViLT's layout, ``shard_rows`` images per shard (see docs/tasks-and-data.md)."""
    return _prepare_shards("sbu", source, out, progress, force, shard_rows,
                           {"train": ("annot.json", "images_train", "sbu")}, _SBU_FROM)
