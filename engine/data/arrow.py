"""Reading the arrow files of ViLT, METER and Renaissance as they are, memory-mapped.

:func:`open_arrow` memory-maps one file (the table is backed by the page cache, so a 100 GB shard costs no heap
memory) and :meth:`ArrowSource.row` converts only the cells asked for; :func:`find_arrow_files` finds a split's
files. :data:`ARROW_KINDS` holds each data set's layout: its files, its columns and ViLT's splits. The layouts,
type names and splits in full: docs/tasks-and-data.md, "The arrow files of ViLT, METER and Renaissance".
"""

from __future__ import annotations

import fnmatch
import mmap
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from engine.errors import RenError

_LISTED_FILES = 20  # directory entries an error message lists


@dataclass(frozen=True)
class ArrowKind:
    """The arrow layout of one data set: where its files are and what they hold."""

    name: str
    writer: str  # the script that writes these files
    splits: Mapping[str, tuple[str, ...]]  # split -> file-name glob patterns, in order
    columns: Mapping[str, str]  # required column -> type (see docs/tasks-and-data.md)
    image_columns: tuple[str, ...]
    text_column: str
    vilt_splits: Mapping[str, str]  # ViLT/METER's train/val/test -> split ("a+b" joins)
    optional: Mapping[str, str] = field(default_factory=dict)  # checked when present


def _caption_kind(name: str, writer: str, splits: dict[str, tuple[str, ...]], vilt_splits: dict[str, str],
                  optional: dict[str, str] | None = None) -> ArrowKind:
    return ArrowKind(name=name, writer=writer, splits=splits,
                     columns={"image": "binary", "caption": "list<string>", "image_id": "string"},
                     image_columns=("image",), text_column="caption", vilt_splits=vilt_splits,
                     optional={"split": "string"} if optional is None else optional)


def _refcoco_kind(name: str, split_by: str, splits: tuple[str, ...]) -> ArrowKind:
    return ArrowKind(
        name=name, writer=f"Renaissance write_refcoco (splitBy {split_by}); ren data prepare {name}",
        splits={s: (f"{name}_{split_by}_{s}.arrow",) for s in splits},
        columns={"image": "binary", "sentences": "list<string>", "bboxes": "list<list<number>>", "labels": "int"},
        image_columns=("image",), text_column="sentences",
        vilt_splits={"train": "train", "val": "val", "test": "test"})


ARROW_KINDS: dict[str, ArrowKind] = {
    kind.name: kind
    for kind in (
        _caption_kind("coco_caption", "vilt/utils/write_coco_karpathy.py",
                      {s: (f"coco_caption_karpathy_{s}.arrow",) for s in ("train", "restval", "val", "test")},
                      {"train": "train+restval", "val": "val", "test": "test"}),
        _caption_kind("f30k_caption", "vilt/utils/write_f30k_karpathy.py",
                      {s: (f"f30k_caption_karpathy_{s}.arrow",) for s in ("train", "val", "test")},
                      {"train": "train+val", "val": "test", "test": "test"}),
        _caption_kind("vg", "vilt/utils/write_vg.py", {"train": ("vg.arrow",)}, {"train": "train"},
                      optional={c: "list<number>" for c in ("width", "height", "x", "y")}),
        _caption_kind("cc", "vilt/utils/write_conceptual_caption.py",
                      {s: (f"conceptual_caption_{s}_[0-9]*.arrow",) for s in ("train", "val")},
                      {"train": "train", "val": "val"}),
        _caption_kind("sbu", "vilt/utils/write_sbu.py", {"train": ("sbu_[0-9]*.arrow",)}, {"train": "train"}),
        ArrowKind(
            name="vqav2", writer="vilt/utils/write_vqa.py",
            splits={s: (f"vqav2_{s}.arrow",) for s in ("train", "val", "trainable_val", "rest_val", "test",
                                                         "test-dev")},
            columns={"image": "binary", "questions": "list<string>", "answers": "list<list<string>>",
                     "answer_labels": "list<list<int>>", "answer_scores": "list<list<float>>",
                     "image_id": "int", "question_id": "list<int>"},
            optional={"split": "string", "raw_answers": "list<list<string>>"}, image_columns=("image",),
            text_column="questions",
            vilt_splits={"train": "train+trainable_val", "val": "rest_val", "test": "test"}),
        ArrowKind(
            name="nlvr2", writer="vilt/utils/write_nlvr2.py",
            splits={s: (f"nlvr2_{s}.arrow",) for s in ("train", "dev", "test1", "balanced_dev", "balanced_test1",
                                                         "unbalanced_dev", "unbalanced_test1")},
            columns={"image_0": "binary", "image_1": "binary", "questions": "list<string>",
                     "answers": "list<string>", "identifier": "string"},
            image_columns=("image_0", "image_1"), text_column="questions",
            vilt_splits={"train": "train", "val": "dev+test1", "test": "dev+test1"}),
        ArrowKind(
            name="snli_ve", writer="meter/utils/write_snli.py",
            splits={s: (f"snli_{s}.arrow",) for s in ("train", "dev", "test")},
            columns={"image": "binary", "sentences": "list<list<string>>", "labels": "list<int>"},
            image_columns=("image",), text_column="sentences",
            vilt_splits={"train": "train", "val": "dev+test", "test": "dev+test"}),
        *(_refcoco_kind(name, split_by, splits) for name, split_by, splits in (
            ("refcoco", "unc", ("train", "val", "test", "testA", "testB")),
            ("refcoco+", "unc", ("train", "val", "test", "testA", "testB")),
            ("refcocog", "umd", ("train", "val", "test")))),
    )
}

