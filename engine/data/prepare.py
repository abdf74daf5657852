"""``ren data prepare``: an original data set release -> the ViLT/METER arrow files the engine reads.

:func:`prepare` reads the original annotation files and image folders of a
task from ``source`` and writes the arrow files of :data:`engine.data.arrow.ARROW_KINDS`
into ``out``, one row per image (one per image pair for NLVR2, one per referred
object for RefCOCO) holding all texts of that image, the image stored as its
original encoded bytes, as ViLT's ``vilt/utils/write_*.py`` (METER's
``write_snli.py`` for SNLI-VE, Renaissance's ``write_refcoco`` for RefCOCO) do:

* ``vqav2``: ``v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json``,
  ``v2_mscoco_{train2014,val2014}_annotations.json`` and the COCO folders ``train2014/``,
  ``val2014/``, ``test2015/`` (``COCO_train2014_000000xxxxxx.jpg``) -> ``vqav2_{train,val,test,
  test-dev}.arrow``, and val cut in two: ``vqav2_trainable_val.arrow`` (all but the last
  :data:`VQAV2_REST_VAL_IMAGES` rows) and ``vqav2_rest_val.arrow`` (those).
* ``coco_caption``: Karpathy's ``dataset_coco.json`` (or ``karpathy/dataset_coco.json``), images at
  ``<filepath>/<filename>`` (``val2014/COCO_val2014_...jpg``) -> ``coco_caption_karpathy_{train,
  restval,val,test}.arrow``.
* ``f30k_caption``: ``dataset_flickr30k.json`` (or ``karpathy/...``), images in ``flickr30k-images/``
  (or METER's ``Flickr30K/images/``) -> ``f30k_caption_karpathy_{train,val,test}.arrow``.
* ``nlvr2``: ``{train,dev,test1}.json`` (JSON lines, in ``source``, ``data/`` or ``nlvr2/data/``),
  images ``images/train/<directory>/<pair>-img0.png``/``-img1.png`` and ``dev/``, ``test1/`` (or
  ``images/dev/``, ``images/test1/``) -> ``nlvr2_{train,dev,test1}.arrow``; also
  ``nlvr2_{balanced,unbalanced}_{dev,test1}.arrow`` when ``balanced/balanced_dev.json`` etc. exist.
* ``snli_ve``: ``snli_ve_{train,dev,test}.jsonl`` and ``flickr30k-images/<Flickr30K_ID>.jpg`` (or
  ``Flickr30K/images/``) -> ``snli_{train,dev,test}.arrow``.
* ``refcoco``, ``refcoco+``, ``refcocog``: lichengunc/refer's ``<task>/refs(unc).p`` (refcocog:
  ``refs(umd).p``, or ``refs(google).p`` with ``split_by="google"`` or when it is the only one) and
  ``<task>/instances.json``, with the COCO images in ``images/mscoco/train2014/`` (or ``train2014/``)
  -> ``<task>_unc_{train,val,testA,testB}.arrow``, ``refcocog_umd_{train,val,test}.arrow``
  (``refcocog_google_{train,val}.arrow``).
* ``vg``: Visual Genome's ``region_descriptions.json`` (or ``annotations/...``, ViLT's place) and
  the images ``VG_100K/<image_id>.jpg`` and ``VG_100K_2/`` (or ``images/VG_100K/`` ...) -> ``vg.arrow``;
  ``image_data.json`` is not needed.
* ``cc``: ViLT's layout of a Conceptual Captions download, ``{train,val}_annot.json`` (lists of
  [image path, caption]) and ``images_{train,val}/<folder>/<file>`` -> ``conceptual_caption_{train,
  val}_{i}.arrow``; ``sbu``: ``annot.json`` and ``images_train/`` -> ``sbu_{i}.arrow``. Each shard
  holds at most ``shard_rows`` (:data:`SHARD_ROWS`, ViLT's 100,000) images.

What follows ViLT and what differs
----------------------------------
* VQAv2: the answer vocabulary counts ``multiple_choice_answer`` of every
  train2014 and val2014 question, normalised, and keeps those seen at least 9
  times (:func:`engine.vqa_answers.build_answer_vocab`, ordered by count rather
  than ViLT's first-seen order, so label ids differ from ViLT's published files;
  the engine reads the vocabulary back from the ``answers`` column). A
  question's labels and soft scores are :func:`engine.vqa_answers.soft_targets`
  of its ten answers (which normalises each answer before counting; ViLT counts
  them as written, so "two" does not count for "2" there), and ``answers`` holds
  the vocabulary strings of those labels, as ViLT writes them. Train and val questions with no answer in the
  vocabulary are left out (ViLT's filter), and so are images left without
  questions. One column more than ViLT's: ``raw_answers``, each question's ten
  annotators' answers as given, so that evaluation can compute the official VQA
  accuracy (ViLT's readers ignore it). Test rows have empty answer lists, typed like the train rows
  (ViLT's are ``list<null>``; the reader accepts both). ViLT shuffles the images
  of a split at random before writing and cuts ``rest_val`` (its minival) off as
  the last 1,000 rows of ``vqav2_val.arrow``; here rows follow the order of the
  annotation files, so the cut is reproducible. ``trainable_val`` and
  ``rest_val`` are rewritten whenever ``vqav2_val.arrow`` is.
* Caption sets: ``caption`` holds the ``raw`` sentences of the Karpathy record,
  ``image_id`` its file name, ``split`` its Karpathy split; rows follow the JSON.
* NLVR2: sentences are grouped by their identifier less its last ``-k`` (the
  image pair ``split-set-pair``), which is also the row's ``identifier``; the
  images are ``<identifier>-img0.png`` and ``-img1.png`` in the folder of the
  identifier's split (``images/train/<directory>/`` for train).
* SNLI-VE: ``sentences`` holds [premise, hypothesis] pairs, ``labels`` 0
  contradiction, 1 neutral, 2 entailment, grouped per ``Flickr30K_ID``.
* RefCOCO: one row per ref, as Renaissance's ``write_refcoco``: ``sentences``
  the ``sent`` of each of its sentences, ``bboxes`` the ``bbox`` of every
  annotation of its image in ``instances.json`` order, ``labels`` the index of
  the ref's ``ann_id`` among them; the image is ``instances.json``'s
  ``file_name`` of its ``image_id``. ``testA`` and ``testB`` are written
  apart (Renaissance writes them together as ``test``). The refs pickle, written
  by Python 2, is read with its byte strings decoded as UTF-8 (as Latin-1 where
  they are not UTF-8) and only lists, dicts, strings and numbers allowed in it:
  unpickling anything else could run code, so it is refused.
* VG: regions are grouped per ``image_id`` in file order (ViLT shuffles the
  images); ``caption`` holds their ``phrase`` and ``width``, ``height``, ``x``,
  ``y`` their boxes; ``image_id`` is the id as a string.
* CC and SBU: an annotation's image is found, as ViLT finds it, by its file name
  (the last part of its path) among the files in the subfolders of
  ``images_{split}/``; ``image_id`` is that file name. Captions of the same file
  name share its row (ViLT keeps the last). Rows follow the annotation file
  (ViLT shuffles them) and are cut into shards of ``shard_rows`` annotated
  images found on disk, so an unreadable image makes its shard a row shorter.
  Each shard records its rows' range in its schema metadata (``ren.shard``),
  so a shard cut differently (another ``shard_rows``, another image folder) is
  not kept as complete, and shard files of the split beyond the new count are
  removed (they would be read as part of it).

Skipped records, resuming, errors
---------------------------------
A record is left out, and listed in the :class:`PrepareReport`, when its image
file is missing or does not decode with PIL, or when it has no text
(``missing annotation``; for RefCOCO also an image or annotation the ref names
that ``instances.json`` lacks), an unknown label or split, or (VQAv2) no answer
in the vocabulary. Each output file is written to ``.<name>.partial`` in
record batches of at most :data:`BATCH_ROWS` rows or :data:`BATCH_BYTES` image
bytes (images are never all in memory), synced, then renamed over ``<name>``;
an existing complete file (an arrow file whose footer and columns are right) is
kept unless ``force``, so an interrupted run resumes at its first unfinished
file. A missing input file or image folder, or malformed JSON or pickle, raises a
:class:`~engine.errors.RenError` naming the file, the record and the key.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock, Timeout
from PIL import Image

from engine.data.arrow import ArrowKind, arrow_kind, check_schema
from engine.errors import RenError
from engine.vqa_answers import build_answer_vocab, load_vqa_json, soft_targets

Progress = Callable[[int, int], None]

TASKS = ("vqav2", "coco_caption", "f30k_caption", "nlvr2", "snli_ve", "refcoco", "refcoco+", "refcocog", "vg", "cc",
         "sbu")
BATCH_ROWS = 1000
BATCH_BYTES = 64 << 20
VQAV2_REST_VAL_IMAGES = 1000  # ViLT's rest_val: the last 1,000 images of vqav2_val.arrow
SHARD_ROWS = 100_000  # ViLT's images per conceptual_caption_*/sbu_* shard

MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
MISSING_ANNOTATION = "missing annotation"
UNKNOWN_LABEL = "unknown label"
UNKNOWN_SPLIT = "unknown split"
NO_VOCAB_ANSWER = "no answer in the vocabulary"

_EXAMPLES_PER_REASON = 3
_LOCK_NAME = ".ren-prepare.lock"

_STRING = pa.string()
_LIST_STRING = pa.list_(pa.string())
_LIST_INT = pa.list_(pa.int64())
CAPTION_SCHEMA = pa.schema([("image", pa.binary()), ("caption", _LIST_STRING), ("image_id", _STRING),
                            ("split", _STRING)])
VQAV2_SCHEMA = pa.schema([("image", pa.binary()), ("questions", _LIST_STRING), ("answers", pa.list_(_LIST_STRING)),
                          ("answer_labels", pa.list_(_LIST_INT)), ("answer_scores", pa.list_(pa.list_(pa.float64()))),
                          ("image_id", pa.int64()), ("question_id", _LIST_INT), ("split", _STRING),
                          ("raw_answers", pa.list_(_LIST_STRING))])
NLVR2_SCHEMA = pa.schema([("image_0", pa.binary()), ("image_1", pa.binary()), ("questions", _LIST_STRING),
                          ("answers", _LIST_STRING), ("identifier", _STRING)])
SNLI_SCHEMA = pa.schema([("image", pa.binary()), ("sentences", pa.list_(_LIST_STRING)), ("labels", _LIST_INT)])
REFCOCO_SCHEMA = pa.schema([("image", pa.binary()), ("sentences", _LIST_STRING),
                            ("bboxes", pa.list_(pa.list_(pa.float64()))), ("labels", pa.int64())])
VG_SCHEMA = pa.schema([("image", pa.binary()), ("caption", _LIST_STRING), *((c, _LIST_INT) for c in ("width", "height",
                       "x", "y")), ("image_id", _STRING)])

SNLI_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
NLVR2_LABELS = ("True", "False")

_VQAV2_SPLITS = {  # split -> questions file, annotations file (None for test splits), image folder
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
}
_VQAV2_FROM = ("the VQAv2 release from visualqa.org (the questions and annotations zips, unpacked into the source "
               "folder) and the COCO image folders train2014/, val2014/ and test2015/ from cocodataset.org")
_KARPATHY_FROM = "Karpathy's caption_datasets.zip (dataset_coco.json, dataset_flickr30k.json)"
_FLICKR_DIRS = ("flickr30k-images", "Flickr30K/images")
_NLVR2_DATA_DIRS = ("", "data", "nlvr2/data")
_NLVR2_FROM = ("the NLVR2 release (github.com/lil-lab/nlvr, nlvr2/data/*.json: one JSON object per line) with its "
               "images in images/train/<directory>/, dev/ and test1/")
_SNLI_FROM = ("the SNLI-VE release (github.com/necla-ml/SNLI-VE: snli_ve_{train,dev,test}.jsonl) with the Flickr30k "
              "images in flickr30k-images/")
_REFER_SPLITS = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test"), "google": ("train", "val")}
_REFER_SPLIT_BY = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google")}  # the first is the default
_REFER_FROM = ("lichengunc/refer's data (the {task} zip unpacked into the source folder: {task}/refs({split_by}).p and "
               "{task}/instances.json) and the COCO train2014 images in images/mscoco/train2014/ or train2014/")
_VG_FROM = ("Visual Genome's region_descriptions.json (visualgenome.org, in the source folder or annotations/) and "
            "its images VG_100K/ and VG_100K_2/ (in the source folder or images/)")
_COCO_TRAIN_DIRS = ("images/mscoco/train2014", "train2014")
_VG_FOLDERS = (("VG_100K", "images/VG_100K"), ("VG_100K_2", "images/VG_100K_2"))
_CC_FROM = ("ViLT's layout of a Conceptual Captions download (see ViLT's DATA.md): train_annot.json and "
            "val_annot.json, each a JSON list of [image path, caption], and the images in images_train/<folder>/ "
            "and images_val/<folder>/")
_SBU_FROM = ("ViLT's layout of an SBU Captions download (see ViLT's DATA.md): annot.json, a JSON list of [image path, "
             "caption], and the images in images_train/<folder>/")


@dataclass(frozen=True)
class SkippedRecord:
    """A source record left out of ``output``: what it was, why, and the file or value at fault."""

    output: str  # the output file's name ("" when the record belongs to no output, e.g. an unknown split)
    record: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class OutputFile:
    """One output file: its rows and texts, and whether this call ``written`` it or ``kept`` it as complete."""

    name: str
    path: Path
    rows: int
    texts: int
    status: str


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote, kept and left out."""

    task: str
    source: Path
    out: Path
    outputs: list[OutputFile] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # optional outputs whose input file is not in source
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> dict[str, int]:
        """Rows per output file name."""
        return {output.name: output.rows for output in self.outputs}

    @property
    def written(self) -> list[str]:
        """The names of the files this call wrote."""
        return [output.name for output in self.outputs if output.status == "written"]

    @property
    def kept(self) -> list[str]:
        """The names of the complete files this call left as they were."""
        return [output.name for output in self.outputs if output.status == "kept"]

    def skipped_counts(self) -> Counter[str]:
        """Skipped records per reason."""
        return Counter(record.reason for record in self.skipped)

    def summary(self) -> str:
        """A few lines for a terminal: the files with their rows, then the skipped records by reason."""
        lines = [f"{self.task}: {len(self.outputs)} arrow files in {self.out} ({len(self.written)} written, "
                 f"{len(self.kept)} kept as complete)"]
        width = max((len(name) for name in [*self.rows, *self.unavailable]), default=0)
        for output in self.outputs:
            lines.append(f"  {output.name:<{width}}  {output.status:<7}  {output.rows:>9,} rows  "
                         f"{output.texts:>10,} texts")
        for name in self.unavailable:
            lines.append(f"  {name:<{width}}  not written: its input file is not in the source folder")
        counts = self.skipped_counts()
        if counts:
            lines.append(f"Skipped {len(self.skipped):,} records: "
                         + ", ".join(f"{count:,} {reason}" for reason, count in counts.most_common()))
            for reason in counts:
                examples = [record for record in self.skipped if record.reason == reason][:_EXAMPLES_PER_REASON]
                for record in examples:
                    where = f" [{record.output}]" if record.output else ""
                    lines.append(f"  {reason}: {record.record}{where}" + (f": {record.detail}" if record.detail
                                                                          else ""))
                if counts[reason] > len(examples):
                    lines.append(f"  {reason}: ... and {counts[reason] - len(examples):,} more")
        elif self.written:
            lines.append("Skipped no records.")
        lines.extend(self.notes)
        return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class _Row:
    """One output row to be: how the report names it, its image files, its other cells in schema order."""

    record: str
    images: tuple[Path, ...]
    values: tuple[Any, ...]
    texts: int


