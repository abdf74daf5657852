"""Writers of small arrow files in exactly the layouts ViLT, METER and Renaissance write.

Like ``vilt/utils/write_*.py``, each writer builds a pandas DataFrame with the
real column names in the real order, converts it with ``pa.Table.from_pandas``
and writes it with ``pa.RecordBatchFileWriter`` under the real file name. The
conversion is given the schema pandas 1.x inferred for those scripts
(``string``, not the ``large_string`` pandas 3 infers), so the files match the
published ones type for type. Images are real encoded bytes made with PIL:
JPEG, or PNG for NLVR2 as in its release. Contents are deterministic in the
row index (plus ``start``), so two writes of the same rows are equal.

Every writer returns a :class:`Written`: the file's path and its rows as the
Python values written (for tests to compare with what is read back).
``corrupt`` rows get unreadable image bytes (alternately garbage and a JPEG
cut in half); ``rows_per_batch`` splits the table into several record batches.
``distinct_images`` reuses that many encoded images cyclically, which makes
10,000-row files quick to write.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw

COLOURS = ((220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 30), (150, 60, 170), (30, 180, 190),
           (120, 120, 120), (240, 130, 20))
IMAGE_SIZE = (24, 16)  # width, height
WORDS = ("a", "dog", "cat", "red", "on", "the", "grass", "two", "people", "near", "table", "bus")

_LIST_STR = pa.list_(pa.string())
_LIST_INT = pa.list_(pa.int64())
_CAPTION_SCHEMA = pa.schema([("image", pa.binary()), ("caption", _LIST_STR), ("image_id", pa.string()),
                             ("split", pa.string())])
_VG_SCHEMA = pa.schema([("image", pa.binary()), ("caption", _LIST_STR), ("width", _LIST_INT),
                        ("height", _LIST_INT), ("x", _LIST_INT), ("y", _LIST_INT), ("image_id", pa.string())])
_VQAV2_SCHEMA = pa.schema([("image", pa.binary()), ("questions", _LIST_STR), ("answers", pa.list_(_LIST_STR)),
                           ("answer_labels", pa.list_(_LIST_INT)),
                           ("answer_scores", pa.list_(pa.list_(pa.float64()))), ("image_id", pa.int64()),
                           ("question_id", _LIST_INT), ("split", pa.string())])
# write_vqa.py gives test rows empty answer lists, which pandas types as list<null>
_VQAV2_TEST_SCHEMA = pa.schema([field.with_type(pa.list_(pa.null()))
                                if field.name in ("answers", "answer_labels", "answer_scores") else field
                                for field in _VQAV2_SCHEMA])
_NLVR2_SCHEMA = pa.schema([("image_0", pa.binary()), ("image_1", pa.binary()), ("questions", _LIST_STR),
                           ("answers", _LIST_STR), ("identifier", pa.string())])
_SNLI_SCHEMA = pa.schema([("image", pa.binary()), ("sentences", pa.list_(_LIST_STR)), ("labels", _LIST_INT)])
_REFCOCO_SCHEMA = pa.schema([("image", pa.binary()), ("sentences", _LIST_STR),
                             ("bboxes", pa.list_(pa.list_(pa.float64()))), ("labels", pa.int64())])


@dataclass(frozen=True)
class Written:
    """An arrow file a writer made and the rows it holds, as Python values."""

    path: Path
    rows: list[dict[str, Any]]


def image_bytes(index: int, fmt: str = "JPEG", size: tuple[int, int] = IMAGE_SIZE) -> bytes:
    """An encoded image that depends on ``index``: a coloured background with a
    differently coloured rectangle."""
    width, height = size
    image = Image.new("RGB", size, COLOURS[index % len(COLOURS)])
    left = (index * 3) % max(1, width // 2)
    ImageDraw.Draw(image).rectangle((left, height // 4, left + width // 3, height - 2),
                                    fill=COLOURS[(index // len(COLOURS) + 3) % len(COLOURS)])
    out = BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def corrupt_bytes(index: int) -> bytes:
    """Unreadable image bytes: garbage for even ``index``, a JPEG cut in half for odd."""
    if index % 2 == 0:
        return b"this is not an image"
    data = image_bytes(index)
    return data[: len(data) // 2]


def _text(index: int, length: int = 5) -> str:
    """A caption; captions 12 apart repeat, as real corpora repeat captions ("a man riding a wave")."""
    return " ".join(WORDS[(index * 7 + k * 5) % len(WORDS)] for k in range(length))


def _distinct_text(index: int, length: int = 5) -> str:
    """A caption no other index below ``len(WORDS) ** length`` shares (``index`` in base len(WORDS))."""
    return " ".join(WORDS[(index // len(WORDS) ** k) % len(WORDS)] for k in range(length))


class _Images:
    """Encoded images by row, reusing ``distinct`` of them cyclically when given."""

    def __init__(self, fmt: str, distinct: int | None, corrupt: Collection[int],
                 size: tuple[int, int] = IMAGE_SIZE) -> None:
        self.fmt, self.distinct, self.corrupt, self.size = fmt, distinct, set(corrupt), size
        self.cache: dict[int, bytes] = {}

    def __call__(self, row: int, variant: int = 0) -> bytes:
        if row in self.corrupt:
            return corrupt_bytes(row)
        key = 2 * (row if self.distinct is None else row % self.distinct) + variant
        if key not in self.cache:
            self.cache[key] = image_bytes(key, self.fmt, self.size)
        return self.cache[key]


def write_arrow_table(path: Path, table: pa.Table, rows_per_batch: int | None = None) -> Path:
    """Write ``table`` as an Arrow IPC file the way ViLT does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=rows_per_batch)
    return path


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, rows_per_batch: int | None) -> Written:
    frame = pd.DataFrame([[row[name] for name in schema.names] for row in rows], columns=schema.names)
    write_arrow_table(path, pa.Table.from_pandas(frame, schema=schema), rows_per_batch)
    return Written(path, rows)