_ATOMS = {
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "int": pa.types.is_integer,
    "float": pa.types.is_floating,
    "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
}


def type_matches(arrow_type: pa.DataType, spec: str) -> bool:
    """Whether ``arrow_type`` is of the type named ``spec`` (see "Type names" in docs/tasks-and-data.md)."""
    if spec.startswith("list<") and spec.endswith(">"):
        if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
                or pa.types.is_fixed_size_list(arrow_type)):
            return False
        value_type = arrow_type.value_type
        return pa.types.is_null(value_type) or type_matches(value_type, spec[5:-1])
    return _ATOMS[spec](arrow_type)


def arrow_kind(kind: str) -> ArrowKind:
    """The layout named ``kind``; a :class:`RenError` lists the known ones."""
    try:
        return ARROW_KINDS[kind]
    except KeyError:
        raise RenError(f"Unknown arrow data kind {kind!r}; known kinds: {', '.join(ARROW_KINDS)}.") from None


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _describe_directory(names: Sequence[str]) -> str:
    if not names:
        return "nothing (it is empty)"
    arrows = [n for n in names if n.endswith(".arrow")]
    shown = arrows or list(names)
    listing = ", ".join(shown[:_LISTED_FILES])
    if len(shown) > _LISTED_FILES:
        listing += f" and {len(shown) - _LISTED_FILES} more"
    if arrows:
        return f"these .arrow files: {listing}"
    return f"no .arrow files, only {len(names)} other entries: {listing}"


def find_arrow_files(root: Path | str, kind: str, split: str) -> list[Path]:
    """The files of ``split`` (``"a+b"`` joins splits) of ``kind`` in ``root``, in order.

    Shards sort by number (``sbu_2`` before ``sbu_10``). Every split named must
    have a file: when one has none, the :class:`RenError` says which names were
    expected and lists what the directory holds.
    """
    layout = arrow_kind(kind)
    root = Path(root)
    parts = split.split("+")
    unknown = [part for part in parts if part not in layout.splits]
    if unknown:
        vilt = ", ".join(f"{name} = {files!r}" for name, files in layout.vilt_splits.items())
        raise RenError(f"Unknown split {unknown[0]!r} for {kind} arrow files; the splits are "
                       f"{', '.join(layout.splits)}, and '+' joins them (ViLT reads {vilt}).")
    if not root.is_dir():
        raise RenError(f"The arrow data directory {root} does not exist or is not a directory "
                       f"(looking for the {kind} split {split!r}).")
    names = sorted(entry.name for entry in root.iterdir() if entry.is_file())
    found: list[Path] = []
    for part in parts:
        patterns = layout.splits[part]
        matches = [name for pattern in patterns for name in sorted(fnmatch.filter(names, pattern), key=_natural_key)]
        if not matches:
            raise RenError(f"No {kind} arrow file for the split {part!r} in {root}: expected "
                           f"{' or '.join(patterns)} (as {layout.writer} names them). The directory holds "
                           f"{_describe_directory(names)}.")
        found.extend(root / name for name in matches if root / name not in found)
    return found