class _LazyRows(Sequence[_Row]):
    """``make(item)`` for each of ``items``, made when read, so that millions of rows are not held as :class:`_Row`."""

    def __init__(self, items: Sequence[Any], make: Callable[[Any], _Row]) -> None:
        self._items, self._make = items, make

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> _Row:  # type: ignore[override]  # an index, never a slice
        return self._make(self._items[index])


@dataclass
class _Output:
    """An output file to write: its rows and the records already left out of it."""

    name: str
    schema: pa.Schema
    rows: list[_Row] | _LazyRows = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)


# --- reading the original files ---------------------------------------------------------------------------------


def _require_source(source: Path, task: str, expected: str) -> None:
    if not source.is_dir():
        raise RenError(f"The {task} source folder {source} does not exist or is not a folder; it should hold "
                       f"{expected}.")


def _find(source: Path, task: str, candidates: Sequence[str], expected: str, *, folder: bool = False) -> Path:
    """The first of ``source / candidate`` that exists (as a folder when ``folder``); else a RenError."""
    _require_source(source, task, expected)
    for candidate in candidates:
        path = source / candidate
        if path.is_dir() if folder else path.is_file():
            return path
    kind = "image folder" if folder else "input file"
    looked = " or ".join(str(source / candidate) for candidate in candidates)
    raise RenError(f"{task}: the {kind} {Path(candidates[0]).name}{'/' if folder else ''} is missing (looked for "
                   f"{looked}). {task} is prepared from {expected}.")


