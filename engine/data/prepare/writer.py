"""The writer every source shares: the report, rows and outputs to be, and the job that writes arrow files
atomically in bounded record batches, keeps complete ones and holds the output folder's lock."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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

Progress = Callable[[int, int], None]

BATCH_ROWS = 1000  # a record batch ends at this many rows or this many image bytes, whichever comes first
BATCH_BYTES = 64 << 20

MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
MISSING_ANNOTATION = "missing annotation"
UNKNOWN_LABEL = "unknown label"
UNKNOWN_SPLIT = "unknown split"
NO_VOCAB_ANSWER = "no answer in the vocabulary"

_EXAMPLES_PER_REASON = 3
_LOCK_NAME = ".ren-prepare.lock"

STRING = pa.string()
LIST_STRING = pa.list_(pa.string())
LIST_INT = pa.list_(pa.int64())


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


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class Row:
    """One output row to be: how the report names it, its image files, its other cells in schema order."""

    record: str
    images: tuple[Path, ...]
    values: tuple[Any, ...]
    texts: int


class LazyRows(Sequence[Row]):
    """``make(item)`` for each of ``items``, made when read, so that millions of rows are not held as :class:`Row`."""

    def __init__(self, items: Sequence[Any], make: Callable[[Any], Row]) -> None:
        self._items, self._make = items, make

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]  # an index, never a slice
        return self._make(self._items[index])


@dataclass
class Output:
    """An output file to write: its rows and the records already left out of it."""

    name: str
    schema: pa.Schema
    rows: list[Row] | LazyRows = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)


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


class Job:
    """One :func:`prepare` call: which outputs are complete, writing the others, the report. As a context
    manager it creates ``out`` and holds its lock, refusing to run beside another ``prepare`` into ``out``."""

    def __init__(self, task: str, source: Path, out: Path, progress: Progress | None, force: bool) -> None:
        self.task, self.kind, self.source, self.out = task, arrow_kind(task), Path(source), Path(out)
        self.progress, self.force = progress, force
        self.report = PrepareReport(task=task, source=self.source, out=self.out)
        self._files: dict[str, OutputFile] = {}
        self._done = self._total = 0
        self._lock = FileLock(str(self.out / _LOCK_NAME), timeout=0)

    def __enter__(self) -> Job:
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

    def write(self, outputs: Sequence[Output]) -> None:
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

    def _write_output(self, output: Output) -> None:
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

    def _read_images(self, row: Row, output: str) -> list[bytes] | None:
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
                                         f"as part of {split} beside this run's {plural(len(names), 'shard')}.")

    def finish(self, names: Sequence[str]) -> PrepareReport:
        """The report, its files in the order of ``names``."""
        self.report.outputs = [self._files[name] for name in names if name in self._files]
        return self.report


def prepare_splits(task: str, source: Path, out: Path, progress: Progress | None, force: bool, names: dict[str, str],
                   outputs: Callable[[Job, list[str]], list[Output]], notes: Sequence[str] = ()) -> PrepareReport:
    """A converter of one file per split: ``names`` maps split -> file name; the files not complete are written
    from ``outputs(job, pending splits)``; ``notes`` go into the report."""
    with Job(task, source, out, progress, force) as job:
        job.report.notes.extend(notes)
        pending = [split for split in names if not job.complete(names[split])]
        written = outputs(job, pending) if pending else []
        if written:
            job.write(written)
        return job.finish(list(names.values()))