def _caption_rows(n: int, start: int, split: str, images: _Images, captions_per_image: int,
                  id_format: str, text: Callable[[int], str] = _text) -> list[dict[str, Any]]:
    return [{"image": images(i), "caption": [text(i * captions_per_image + k) for k in range(captions_per_image)],
             "image_id": id_format.format(i), "split": split} for i in range(start, start + n)]


def write_coco_caption(directory: Path, split: str = "train", n: int = 4, *, start: int = 0,
                       captions_per_image: int = 5, distinct_images: int | None = None,
                       corrupt: Collection[int] = (), rows_per_batch: int | None = None) -> Written:
    """``coco_caption_karpathy_{split}.arrow`` (write_coco_karpathy.py)."""
    prefix = "val" if split in ("val", "test", "restval") else "train"
    rows = _caption_rows(n, start, split, _Images("JPEG", distinct_images, corrupt), captions_per_image,
                         f"COCO_{prefix}2014_{{:012d}}.jpg")
    return _write(Path(directory) / f"coco_caption_karpathy_{split}.arrow", rows, _CAPTION_SCHEMA, rows_per_batch)


def write_f30k_caption(directory: Path, split: str = "train", n: int = 4, *, start: int = 0,
                       distinct_images: int | None = None, corrupt: Collection[int] = (),
                       rows_per_batch: int | None = None, distinct_captions: bool = False) -> Written:
    """``f30k_caption_karpathy_{split}.arrow`` (write_f30k_karpathy.py); ``distinct_captions``: no caption
    repeats, so no two texts tie in a ranking."""
    rows = _caption_rows(n, start, split, _Images("JPEG", distinct_images, corrupt), 5, "{:010d}.jpg",
                         _distinct_text if distinct_captions else _text)
    return _write(Path(directory) / f"f30k_caption_karpathy_{split}.arrow", rows, _CAPTION_SCHEMA, rows_per_batch)


def write_cc(directory: Path, split: str = "train", n: int = 4, *, shard: int = 0, start: int = 0,
             distinct_images: int | None = None, corrupt: Collection[int] = (),
             rows_per_batch: int | None = None) -> Written:
    """``conceptual_caption_{split}_{shard}.arrow`` (write_conceptual_caption.py; one caption per image)."""
    rows = _caption_rows(n, start, split, _Images("JPEG", distinct_images, corrupt), 1, "{:07d}")
    return _write(Path(directory) / f"conceptual_caption_{split}_{shard}.arrow", rows, _CAPTION_SCHEMA,
                  rows_per_batch)


def write_sbu(directory: Path, split: str = "train", n: int = 4, *, shard: int = 0, start: int = 0,
              distinct_images: int | None = None, corrupt: Collection[int] = (),
              rows_per_batch: int | None = None) -> Written:
    """``sbu_{shard}.arrow`` (write_sbu.py; one caption per image, split "train")."""
    if split != "train":
        raise ValueError("SBU has only a train split")
    rows = _caption_rows(n, start, split, _Images("JPEG", distinct_images, corrupt), 1, "{:07d}")
    return _write(Path(directory) / f"sbu_{shard}.arrow", rows, _CAPTION_SCHEMA, rows_per_batch)


def write_vg(directory: Path, split: str = "train", n: int = 4, *, start: int = 0,
             distinct_images: int | None = None, corrupt: Collection[int] = (),
             rows_per_batch: int | None = None) -> Written:
    """``vg.arrow`` (write_vg.py): region descriptions and their boxes."""
    if split != "train":
        raise ValueError("Visual Genome has only a train split (vg.arrow)")
    images = _Images("JPEG", distinct_images, corrupt)
    rows = []
    for i in range(start, start + n):
        regions = 2 + i % 3
        rows.append({"image": images(i), "caption": [_text(i + k, 3) for k in range(regions)],
                     "width": [10 + k for k in range(regions)], "height": [8 + k for k in range(regions)],
                     "x": [k for k in range(regions)], "y": [2 * k for k in range(regions)], "image_id": str(i + 1)})
    return _write(Path(directory) / "vg.arrow", rows, _VG_SCHEMA, rows_per_batch)