def _read_json(path: Path, task: str) -> Any:
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise RenError(f"{task}: {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                       f"{error.msg}).") from None
    except UnicodeDecodeError as error:
        raise RenError(f"{task}: {path} is not UTF-8 text ({error}).") from None


def _read_jsonl(path: Path, task: str) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of the JSON-lines file ``path``."""
    try:
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise RenError(f"{task}: line {number} of {path} is not valid JSON (column {error.colno}: "
                                   f"{error.msg}); the file holds one JSON object per line.") from None
    except UnicodeDecodeError as error:
        raise RenError(f"{task}: {path} is not UTF-8 text ({error}).") from None


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _field(record: Any, key: str, kinds: type | tuple[type, ...], path: Path, where: str, task: str) -> Any:
    """``record[key]``, checked to exist and to be of ``kinds``; ``where`` names the record in messages."""
    if not isinstance(record, dict):
        expected = "a dict" if path.suffix == ".p" else "a JSON object"
        raise RenError(f"{task}: {where} of {path} is {_TYPE_NAMES.get(type(record), type(record).__name__)}, "
                       f"expected {expected}.")
    if key not in record:
        keys = ", ".join(map(repr, list(record)[:12])) or "none"
        raise RenError(f"{task}: {where} of {path} has no key {key!r} (its keys: {keys}).")
    value = record[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or isinstance(value, bool):
        expected = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in allowed)
        raise RenError(f"{task}: {where} of {path} has {key!r} = {str(value)[:80]!r}, expected {expected}.")
    return value


def _top_list(content: Any, key: str, path: Path, task: str) -> list[Any]:
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise RenError(f"{task}: {path} has no top-level list {key!r}; expected the original layout "
                       f"{{{key!r}: [...], ...}}.")
    return content[key]


def _numbers(value: Any, count: int, path: Path, where: str, task: str, meaning: str) -> list[float]:
    """``value`` as ``count`` floats; else a RenError saying it should be ``meaning``."""
    if not isinstance(value, list) or len(value) != count or not all(
            isinstance(number, (int, float)) and not isinstance(number, bool) for number in value):
        raise RenError(f"{task}: {where} of {path} is {str(value)[:80]!r}, expected {meaning}.")
    return [float(number) for number in value]


_PICKLE_TYPES = {"dict": dict, "list": list, "tuple": tuple, "str": str, "unicode": str, "int": int, "long": int,
                 "float": float}


class _ForbiddenGlobal(Exception):
    """A class or function named in a pickle that :class:`_DataUnpickler` does not build."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds only lists, dicts, tuples, strings and numbers: any other class or function a
    pickle names (which unpickling would call, so it could run any code) raises :class:`_ForbiddenGlobal`."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _PICKLE_TYPES:
            return _PICKLE_TYPES[name]
        raise _ForbiddenGlobal(f"{module}.{name}")


