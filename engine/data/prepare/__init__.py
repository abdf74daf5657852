"""``ren data prepare``: an original data set release -> the ViLT/METER arrow files the engine reads.

:func:`prepare` dispatches to one module per source (:mod:`.vqav2`, :mod:`.captions`, :mod:`.nlvr2`,
:mod:`.snli_ve`, :mod:`.refcoco`, :mod:`.vg`, :mod:`.cc_sbu`), which all write through :mod:`.writer`.
Which files each source reads and writes, what follows ViLT and what differs, and how skipped records,
resuming and errors work: docs/tasks-and-data.md, "Preparing the original releases".
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from engine.data.prepare.captions import CAPTION_SCHEMA, prepare_coco_caption, prepare_f30k_caption
from engine.data.prepare.cc_sbu import SHARD_ROWS, prepare_cc, prepare_sbu
from engine.data.prepare.nlvr2 import NLVR2_LABELS, NLVR2_SCHEMA, prepare_nlvr2
from engine.data.prepare.refcoco import _REFER_SPLIT_BY, REFCOCO_SCHEMA, prepare_refer
from engine.data.prepare.snli_ve import SNLI_LABELS, SNLI_SCHEMA, prepare_snli_ve
from engine.data.prepare.vg import VG_SCHEMA, prepare_vg
from engine.data.prepare.vqav2 import VQAV2_REST_VAL_IMAGES, VQAV2_SCHEMA, prepare_vqav2
from engine.data.prepare.writer import (
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    NO_VOCAB_ANSWER,
    UNKNOWN_LABEL,
    UNKNOWN_SPLIT,
    UNREADABLE_IMAGE,
    OutputFile,
    PrepareReport,
    Progress,
    SkippedRecord,
)
from engine.errors import RenError

__all__ = [
    "CAPTION_SCHEMA", "MISSING_ANNOTATION", "MISSING_IMAGE", "NLVR2_LABELS", "NLVR2_SCHEMA", "NO_VOCAB_ANSWER",
    "REFCOCO_SCHEMA", "SHARD_ROWS", "SNLI_LABELS", "SNLI_SCHEMA", "TASKS", "UNKNOWN_LABEL", "UNKNOWN_SPLIT",
    "UNREADABLE_IMAGE", "VG_SCHEMA", "VQAV2_REST_VAL_IMAGES", "VQAV2_SCHEMA", "OutputFile", "PrepareReport",
    "Progress", "SkippedRecord", "prepare", "prepare_cc", "prepare_coco_caption", "prepare_f30k_caption",
    "prepare_nlvr2", "prepare_refer", "prepare_sbu", "prepare_snli_ve", "prepare_vg", "prepare_vqav2",
]

TASKS = ("vqav2", "coco_caption", "f30k_caption", "nlvr2", "snli_ve", "refcoco", "refcoco+", "refcocog", "vg", "cc",
         "sbu")

_CONVERTERS: dict[str, Callable[..., PrepareReport]] = {
    "vqav2": prepare_vqav2,
    "coco_caption": prepare_coco_caption,
    "f30k_caption": prepare_f30k_caption,
    "nlvr2": prepare_nlvr2,
    "snli_ve": prepare_snli_ve,
    **{task: partial(prepare_refer, task) for task in _REFER_SPLIT_BY},
    "vg": prepare_vg,
    "cc": prepare_cc,
    "sbu": prepare_sbu,
}
_OPTIONS = {"split_by": tuple(_REFER_SPLIT_BY), "shard_rows": ("cc", "sbu")}  # option -> the tasks that take it


def prepare(task: str, source: Path, out: Path, *, progress: Progress | None = None, force: bool = False,
            split_by: str | None = None, shard_rows: int | None = None) -> PrepareReport:
    """Write the arrow files of ``task`` into ``out`` from the original release in ``source``.

    ``progress(done, total)`` is called with ``done = 0`` and then after each
    source row (an image, an NLVR2 image pair, a RefCOCO ref) is read, skipped
    ones included; ``total`` counts the rows of the files being written (VQAv2's
    trainable_val and rest_val are copies of val and count nothing). Complete
    files already in ``out`` are kept unless ``force``. A second ``prepare``
    into the same ``out`` while one runs fails with a :class:`RenError` rather
    than waiting. ``split_by`` (RefCOCO's refs file: unc, umd or google) and
    ``shard_rows`` (CC, SBU) are refused for other tasks. The per-task functions
    (:func:`prepare_vqav2` etc.) are the same with the task fixed;
    :func:`prepare_vqav2` also takes ``rest_val_images``.
    """
    converter = _CONVERTERS.get(task)
    if converter is None:
        raise RenError(f"ren data prepare does not know the task {task!r}; the tasks are {', '.join(TASKS)}.")
    options = {name: value for name, value in (("split_by", split_by), ("shard_rows", shard_rows))
               if value is not None}
    for name in options:
        if task not in _OPTIONS[name]:
            raise RenError(f"--{name.replace('_', '-')} is an option of {', '.join(_OPTIONS[name])}, not of {task}.")
    return converter(Path(source), Path(out), progress=progress, force=force, **options)