def write_vqav2(directory: Path, split: str = "train", n: int = 4, *, start: int = 0, questions_per_image: int = 3,
                distinct_images: int | None = None, corrupt: Collection[int] = (),
                rows_per_batch: int | None = None, image_size: tuple[int, int] = IMAGE_SIZE) -> Written:
    """``vqav2_{split}.arrow`` (write_vqa.py). Test splits have empty answers, labels and scores."""
    images = _Images("JPEG", distinct_images, corrupt, image_size)
    test = "test" in split
    rows = []
    for i in range(start, start + n):
        qids = [i * 1000 + k for k in range(questions_per_image)]
        labels = [[(q + j) % 7 for j in range(1 + q % 2)] for q in qids]
        rows.append({
            "image": images(i), "questions": [_text(q % 97, 6) + "?" for q in qids],
            "answers": [] if test else [[WORDS[label] for label in ls] for ls in labels],
            "answer_labels": [] if test else labels,
            "answer_scores": [] if test else [[1.0, 0.3][: len(ls)] for ls in labels],
            "image_id": i, "question_id": qids, "split": split,
        })
    return _write(Path(directory) / f"vqav2_{split}.arrow", rows, _VQAV2_TEST_SCHEMA if test else _VQAV2_SCHEMA,
                  rows_per_batch)


def write_nlvr2(directory: Path, split: str = "train", n: int = 4, *, start: int = 0,
                distinct_images: int | None = None, corrupt: Collection[int] = (),
                rows_per_batch: int | None = None) -> Written:
    """``nlvr2_{split}.arrow`` (write_nlvr2.py): two PNGs per row, "True"/"False" answers."""
    images = _Images("PNG", distinct_images, corrupt)
    rows = [{"image_0": images(i, 0), "image_1": images(i, 1),
             "questions": [_text(i * 2 + k, 7) for k in range(2)],
             "answers": ["True" if (i + k) % 2 else "False" for k in range(2)],
             "identifier": f"{split}-{i}-0"} for i in range(start, start + n)]
    return _write(Path(directory) / f"nlvr2_{split}.arrow", rows, _NLVR2_SCHEMA, rows_per_batch)


def write_snli_ve(directory: Path, split: str = "train", n: int = 4, *, start: int = 0,
                  distinct_images: int | None = None, corrupt: Collection[int] = (),
                  rows_per_batch: int | None = None) -> Written:
    """``snli_{split}.arrow`` (METER's write_snli.py): [premise, hypothesis] pairs and labels 0/1/2."""
    images = _Images("JPEG", distinct_images, corrupt)
    rows = [{"image": images(i), "sentences": [[_text(i, 6), _text(i * 3 + k, 4)] for k in range(3)],
             "labels": [(i + k) % 3 for k in range(3)]} for i in range(start, start + n)]
    return _write(Path(directory) / f"snli_{split}.arrow", rows, _SNLI_SCHEMA, rows_per_batch)


def write_refcoco(directory: Path, split: str = "train", n: int = 4, *, start: int = 0,
                  distinct_images: int | None = None, corrupt: Collection[int] = (),
                  rows_per_batch: int | None = None, name: str = "refcoco") -> Written:
    """``{name}_{unc|umd}_{split}.arrow`` (Renaissance's write_refcoco): one referred object per row,
    with every object of its image as a candidate box."""
    images = _Images("JPEG", distinct_images, corrupt)
    rows = []
    for i in range(start, start + n):
        objects = 2 + i % 3
        rows.append({"image": images(i), "sentences": [_text(i + k, 4) for k in range(2)],
                     "bboxes": [[1.5 * k, 2.25 + k, 6.0, 4.5 + k] for k in range(objects)],
                     "labels": i % objects})
    split_by = "umd" if name == "refcocog" else "unc"
    return _write(Path(directory) / f"{name}_{split_by}_{split}.arrow", rows, _REFCOCO_SCHEMA, rows_per_batch)


WRITERS: dict[str, Callable[..., Written]] = {
    "coco_caption": write_coco_caption,
    "f30k_caption": write_f30k_caption,
    "vg": write_vg,
    "cc": write_cc,
    "sbu": write_sbu,
    "vqav2": write_vqav2,
    "nlvr2": write_nlvr2,
    "snli_ve": write_snli_ve,
    "refcoco": write_refcoco,
    "refcoco+": functools.partial(write_refcoco, name="refcoco+"),
    "refcocog": functools.partial(write_refcoco, name="refcocog"),
}