def _decoded(value: Any) -> Any:
    """``value`` with its byte strings (Python 2's ``str``) decoded as UTF-8, or Latin-1 where not UTF-8."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, (list, tuple)):
        return type(value)(_decoded(item) for item in value)
    if isinstance(value, dict):
        return {_decoded(key): _decoded(item) for key, item in value.items()}
    return value


def _read_pickle(path: Path, task: str) -> Any:
    """The content of the pickle ``path`` (Python 2 byte strings decoded, see :func:`_decoded`), data types only."""
    try:
        with path.open("rb") as file:
            return _decoded(_DataUnpickler(file, encoding="bytes").load())
    except _ForbiddenGlobal as forbidden:
        raise RenError(f"{task}: {path} refers to {forbidden}; the pickle should hold only lists, dicts, strings and "
                       "numbers, and anything else is refused because unpickling it could run code.") from None
    except OSError as error:
        raise RenError(f"{task}: cannot read {path}: {error.strerror or error}.") from None
    except Exception as error:  # a corrupt pickle raises UnpicklingError, EOFError, ValueError, KeyError, ...
        raise RenError(f"{task}: {path} is not a readable pickle ({type(error).__name__}: {error}); it should be the "
                       "file of the original release.") from None


def _load_image(path: Path) -> tuple[bytes | None, str, str]:
    """``(bytes, "", "")`` for an image file that decodes, else ``(None, reason, detail)``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, MISSING_IMAGE, str(path)
    except OSError as error:
        return None, UNREADABLE_IMAGE, f"{path}: {error.strerror or error}"
    try:
        with Image.open(BytesIO(data)) as image:
            image.draft(None, (1, 1))  # JPEG decodes at 1/8 scale: every byte is still read, 4x less work
            image.load()
    except Exception as error:  # PIL's decoders raise many types on bad bytes; all mean "unreadable"
        return None, UNREADABLE_IMAGE, f"{path}: {error}"
    return data, "", ""


# --- writing ------------------------------------------------------------------------------------------------------


def _binary_array(values: list[bytes]) -> pa.Array:
    """A binary array over one joined copy of ``values`` (``pa.array`` would grow its buffer by doubling)."""
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in values], out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(values),
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(values))])