def _open_ipc_file(path: Path, random_access: bool) -> pa.ipc.RecordBatchFileReader:
    try:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise RenError(f"The arrow file {path} does not exist.") from None
    except ValueError:  # mmap refuses empty files
        raise RenError(f"The arrow file {path} is empty.") from None
    except OSError as error:
        raise RenError(f"Cannot memory-map the arrow file {path}: {error}.") from None
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    try:
        return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped)))
    except (pa.ArrowInvalid, OSError) as error:
        raise RenError(f"{path} is not an Arrow IPC file as ViLT and METER write them "
                       f"(pa.RecordBatchFileWriter): {error}. Arrow stream files, such as the cache files "
                       "of Hugging Face datasets, are a different format.") from None


def _describe_schema(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def check_schema(path: Path, schema: pa.Schema, layout: ArrowKind) -> None:
    """Raise a :class:`RenError` naming every missing or mistyped column of ``path``."""
    problems = []
    for name, spec in {**layout.columns, **layout.optional}.items():
        index = schema.get_field_index(name)
        if index < 0:
            if name in layout.columns:
                problems.append(f"no column {name!r} (expected {spec})")
        elif not type_matches(schema.field(index).type, spec):
            problems.append(f"column {name!r} has type {schema.field(index).type}, expected {spec}")
    if problems:
        raise RenError(f"{path} is not a {layout.name} arrow file in the layout {layout.writer} writes: "
                       f"{'; '.join(problems)}. Its columns are: {_describe_schema(schema) or 'none'}.")


class ImageRows:
    """Image decoding shared by the row sources (:class:`ArrowSource`, and
    :class:`~engine.data.hf_source.HFSource`): a subclass sets :attr:`kind` and
    :attr:`skipped_images` and reads a cell's encoded bytes in :meth:`_image_bytes`."""

    kind: ArrowKind
    skipped_images: int

    def _image_bytes(self, i: int, column: str) -> bytes | None:
        """Row ``i``'s encoded image in ``column``, ``None`` when it has none."""
        raise NotImplementedError

    def transformed_image(self, i: int, transform: Callable[[Image.Image], Any], cache: dict[tuple[int, str], Any],
                          column: str = "image") -> Any | None:
        """Row ``i``'s image through ``transform``, decoded once per ``cache`` (a batch
        shows an image once however many of its texts it holds); None when unreadable."""
        key = (i, column)
        if key not in cache:
            image = self.image(i, column)
            cache[key] = None if image is None else transform(image)
        return cache[key]

    def image(self, i: int, column: str = "image") -> Image.Image | None:
        """Row ``i``'s image in ``column`` decoded to RGB; ``None`` (counted in
        :attr:`skipped_images`) when the bytes are missing or not a readable image."""
        if column not in self.kind.image_columns:
            raise RenError(f"{column!r} is not an image column of {self.kind.name} data; "
                           f"those are {', '.join(self.kind.image_columns)}.")
        data = self._image_bytes(i, column)
        if data is not None:
            try:
                with Image.open(BytesIO(data)) as image:
                    return image.convert("RGB")
            except Exception:  # PIL's decoders raise many types on foreign bytes; all mean "unreadable"
                pass
        self.skipped_images += 1
        return None


class ArrowSource(ImageRows):
    """Rows of one or more memory-mapped arrow files of one kind, indexed globally.

    Row ``i`` counts through the files in the order given. Nothing is converted
    up front; :meth:`row` and :meth:`image` read one row's cells. The source
    pickles as its paths and reopens the files when unpickled (a DataLoader
    worker started with spawn maps the files itself instead of copying them).
    ``random_access`` is explained at :func:`open_arrow`.
    """

    def __init__(self, paths: Sequence[Path | str], kind: str, *, random_access: bool = True) -> None:
        self.kind = arrow_kind(kind)
        self.paths = tuple(Path(p) for p in paths)
        if not self.paths:
            raise RenError(f"No arrow files were given for the {kind} data.")
        self.random_access = random_access
        self.skipped_images = 0
        self._open()

    def _open(self) -> None:
        batches: list[pa.RecordBatch] = []
        starts: list[int] = []
        batch_files: list[int] = []
        file_starts: list[int] = []
        self._file_columns: list[frozenset[str]] = []
        total = 0
        for file_index, path in enumerate(self.paths):
            reader = _open_ipc_file(path, self.random_access)
            check_schema(path, reader.schema, self.kind)
            self._file_columns.append(frozenset(reader.schema.names))
            file_starts.append(total)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                if batch.num_rows:
                    batches.append(batch)
                    starts.append(total)
                    batch_files.append(file_index)
                    total += batch.num_rows
        self._batches = batches
        self._starts = np.asarray(starts, dtype=np.int64)
        self._batch_files = batch_files
        self._file_starts = file_starts
        self._rows = total

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "kind": self.kind.name, "random_access": self.random_access,
                "skipped_images": self.skipped_images}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.kind = arrow_kind(state["kind"])
        self.paths = state["paths"]
        self.random_access = state["random_access"]
        self.skipped_images = state["skipped_images"]
        self._open()

    def __len__(self) -> int:
        return self._rows

    def _batch_of(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._rows:
            raise IndexError(f"row {i} is out of range for {self._rows} rows of {self.kind.name} arrow data")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        return b, i - int(self._starts[b])

    def locate(self, i: int) -> tuple[Path, int]:
        """The file that holds row ``i`` and the row's index within that file."""
        b, _ = self._batch_of(i)
        file_index = self._batch_files[b]
        return self.paths[file_index], i - self._file_starts[file_index]

    def _cell(self, i: int, column: str) -> pa.Scalar:
        b, local = self._batch_of(i)
        if column not in self._file_columns[self._batch_files[b]]:
            path = self.paths[self._batch_files[b]]
            raise RenError(f"{path} has no column {column!r}; its columns are: "
                           f"{', '.join(sorted(self._file_columns[self._batch_files[b]]))}.")
        return self._batches[b].column(column)[local]

    def column(self, name: str) -> pa.ChunkedArray:
        """One column over all files, zero-copy (for scans of small columns such as
        question lists; convert only what you need)."""
        for path, columns in zip(self.paths, self._file_columns):
            if name not in columns:
                raise RenError(f"{path} has no column {name!r}; its columns are: {', '.join(sorted(columns))}.")
        if not self._batches:
            return pa.chunked_array([], type=pa.null())
        return pa.chunked_array([batch.column(name) for batch in self._batches])

    def row(self, i: int, columns: Sequence[str]) -> dict[str, Any]:
        """Row ``i``'s cells in ``columns`` as Python values (binary cells as bytes)."""
        return {column: self._cell(i, column).as_py() for column in columns}

    def _image_bytes(self, i: int, column: str) -> bytes | None:
        return self._cell(i, column).as_py()


def _values(chunk: pa.Array) -> np.ndarray:
    """A numeric or boolean chunk's value buffer as numpy, null slots unspecified (zero-copy
    for numbers)."""
    if pa.types.is_boolean(chunk.type):
        chunk = chunk.cast(pa.int8())
    dtype = np.dtype(chunk.type.to_pandas_dtype())
    return np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)


