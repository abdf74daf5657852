"""RefCOCO, RefCOCO+ and RefCOCOg: lichengunc/refer's refs pickle and ``instances.json`` with the COCO train2014
images -> ``<task>_<split_by>_<split>.arrow``, one row per ref, as Renaissance's ``write_refcoco``. See
docs/tasks-and-data.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from engine.data.prepare import read, writer
from engine.errors import RenError

REFCOCO_SCHEMA = pa.schema([("image", pa.binary()), ("sentences", writer.LIST_STRING),
                            ("bboxes", pa.list_(pa.list_(pa.float64()))), ("labels", pa.int64())])

_REFER_SPLITS = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test"), "google": ("train", "val")}
_REFER_SPLIT_BY = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google")}  # the first is the default
_REFER_FROM = ("lichengunc/refer's data (the {task} zip unpacked into the source folder: {task}/refs({split_by}).p and "
               "{task}/instances.json) and the COCO train2014 images in images/mscoco/train2014/ or train2014/")
_COCO_TRAIN_DIRS = ("images/mscoco/train2014", "train2014")


def _refer_split_by(source: Path, task: str, split_by: str | None) -> str:
    """``split_by`` when given, else the first of the task's splits whose refs file is in ``source`` (the first of
    them when none is)."""
    releases = _REFER_SPLIT_BY[task]
    if split_by is None:
        return next((name for name in releases if (source / task / f"refs({name}).p").is_file()), releases[0])
    if split_by not in releases:
        raise RenError(f"{task}: there is no split by {split_by!r}; {task} is split by {' or '.join(releases)}.")
    return split_by


def _refer_objects(path: Path, task: str) -> tuple[dict[int, str], dict[int, tuple[list[int], list[list[float]]]]]:
    """From ``instances.json``: image id -> file name, and image id -> (its annotation ids, their [x, y, w, h]
    boxes), in file order."""
    content = read.read_json(path, task)
    files: dict[int, str] = {}
    for index, image in enumerate(read.top_list(content, "images", path, task)):
        where = f"images[{index}]"
        files[read.field(image, "id", int, path, where, task)] = read.field(image, "file_name", str, path, where, task)
    objects: dict[int, tuple[list[int], list[list[float]]]] = {}
    for index, annotation in enumerate(read.top_list(content, "annotations", path, task)):
        where = f"annotations[{index}]"
        ids, boxes = objects.setdefault(read.field(annotation, "image_id", int, path, where, task), ([], []))
        ids.append(read.field(annotation, "id", int, path, where, task))
        boxes.append(
            read.numbers(
                read.field(annotation, "bbox", list, path, where, task),
                4,
                path,
                f"{where}.bbox",
                task,
                "[x, y, width, height]",
            )
        )
    return files, objects


def _refer_outputs(
    job: writer.Job, pending: Sequence[str], names: dict[str, str], split_by: str
) -> list[writer.Output]:
    """The outputs of the ``pending`` splits of a RefCOCO data set: one row per ref."""
    task = job.task
    expected = _REFER_FROM.format(task=task, split_by=split_by)
    refs_path = read.find(job.source, task, (f"{task}/refs({split_by}).p",), expected)
    instances = read.find(job.source, task, (f"{task}/instances.json",), expected)
    folder = read.find(job.source, task, _COCO_TRAIN_DIRS, expected, folder=True)
    refs = read.read_pickle(refs_path, task)
    if not isinstance(refs, list):
        raise RenError(f"{task}: {refs_path} holds {read.TYPE_NAMES.get(type(refs), type(refs).__name__)}, expected a "
                       "list of refs (dicts with ref_id, ann_id, image_id, split and sentences).")
    files, objects = _refer_objects(instances, task)
    outputs = {split: writer.Output(names[split], REFCOCO_SCHEMA) for split in pending}
    for index, ref in enumerate(refs):
        where = f"refs[{index}]"
        split = read.field(ref, "split", str, refs_path, where, task)
        if split not in names:
            job.report.skipped.append(writer.SkippedRecord("", where, writer.UNKNOWN_SPLIT,
                                                           f"split {split!r}, expected one of {', '.join(names)}"))
            continue
        if split not in outputs:
            continue
        ref_id, ann_id, image_id = (read.field(ref, key, int, refs_path, where, task)
                                    for key in ("ref_id", "ann_id", "image_id"))
        sentences = [read.field(sentence, "sent", str, refs_path, f"{where}.sentences[{k}]", task)
                     for k, sentence in enumerate(read.field(ref, "sentences", list, refs_path, where, task))]
        output, (ids, boxes) = outputs[split], objects.get(image_id, ([], []))
        problem = ("it has no sentences" if not sentences
                   else f"its image {image_id} is not in {instances}" if image_id not in files
                   else f"its annotation {ann_id} is not one of image {image_id}'s in {instances}" if ann_id not in ids
                   else "")
        if problem:
            output.skipped.append(
                writer.SkippedRecord(output.name, f"ref {ref_id}", writer.MISSING_ANNOTATION, problem)
            )
            continue
        output.rows.append(writer.Row(f"ref {ref_id} ({files[image_id]})", (folder / files[image_id],),
                                      (sentences, boxes, ids.index(ann_id)), len(sentences)))
    return list(outputs.values())


def prepare_refer(task: str, source: Path, out: Path, *, progress: writer.Progress | None = None, force: bool = False,
                  split_by: str | None = None) -> writer.PrepareReport:
    """RefCOCO, RefCOCO+ or RefCOCOg (``task``), split by ``split_by`` (default: unc, umd for refcocog, or google
    when only its refs file is there); see docs/tasks-and-data.md."""
    if task not in _REFER_SPLIT_BY:
        raise RenError(f"prepare_refer prepares {', '.join(_REFER_SPLIT_BY)}, not {task!r}.")
    split_by = _refer_split_by(Path(source), task, split_by)
    names = {split: f"{task}_{split_by}_{split}.arrow" for split in _REFER_SPLITS[split_by]}
    notes = [f"{task}: split by {split_by} (refs({split_by}).p)."]
    if split_by == "google":
        notes.append(f"ren's {task} data reads {task}_umd_*.arrow; the google split's files are for other readers.")
    return writer.prepare_splits(task, source, out, progress, force, names,
                                 lambda job, pending: _refer_outputs(job, pending, names, split_by), notes)