@contextmanager
def _atomic_ipc_file(final: Path, schema: pa.Schema) -> Iterator[pa.ipc.RecordBatchFileWriter]:
    """An IPC file writer on ``.<name>.partial``, synced and renamed over ``final`` when the block completes."""
    temporary = final.with_name(f".{final.name}.partial")
    try:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            yield writer
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _complete_counts(path: Path, kind: ArrowKind, metadata: dict[bytes, bytes]) -> tuple[int, int] | None:
    """``(rows, texts)`` of ``path`` when it is a complete arrow file of ``kind`` whose schema metadata holds
    ``metadata``, else ``None``."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            check_schema(path, reader.schema, kind)
            written = reader.schema.metadata or {}
            if any(written.get(key) != value for key, value in metadata.items()):
                return None
            rows = texts = 0
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                rows += batch.num_rows
                texts += pc.sum(pc.list_value_length(batch.column(kind.text_column))).as_py() or 0
            return rows, texts
    except (OSError, pa.ArrowException, RenError):
        return None


class _Job:
    """One :func:`prepare` call: which outputs are complete, writing the others, the report. As a context
    manager it creates ``out`` and holds its lock, refusing to run beside another ``prepare`` into ``out``."""

    def __init__(self, task: str, source: Path, out: Path, progress: Progress | None, force: bool) -> None:
        self.task, self.kind, self.source, self.out = task, arrow_kind(task), Path(source), Path(out)
        self.progress, self.force = progress, force
        self.report = PrepareReport(task=task, source=self.source, out=self.out)
        self._files: dict[str, OutputFile] = {}
        self._done = self._total = 0
        self._lock = FileLock(str(self.out / _LOCK_NAME), timeout=0)

    def __enter__(self) -> _Job:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RenError(f"{self.task}: cannot create the output folder {self.out}: "
                           f"{error.strerror or error}.") from None
        try:
            self._lock.acquire()
        except Timeout:
            raise RenError(f"{self.task}: another ren data prepare is writing into {self.out}; wait for it to "
                           "finish.") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def complete(self, name: str, metadata: dict[bytes, bytes] | None = None) -> bool:
        """Whether ``name`` is kept as it is: not ``force`` and a complete file of the kind exists (whose schema
        metadata holds ``metadata``)."""
        path = self.out / name
        if self.force or not path.exists():
            return False
        counts = _complete_counts(path, self.kind, metadata or {})
        if counts is None:
            cut = "".join(f" of {value.decode()} (schema metadata {key.decode()})"
                          for key, value in (metadata or {}).items())
            self.report.notes.append(f"{path} existed but was not a complete {self.kind.name} arrow file{cut}; "
                                     "it was written again.")
            return False
        self._files[name] = OutputFile(name, path, *counts, status="kept")
        return True

    def write(self, outputs: Sequence[_Output]) -> None:
        """Write ``outputs`` in order, reporting progress per source row."""
        self._done, self._total = 0, sum(len(output.rows) for output in outputs)
        self._tick(0)
        for output in outputs:
            self.report.skipped.extend(output.skipped)
            self._write_output(output)

    def _tick(self, step: int = 1) -> None:
        self._done += step
        if self.progress is not None:
            self.progress(self._done, self._total)

    def _write_output(self, output: _Output) -> None:
        columns: list[list[Any]] = [[] for _ in output.schema]
        pending_bytes = rows = texts = 0

        def flush(writer: pa.ipc.RecordBatchFileWriter) -> None:
            nonlocal pending_bytes
            if columns[0]:
                arrays = [_binary_array(values) if pa.types.is_binary(column.type) else
                          pa.array(values, type=column.type) for values, column in zip(columns, output.schema)]
                writer.write_batch(pa.record_batch(arrays, schema=output.schema))
                for values in columns:
                    values.clear()
            pending_bytes = 0

        path = self.out / output.name
        with _atomic_ipc_file(path, output.schema) as writer:
            for row in output.rows:
                encoded = self._read_images(row, output.name)
                if encoded is not None:
                    for values, value in zip(columns, (*encoded, *row.values)):
                        values.append(value)
                    rows += 1
                    texts += row.texts
                    pending_bytes += sum(map(len, encoded))
                    if len(columns[0]) >= BATCH_ROWS or pending_bytes >= BATCH_BYTES:
                        flush(writer)
                self._tick()
            flush(writer)
        self._files[output.name] = OutputFile(output.name, path, rows, texts, status="written")

    def _read_images(self, row: _Row, output: str) -> list[bytes] | None:
        encoded = []
        for path in row.images:
            data, reason, detail = _load_image(path)
            if data is None:
                self.report.skipped.append(SkippedRecord(output, row.record, reason, detail))
                return None
            encoded.append(data)
        return encoded

    def split_tail(self, source_name: str, tail: int, head_name: str | None, tail_name: str | None) -> None:
        """Copy the rows of the written file ``source_name`` but its last ``tail`` to ``head_name`` and those
        last rows to ``tail_name`` (each when given)."""
        with pa.memory_map(str(self.out / source_name)) as mapped:
            table = pa.ipc.open_file(mapped).read_all()
            cut = max(0, table.num_rows - tail)
            for name, part in ((head_name, table.slice(0, cut)), (tail_name, table.slice(cut))):
                if name is None:
                    continue
                path = self.out / name
                with _atomic_ipc_file(path, table.schema) as writer:
                    writer.write_table(part, max_chunksize=BATCH_ROWS)
                texts = pc.sum(pc.list_value_length(part.column(self.kind.text_column))).as_py() or 0
                self._files[name] = OutputFile(name, path, part.num_rows, texts, status="written")

    def remove_stale(self, split: str, names: Sequence[str]) -> None:
        """Delete the files in ``out`` that the reader would take for ``split`` of the kind but are not ``names``
        (shards of an earlier, differently cut run)."""
        patterns = self.kind.splits[split]
        for path in sorted(self.out.iterdir()):
            if path.name not in names and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
                path.unlink()
                self.report.notes.append(f"Removed {path}: left by a run cut into other shards, it would be read "
                                         f"as part of {split} beside this run's {_plural(len(names), 'shard')}.")

    def finish(self, names: Sequence[str]) -> PrepareReport:
        """The report, its files in the order of ``names``."""
        self.report.outputs = [self._files[name] for name in names if name in self._files]
        return self.report


def _prepare_splits(task: str, source: Path, out: Path, progress: Progress | None, force: bool, names: dict[str, str],
                    outputs: Callable[[_Job, list[str]], list[_Output]], notes: Sequence[str] = ()) -> PrepareReport:
    """A converter of one file per split: ``names`` maps split -> file name; the files not complete are written
    from ``outputs(job, pending splits)``; ``notes`` go into the report."""
    with _Job(task, source, out, progress, force) as job:
        job.report.notes.extend(notes)
        pending = [split for split in names if not job.complete(names[split])]
        written = outputs(job, pending) if pending else []
        if written:
            job.write(written)
        return job.finish(list(names.values()))


# --- the tasks ----------------------------------------------------------------------------------------------------


def prepare_vqav2(source: Path, out: Path, *, progress: Progress | None = None, force: bool = False,
                  rest_val_images: int = VQAV2_REST_VAL_IMAGES) -> PrepareReport:
    """VQAv2 (see the module docstring); ``vqav2_rest_val.arrow`` gets the last ``rest_val_images`` rows of val."""
    if rest_val_images < 0:
        raise RenError(f"vqav2: rest_val_images must be at least 0, got {rest_val_images}.")
    with _Job("vqav2", source, out, progress, force) as job:
        names = {split: f"vqav2_{split}.arrow" for split in (*_VQAV2_SPLITS, "trainable_val", "rest_val")}
        pending = [split for split in _VQAV2_SPLITS if not job.complete(names[split])]
        derived = {split: names[split] if not job.complete(names[split]) or "val" in pending else None
                   for split in ("trainable_val", "rest_val")}
        if pending:
            job.write(_vqav2_outputs(job.source, pending, names))
        if any(derived.values()):
            job.split_tail(names["val"], rest_val_images, derived["trainable_val"], derived["rest_val"])
        return job.finish(list(names.values()))


def _vqav2_outputs(source: Path, splits: Sequence[str], names: dict[str, str]) -> list[_Output]:
    """The outputs of the VQAv2 ``splits``; train and val need the vocabulary, so both are read for either."""
    needed = {*splits, "train", "val"} if {"train", "val"} & set(splits) else set(splits)
    files: dict[str, tuple[Path, Path | None, Path]] = {}
    for split in (split for split in _VQAV2_SPLITS if split in needed):
        questions, annotations, folder = _VQAV2_SPLITS[split]
        files[split] = (_find(source, "vqav2", (questions,), _VQAV2_FROM),
                        None if annotations is None else _find(source, "vqav2", (annotations,), _VQAV2_FROM),
                        _find(source, "vqav2", (folder,), _VQAV2_FROM, folder=True))
    examples = {split: load_vqa_json(questions, annotations) for split, (questions, annotations, _) in files.items()}
    vocab = build_answer_vocab([example.multiple_choice_answer] for split in ("train", "val") if split in examples
                               for example in examples[split])
    vocab_index = {answer: label for label, answer in enumerate(vocab)}
    outputs = []
    for split in splits:
        name, (_, annotations, folder) = names[split], files[split]
        output = _Output(name, VQAV2_SCHEMA)
        # image id -> question ids, questions, answers, labels, scores, raw answers (the last four stay empty for
        # test splits)
        images: dict[int, tuple[list[int], list[str], list[list[str]], list[list[int]], list[list[float]],
                                list[list[str]]]] = {}
        for example in examples[split]:
            if annotations is not None:
                labels, scores = soft_targets(example.answers, vocab_index)
                if not labels:
                    output.skipped.append(SkippedRecord(
                        name, f"question {example.question_id}", NO_VOCAB_ANSWER,
                        f"multiple_choice_answer {example.multiple_choice_answer!r}"))
                    continue
            question_ids, questions, answers, label_lists, score_lists, raw_lists = images.setdefault(
                example.image_id, ([], [], [], [], [], []))
            question_ids.append(example.question_id)
            questions.append(example.question)
            if annotations is not None:
                answers.append([vocab[label] for label in labels])
                label_lists.append(labels)
                score_lists.append(scores)
                raw_lists.append(list(example.answers))
        for image_id, (question_ids, questions, answers, label_lists, score_lists, raw_lists) in images.items():
            image = folder / f"COCO_{folder.name}_{image_id:012d}.jpg"
            cells = (questions, answers, label_lists, score_lists, image_id, question_ids, split, raw_lists)
            output.rows.append(_Row(f"image {image_id} ({_plural(len(questions), 'question')})", (image,), cells,
                                    len(questions)))
        outputs.append(output)
    return outputs


def _karpathy_outputs(job: _Job, pending: Sequence[str], names: dict[str, str], annotations: tuple[str, ...],
                      ) -> list[_Output]:
    """The outputs of the ``pending`` Karpathy splits; records of no known split go into the report."""
    task, source = job.task, job.source
    path = _find(source, task, annotations, _KARPATHY_FROM + " and the images")
    flickr = None if task == "coco_caption" else _find(source, task, _FLICKR_DIRS, "the Flickr30k images "
                                                        "(flickr30k-images/) and " + _KARPATHY_FROM, folder=True)
    folders: dict[str, Path] = {}

    def coco_folder(filepath: str) -> Path:
        if filepath not in folders:
            folders[filepath] = _find(source, task, (filepath,), "the COCO images (train2014/, val2014/ from "
                                      "cocodataset.org) and " + _KARPATHY_FROM, folder=True)
        return folders[filepath]

    outputs = {split: _Output(names[split], CAPTION_SCHEMA) for split in pending}
    for index, record in enumerate(_top_list(_read_json(path, task), "images", path, task)):
        where = f"images[{index}]"
        filename = _field(record, "filename", str, path, where, task)
        split = _field(record, "split", str, path, where, task)
        captions = [_field(sentence, "raw", str, path, f"{where}.sentences[{k}]", task)
                    for k, sentence in enumerate(_field(record, "sentences", list, path, where, task))]
        if split not in names:
            job.report.skipped.append(SkippedRecord("", f"{where} ({filename})", UNKNOWN_SPLIT,
                                                    f"split {split!r}, expected one of {', '.join(names)}"))
        elif split in outputs and not captions:
            outputs[split].skipped.append(SkippedRecord(names[split], filename, MISSING_ANNOTATION,
                                                        f"{where} has no sentences"))
        elif split in outputs:
            folder = flickr if flickr is not None else coco_folder(_field(record, "filepath", str, path, where, task))
            outputs[split].rows.append(_Row(filename, (folder / filename,), (captions, filename, split),
                                            len(captions)))
    return [outputs[split] for split in pending]


def _prepare_karpathy(task: str, source: Path, out: Path, progress: Progress | None, force: bool,
                      annotations: tuple[str, ...], splits: tuple[str, ...], prefix: str) -> PrepareReport:
    names = {split: f"{prefix}_{split}.arrow" for split in splits}
    return _prepare_splits(task, source, out, progress, force, names,
                           lambda job, pending: _karpathy_outputs(job, pending, names, annotations))


def prepare_coco_caption(source: Path, out: Path, *, progress: Progress | None = None,
                         force: bool = False) -> PrepareReport:
    """COCO captions, Karpathy splits (see the module docstring)."""
    return _prepare_karpathy("coco_caption", source, out, progress, force,
                             ("dataset_coco.json", "karpathy/dataset_coco.json"),
                             ("train", "restval", "val", "test"), "coco_caption_karpathy")


def prepare_f30k_caption(source: Path, out: Path, *, progress: Progress | None = None,
                         force: bool = False) -> PrepareReport:
    """Flickr30k captions, Karpathy splits (see the module docstring)."""
    return _prepare_karpathy("f30k_caption", source, out, progress, force,
                             ("dataset_flickr30k.json", "karpathy/dataset_flickr30k.json"),
                             ("train", "val", "test"), "f30k_caption_karpathy")


_NLVR2_REQUIRED = ("train", "dev", "test1")
_NLVR2_OPTIONAL = ("balanced_dev", "balanced_test1", "unbalanced_dev", "unbalanced_test1")


def _nlvr2_inputs(job: _Job, pending: Sequence[str], names: dict[str, str]) -> dict[str, Path]:
    """The JSON-lines file of each pending split; an optional split without one is reported unavailable."""
    inputs: dict[str, Path] = {}
    for split in pending:
        relative = f"{split.split('_')[0]}/{split}.json" if split in _NLVR2_OPTIONAL else f"{split}.json"
        candidates = tuple(str(Path(base) / relative) for base in _NLVR2_DATA_DIRS)
        if split in _NLVR2_REQUIRED:
            inputs[split] = _find(job.source, job.task, candidates, _NLVR2_FROM)
        elif found := [job.source / c for c in candidates if (job.source / c).is_file()]:
            inputs[split] = found[0]
        else:
            job.report.unavailable.append(names[split])
    return inputs


def _nlvr2_output(job: _Job, name: str, path: Path, folders: dict[str, Path]) -> _Output:
    """One NLVR2 output: the sentences of ``path`` grouped per image pair; ``folders`` caches image folders."""
    task = job.task
    output = _Output(name, NLVR2_SCHEMA)
    pairs: dict[str, tuple[Path, list[str], list[str]]] = {}
    for number, record in _read_jsonl(path, task):
        where = f"line {number}"
        identifier = _field(record, "identifier", str, path, where, task)
        sentence = _field(record, "sentence", str, path, where, task)
        label = _field(record, "label", str, path, where, task)
        pair, separator, _ = identifier.rpartition("-")
        if not separator or not pair:
            raise RenError(f"{task}: {where} of {path} has 'identifier' = {identifier!r}, expected "
                           "split-set_id-pair_id-sentence_id (e.g. 'dev-850-0-0').")
        if label not in NLVR2_LABELS:
            output.skipped.append(SkippedRecord(name, identifier, UNKNOWN_LABEL,
                                                f"label {label!r}, expected 'True' or 'False'"))
            continue
        if pair not in pairs:
            prefix = pair.split("-")[0]
            if prefix not in folders:
                candidates = ("images/train",) if prefix == "train" else (prefix, f"images/{prefix}")
                folders[prefix] = _find(job.source, task, candidates, _NLVR2_FROM, folder=True)
            folder = folders[prefix]
            if prefix == "train":
                folder = folder / str(_field(record, "directory", (int, str), path, where, task))
            pairs[pair] = (folder, [], [])
        pairs[pair][1].append(sentence)
        pairs[pair][2].append(label)
    for pair, (folder, sentences, labels) in pairs.items():
        images = (folder / f"{pair}-img0.png", folder / f"{pair}-img1.png")
        output.rows.append(_Row(pair, images, (sentences, labels, pair), len(sentences)))
    return output


def prepare_nlvr2(source: Path, out: Path, *, progress: Progress | None = None, force: bool = False) -> PrepareReport:
    """NLVR2 (see the module docstring); the balanced/unbalanced splits are written when their files exist."""
    names = {split: f"nlvr2_{split}.arrow" for split in (*_NLVR2_REQUIRED, *_NLVR2_OPTIONAL)}

    def outputs(job: _Job, pending: list[str]) -> list[_Output]:
        folders: dict[str, Path] = {}
        return [_nlvr2_output(job, names[split], path, folders)
                for split, path in _nlvr2_inputs(job, pending, names).items()]

    return _prepare_splits("nlvr2", source, out, progress, force, names, outputs)


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
    """SNLI-VE in METER's layout (see the module docstring)."""
    names = {split: f"snli_{split}.arrow" for split in ("train", "dev", "test")}

    def outputs(job: _Job, pending: list[str]) -> list[_Output]:
        inputs = {split: _find(job.source, job.task, (f"snli_ve_{split}.jsonl",), _SNLI_FROM) for split in pending}
        folder = _find(job.source, job.task, _FLICKR_DIRS, _SNLI_FROM, folder=True)
        return [_snli_output(job, names[split], path, folder) for split, path in inputs.items()]

    return _prepare_splits("snli_ve", source, out, progress, force, names, outputs)