def numbers(values: pa.ChunkedArray | pa.Array, fill: int | float = 0) -> np.ndarray:
    """Integer, float or boolean arrow values as one numpy array, nulls replaced by ``fill``.

    Reads the value buffers directly: pyarrow's ``to_numpy``, like every conversion
    between Python and Arrow values, imports pandas (about half a second) on first use."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    parts = []
    for chunk in chunks:
        if pa.types.is_null(chunk.type):
            parts.append(np.full(len(chunk), fill))
            continue
        part = _values(chunk)
        if chunk.null_count:
            part = part.copy()
            part[_values(pc.is_null(chunk)).astype(bool)] = fill
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros(0)


def list_lengths(lists: pa.ChunkedArray) -> np.ndarray:
    """Per-cell lengths of a list column as int64, a null list counting as empty."""
    return numbers(pc.list_value_length(lists)).astype(np.int64)


def expand_items(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items from per-row list lengths: each item's row and its slot in the row's lists."""
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.arange(len(rows), dtype=np.int64) - starts


def open_split(root: Path | str, kind: str, split: str) -> ArrowSource:
    """The memory-mapped rows of ``split`` (``a+b`` joins splits) of the ``kind`` files in ``root``."""
    return open_arrow(find_arrow_files(root, kind, split), kind)


def open_arrow(paths: Sequence[Path | str], kind: str, *, random_access: bool = True) -> ArrowSource:
    """Memory-map the arrow files ``paths`` of ``kind`` (one :class:`ArrowSource`,
    rows in the order of ``paths``) after checking each file's columns.

    With ``random_access`` (the default, for training's shuffled reads) the maps
    are advised ``MADV_RANDOM``: the kernel reads ahead nothing, so a row faults
    in only its own pages. ``False`` keeps the kernel's readahead, which suits
    scanning whole columns in order.
    """
    return ArrowSource(paths, kind, random_access=random_access)