def _json_list(path: Path, task: str, expected: str) -> list[Any]:
    """The content of the JSON file ``path``, which must be a list (``expected`` says of what)."""
    content = _read_json(path, task)
    if not isinstance(content, list):
        raise RenError(f"{task}: {path} holds {_TYPE_NAMES.get(type(content), type(content).__name__)}, expected a "
                       f"JSON list of {expected}.")
    return content


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
    content = _read_json(path, task)
    files: dict[int, str] = {}
    for index, image in enumerate(_top_list(content, "images", path, task)):
        where = f"images[{index}]"
        files[_field(image, "id", int, path, where, task)] = _field(image, "file_name", str, path, where, task)
    objects: dict[int, tuple[list[int], list[list[float]]]] = {}
    for index, annotation in enumerate(_top_list(content, "annotations", path, task)):
        where = f"annotations[{index}]"
        ids, boxes = objects.setdefault(_field(annotation, "image_id", int, path, where, task), ([], []))
        ids.append(_field(annotation, "id", int, path, where, task))
        boxes.append(_numbers(_field(annotation, "bbox", list, path, where, task), 4, path, f"{where}.bbox", task,
                              "[x, y, width, height]"))
    return files, objects


def _refer_outputs(job: _Job, pending: Sequence[str], names: dict[str, str], split_by: str) -> list[_Output]:
    """The outputs of the ``pending`` splits of a RefCOCO data set: one row per ref."""
    task = job.task
    expected = _REFER_FROM.format(task=task, split_by=split_by)
    refs_path = _find(job.source, task, (f"{task}/refs({split_by}).p",), expected)
    instances = _find(job.source, task, (f"{task}/instances.json",), expected)
    folder = _find(job.source, task, _COCO_TRAIN_DIRS, expected, folder=True)
    refs = _read_pickle(refs_path, task)
    if not isinstance(refs, list):
        raise RenError(f"{task}: {refs_path} holds {_TYPE_NAMES.get(type(refs), type(refs).__name__)}, expected a "
                       "list of refs (dicts with ref_id, ann_id, image_id, split and sentences).")
    files, objects = _refer_objects(instances, task)
    outputs = {split: _Output(names[split], REFCOCO_SCHEMA) for split in pending}
    for index, ref in enumerate(refs):
        where = f"refs[{index}]"
        split = _field(ref, "split", str, refs_path, where, task)
        if split not in names:
            job.report.skipped.append(SkippedRecord("", where, UNKNOWN_SPLIT,
                                                    f"split {split!r}, expected one of {', '.join(names)}"))
            continue
        if split not in outputs:
            continue
        ref_id, ann_id, image_id = (_field(ref, key, int, refs_path, where, task)
                                    for key in ("ref_id", "ann_id", "image_id"))
        sentences = [_field(sentence, "sent", str, refs_path, f"{where}.sentences[{k}]", task)
                     for k, sentence in enumerate(_field(ref, "sentences", list, refs_path, where, task))]
        output, (ids, boxes) = outputs[split], objects.get(image_id, ([], []))
        problem = ("it has no sentences" if not sentences
                   else f"its image {image_id} is not in {instances}" if image_id not in files
                   else f"its annotation {ann_id} is not one of image {image_id}'s in {instances}" if ann_id not in ids
                   else "")
        if problem:
            output.skipped.append(SkippedRecord(output.name, f"ref {ref_id}", MISSING_ANNOTATION, problem))
            continue
        output.rows.append(_Row(f"ref {ref_id} ({files[image_id]})", (folder / files[image_id],),
                                (sentences, boxes, ids.index(ann_id)), len(sentences)))
    return list(outputs.values())


def prepare_refer(task: str, source: Path, out: Path, *, progress: Progress | None = None, force: bool = False,
                  split_by: str | None = None) -> PrepareReport:
    """RefCOCO, RefCOCO+ or RefCOCOg (``task``), split by ``split_by`` (default: unc, umd for refcocog, or google
    when only its refs file is there); see the module docstring."""
    if task not in _REFER_SPLIT_BY:
        raise RenError(f"prepare_refer prepares {', '.join(_REFER_SPLIT_BY)}, not {task!r}.")
    split_by = _refer_split_by(Path(source), task, split_by)
    names = {split: f"{task}_{split_by}_{split}.arrow" for split in _REFER_SPLITS[split_by]}
    notes = [f"{task}: split by {split_by} (refs({split_by}).p)."]
    if split_by == "google":
        notes.append(f"ren's {task} data reads {task}_umd_*.arrow; the google split's files are for other readers.")
    return _prepare_splits(task, source, out, progress, force, names,
                           lambda job, pending: _refer_outputs(job, pending, names, split_by), notes)


def _vg_output(job: _Job, name: str) -> _Output:
    """``vg.arrow``: the regions of ``region_descriptions.json`` grouped per image."""
    task, source = job.task, job.source
    path = _find(source, task, ("region_descriptions.json", "annotations/region_descriptions.json"), _VG_FROM)
    folders = [_find(source, task, _VG_FOLDERS[0], _VG_FROM, folder=True)]
    folders += [source / candidate for candidate in _VG_FOLDERS[1] if (source / candidate).is_dir()][:1]
    output = _Output(name, VG_SCHEMA)
    images: dict[int, tuple[list[str], list[int], list[int], list[int], list[int]]] = {}
    for index, record in enumerate(_json_list(path, task, "images' regions ({'regions': [...], 'id': ...})")):
        where = f"[{index}]"
        regions = _field(record, "regions", list, path, where, task)
        if not regions:
            image = f"image {record['id']}" if isinstance(record.get("id"), int) else where
            output.skipped.append(SkippedRecord(name, image, MISSING_ANNOTATION, f"{where} has no regions"))
        for k, region in enumerate(regions):
            at = f"{where}.regions[{k}]"
            cells = images.setdefault(_field(region, "image_id", int, path, at, task), ([], [], [], [], []))
            for values, key in zip(cells, ("phrase", "width", "height", "x", "y")):
                values.append(_field(region, key, str if key == "phrase" else int, path, at, task))
    for image_id, cells in images.items():
        candidates = [folder / f"{image_id}.jpg" for folder in folders]
        image = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
        output.rows.append(_Row(f"{image_id}.jpg", (image,), (*cells, str(image_id)), len(cells[0])))
    return output


def prepare_vg(source: Path, out: Path, *, progress: Progress | None = None, force: bool = False) -> PrepareReport:
    """Visual Genome region captions in ViLT's layout (see the module docstring)."""
    return _prepare_splits("vg", source, out, progress, force, {"train": "vg.arrow"},
                           lambda job, pending: [_vg_output(job, "vg.arrow")])


@dataclass
class _Annotated:
    """The annotated images of a CC/SBU split: (file name, index of its folder, captions), in annotation order."""

    items: list[tuple[str, int, list[str]]]
    folders: list[Path]
    skipped: list[SkippedRecord]
    notes: list[str]


def _annotated_images(job: _Job, annotations: str, images: str, expected: str, output: str) -> _Annotated:
    """The captions of ``annotations`` matched by file name to the files in ``images`` and its subfolders."""
    task = job.task
    path = _find(job.source, task, (annotations,), expected)
    root = _find(job.source, task, (images,), expected, folder=True)
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
    for index, entry in enumerate(_json_list(path, task, "[image path, caption] pairs")):
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(value, str) for value in entry)):
            raise RenError(f"{task}: entry [{index}] of {path} is {str(entry)[:80]!r}, expected [image path, caption] "
                           "(two strings).")
        captions.setdefault(entry[0].rsplit("/", 1)[-1], []).append(entry[1])
    annotated = _Annotated([], folders, [], [])
    for name, texts in captions.items():
        if name in found:
            annotated.items.append((name, found[name], texts))
        else:
            annotated.skipped.append(SkippedRecord(output, name, MISSING_IMAGE, f"no file {name} in {root}/ or its "
                                                   "subfolders"))
    if unannotated := len(found) - len(annotated.items):
        annotated.notes.append(f"{_plural(unannotated, 'image file')} in {root}/ had no caption in {path.name}; "
                               "they were not written.")
    if repeated:
        annotated.notes.append(f"{_plural(repeated, 'image file name')} stood in more than one folder of {root}/; "
                               "the first folder's file (by name) was used.")
    return annotated


def _shard_row(split: str, folders: list[Path], item: tuple[str, int, list[str]]) -> _Row:
    name, folder, captions = item
    return _Row(name, (folders[folder] / name,), (captions, name, split), len(captions))


def _prepare_shards(task: str, source: Path, out: Path, progress: Progress | None, force: bool, shard_rows: int,
                    splits: dict[str, tuple[str, str, str]], expected: str) -> PrepareReport:
    """CC or SBU: ``splits`` maps split -> (annotation file, image folder, shard name prefix)."""
    if shard_rows < 1:
        raise RenError(f"{task}: shard_rows must be at least 1, got {shard_rows}.")
    with _Job(task, source, out, progress, force) as job:
        names: list[str] = []
        outputs: list[_Output] = []
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
                    pending.append(_Output(name, CAPTION_SCHEMA.with_metadata(metadata), _LazyRows(
                        annotated.items[start:stop], partial(_shard_row, split, annotated.folders))))
            if pending:
                job.report.skipped.extend(annotated.skipped)
                job.report.notes.extend(annotated.notes)
                outputs.extend(pending)
        if outputs:
            job.write(outputs)
        return job.finish(names)


def prepare_cc(source: Path, out: Path, *, progress: Progress | None = None, force: bool = False,
               shard_rows: int = SHARD_ROWS) -> PrepareReport:
    """Conceptual Captions in ViLT's layout, ``shard_rows`` images per shard (see the module docstring)."""
    return _prepare_shards("cc", source, out, progress, force, shard_rows,
                           {split: (f"{split}_annot.json", f"images_{split}", f"conceptual_caption_{split}")
                            for split in ("train", "val")}, _CC_FROM)


def prepare_sbu(source: Path, out: Path, *, progress: Progress | None = None, force: bool = False,
                shard_rows: int = SHARD_ROWS) -> PrepareReport:
    """SBU Captions in ViLT's layout, ``shard_rows`` images per shard (see the module docstring)."""
    return _prepare_shards("sbu", source, out, progress, force, shard_rows,
                           {"train": ("annot.json", "images_train", "sbu")}, _SBU_FROM)


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
