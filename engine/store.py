"""The results store: training runs and their metric series, on disk.

Run records live in a TinyDB index shared by all processes (every read-modify-write under ``index.lock``),
each run's metrics in bounded JSON segments under ``runs/<run_id>/metrics/`` with one writer. Every file is
standard JSON (a non-finite metric is ``null`` plus a ``"nonfinite"`` flag) and is replaced atomically, so
readers need no lock. Layout and guarantees: docs/queue-and-store.md, "The results store". The TUI imports
this module, so it must not import torch, transformers, timm or textual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Union, get_args, get_origin

from tinydb import Query, TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from engine.errors import RunNotFound, StoreBusy, StoreError

Stage = Literal["pretrain", "finetune"]
Status = Literal["created", "queued", "running", "finished", "failed", "cancelled", "crashed"]
STAGES: tuple[str, ...] = get_args(Stage)
STATUSES: tuple[str, ...] = get_args(Status)
END_STATUSES: tuple[str, ...] = ("finished", "failed", "cancelled", "crashed")

INDEX_LOCK_TIMEOUT_S = 30.0
# psutil derives create_time from the boot time, which some kernels report with a
# one-second jitter; a pid reused within a second of the original start is implausible.
PID_START_TOLERANCE_S = 1.0

_RUNS_TABLE = "runs"
_QUEUE_TABLE = "queue"
_TUI_DIR = "tui"  # per-user settings of ren-tui (Store.tui_settings)
_TMP_SUFFIX = ".tmp"
_SEGMENT_RE = re.compile(r"^(\d{6,})\.json$")
NONFINITE = "nonfinite"  # a metric point's {key: "nan" | "inf" | "-inf"} for the values written as null


def default_root() -> Path:
    """``$REN_HOME``, else ``$XDG_DATA_HOME/ren``, else ``~/.local/share/ren``."""
    if ren_home := os.environ.get("REN_HOME"):
        return Path(ren_home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "ren"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; filesystems that refuse are skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def nonfinite_values(value: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """``(path, number)`` of every NaN or infinity in ``value``, walking dicts (``a.b``) and lists (``a[2]``)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from nonfinite_values(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from nonfinite_values(item, f"{where}[{i}]")


def json_text(data: Any, path: Path, **options: Any) -> str:
    """``data`` as standard JSON; a NaN or infinity in it is a StoreError naming ``path`` and where it is
    (strict readers such as jq reject the ``NaN`` and ``Infinity`` Python would write)."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError:
        found = next(nonfinite_values(data), None)
        if found is None:
            raise
        raise StoreError(f"Cannot write {path}: {found[0] or 'the value'} is {found[1]}, and standard JSON has no "
                         "NaN or Infinity; nothing was written.") from None


def _atomic_write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as standard JSON, all or nothing; OSError becomes StoreError."""
    atomic_write_text(path, json_text(data, path, separators=(",", ":")))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, all or nothing (temp file, fsync, rename);
    OSError becomes StoreError. Used for every file under the store root."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(
            f"Cannot write {path}: {_reason(exc)}; its previous contents are unchanged."
        ) from exc
    _fsync_dir(path.parent)


def _legacy_constant(name: str) -> None:
    """``NaN``/``Infinity`` in an index written by an older ren: read as absent (null)."""
    return None


def process_umask() -> int:
    """This process's umask, read without changing it where Linux reports it (setting it to read it would
    race with other threads creating files), else set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (a directory with everything under it) the mode a plain ``open`` or ``mkdir`` would:
    0o666 or 0o777 less the umask. Writers that go through a temporary file (``tempfile``, safetensors,
    ``mkdtemp``) create 0600 or 0700, which would hide weights and caches from the other users of a shared
    store; call this on what they wrote before renaming it into place."""
    umask = process_umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _read_json(path: Path, **options: Any) -> Any | None:
    """The parsed contents of ``path``, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, **options)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"Cannot read {path}: {_reason(exc)}.") from exc
    except ValueError as exc:
        raise StoreError(f"Cannot read {path}: it is not valid JSON ({exc}).") from exc


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _remove_stale_temps(directory: Path, name: str = "*") -> None:
    """Delete temp files left by writers killed mid-write; call only while holding the lock."""
    for tmp in directory.glob(f".{name}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()


class AtomicJSONStorage(Storage):
    """TinyDB storage that replaces its file atomically on every write.

    The file is opened per call, so several processes may share it (writers must
    serialise their read-modify-write cycles with a lock). ``read_only`` storages
    never create or change a file.
    """

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only

    def read(self) -> dict[str, dict[str, Any]] | None:
        """The whole database, or None when the file does not exist yet; StoreError when it is not a TinyDB
        database (an object of tables, each an object of documents)."""
        data = _read_json(self.path, parse_constant=_legacy_constant)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise StoreError(f"Cannot read {self.path}: it holds a JSON {_json_kind(data)}, not ren's index of runs "
                             "(an object of tables). Restore it from a backup, or move it aside and ren starts an "
                             "empty index (the run directories stay).")
        for name, table in data.items():
            bad = (None if isinstance(table, dict) else f"its table {name!r} is a JSON {_json_kind(table)}") or next(
                (f"entry {key} of its table {name!r} is a JSON {_json_kind(doc)}, not a record"
                 for key, doc in table.items() if not isinstance(doc, dict)), None)
            if bad:
                raise StoreError(f"Cannot read {self.path}: {bad}. Restore it from a backup, or remove that entry "
                                 "with a JSON editor.")
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        """Atomically replace the file with ``data``."""
        if self.read_only:
            raise StoreError(f"Cannot write {self.path}: the store was opened read-only.")
        _atomic_write_json(self.path, data)


# psutil and filelock are imported where they are used: a reader of the store (ren-tui's start-up) needs
# neither until a run is running on this host or something is written, and importing them costs tens of ms.


def process_start_time(pid: int) -> float | None:
    """psutil's create_time of ``pid``, or None when no such process exists."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def is_alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``started`` is given, is the same process (a pid that is
    not a positive integer, as in a hand-edited record, names none)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < PID_START_TOLERANCE_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` (a queued run's runner and everything it started) has a live member."""
    import psutil

    for proc in psutil.process_iter():  # no attrs: process_iter shares its Process objects between threads
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
        except psutil.AccessDenied:  # a member we may not inspect: alive, as far as we can tell
            return True
    return False


def _gone(record: RunRecord) -> str:
    """Why a "running" record whose processes are all gone is shown as crashed."""
    where = "before its first step" if not record.step else f"at step {record.step}"
    pid = record.pid or record.runner_pid
    return (f"Its process (pid {pid}) ended {where} without recording a result: it was killed (SIGKILL, the "
            "out-of-memory killer) or the machine restarted. `ren run --resume` or `ren queue retry` continues it "
            "from its last checkpoint.")


@dataclass(frozen=True)
class RunRecord:
    """One training run as recorded in the index."""

    id: str
    name: str
    stage: Stage
    kind: str
    status: Status
    preset_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    notes: str = ""
    pid: int | None = None
    pid_started: float | None = None
    host: str | None = None
    device: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    step: int = 0
    max_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)  # FLOPs, throughput, PFLOPs, device-hours (engine.compute)
    best_scores: dict[str, float] = field(default_factory=dict)
    final_scores: dict[str, float] = field(default_factory=dict)
    # The split best_scores' and final_scores' eval/* keys were measured on (records made before it was
    # kept: None, and the split is the config's data.eval_split; engine.display.eval_split_of).
    eval_split: str | None = None
    # The test split, scored once with the final weights and never used to choose anything: {split/metric: score}.
    test_scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    init_from: str | None = None
    # The training loss so far, in at most 24 bucket means (for sparklines); None for a bucket that held a NaN
    # or infinite loss.
    loss_trace: tuple[float | None, ...] = ()
    # Queue: what the run asks for, where the worker placed it, how it is supervised.
    gpus: int = 1
    after: tuple[str, ...] = ()
    queue_pos: float | None = None
    queued_at: float | None = None
    launched_at: float | None = None
    resume: bool = False
    devices: tuple[int, ...] = ()
    runner_pid: int | None = None
    runner_started: float | None = None
    cancel_requested_at: float | None = None
    log_tail: str | None = None
    # A study's run: {"name", "variant", "seed", "stage", "task", "file"} (engine.study).
    study: dict[str, Any] | None = None
    # The software it trained with, to reproduce it: {"from_step", "python", "ren", "ren_commit", "torch",
    # "transformers", "timm", "accelerate"} per session that ran with other versions than the one before
    # (a resumed run keeps the earlier ones; engine.train.software_versions).
    versions: tuple[dict[str, Any], ...] = ()

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end (to now while running); None when unknown."""
        if self.started_at is None:
            return None
        if self.ended_at is not None:
            return self.ended_at - self.started_at
        if self.status == "running":
            return time.time() - self.started_at
        return None

    @property
    def train_s(self) -> float | None:
        """Seconds in the training loop over every session of the run (``compute.train_seconds``: a resumed
        run's earlier sessions count, start-up and evaluations do not); :attr:`duration_s` for records
        without it."""
        seconds = self.compute.get("train_seconds")
        return float(seconds) if isinstance(seconds, (int, float)) else self.duration_s

    def to_doc(self) -> dict[str, Any]:
        """The JSON-ready document stored in the index."""
        doc = dataclasses.asdict(self)
        for key in _TUPLE_FIELDS:
            doc[key] = list(doc[key])
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RunRecord:
        """Build a record from an index document, ignoring keys it does not know; a document that is not a
        run record (a field missing or of the wrong type) raises :class:`UnreadableRecord`."""
        values = {k: v for k, v in doc.items() if k in _FIELDS}
        for key in _SCORE_FIELDS:  # an older ren wrote NaN scores, which read as null: absent
            if isinstance(values.get(key), dict):
                values[key] = {k: v for k, v in values[key].items() if v is not None}
        problems = [f"field {name!r} is missing" for name in _REQUIRED if name not in values]
        problems += [f"field {name!r} is {value!r}, not {_describe(_HINTS[name])}"
                     for name, value in values.items() if not _CHECKS[name](value)]
        if problems:
            raise UnreadableRecord("; ".join(problems))
        for key in _TUPLE_FIELDS:
            values[key] = tuple(values.get(key, ()))
        return cls(**values)

    @property
    def supervised(self) -> bool:
        """Started by the queue worker (it has a runner process leading its process group)."""
        return self.runner_pid is not None


_FIELDS = frozenset(f.name for f in dataclasses.fields(RunRecord))
_TUPLE_FIELDS = ("tags", "after", "devices", "loss_trace", "versions")
_SCORE_FIELDS = ("best_scores", "final_scores", "test_scores")
_REQUIRED = tuple(f.name for f in dataclasses.fields(RunRecord)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_HINTS = typing.get_type_hints(RunRecord)


class UnreadableRecord(ValueError):
    """An index document that is not a run record; the message says which fields are wrong."""


@dataclass(frozen=True)
class Unreadable:
    """An index document that is not a run record: its id (or ``"#<n>"``, its place in the index, when it
    has no usable one) and what is wrong with it."""

    id: str
    reason: str


def _doc_name(doc: Mapping[str, Any]) -> str:
    run_id = doc.get("id")
    if isinstance(run_id, str) and run_id:
        return run_id
    return f"#{doc.doc_id}" if hasattr(doc, "doc_id") else "without an id"


def _describe(hint: Any) -> str:
    """A RunRecord field's type hint in words: ``"a whole number or null"``."""
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(h) for h in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if origin is dict:
        return "an object of numbers" if get_args(hint)[1] is float else "an object"
    words = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    return "a list" if origin is tuple else words.get(hint, str(hint))


_JSON_TYPES = {type(None): {type(None)}, bool: {bool}, int: {int}, float: {int, float}, str: {str}}


def _checker(hint: Any) -> Callable[[Any], bool]:
    """Whether a parsed JSON value fits a RunRecord field's type hint (lists stand for tuples), as a function
    made once per field: listing a large store checks every record. JSON gives exact types, so a type test
    is enough (and keeps booleans out of numbers)."""
    origin = get_origin(hint)
    options = get_args(hint) if origin is Union or origin is types.UnionType else (hint,)
    if all(option in _JSON_TYPES for option in options):
        allowed = frozenset().union(*(_JSON_TYPES[option] for option in options))
        return lambda value: type(value) in allowed
    if hint is Any:
        return lambda value: True
    if len(options) > 1:
        checks = [_checker(option) for option in options]
        return lambda value: any(fits(value) for fits in checks)
    if origin is Literal:
        literals = get_args(hint)
        return lambda value: value in literals
    if origin is dict:
        if get_args(hint)[1] is Any:
            return lambda value: type(value) is dict
        item = _checker(get_args(hint)[1])
        return lambda value: type(value) is dict and all(map(item, value.values()))
    if origin is tuple:
        item = _checker(get_args(hint)[0])
        return lambda value: type(value) in (list, tuple) and all(map(item, value))
    raise TypeError(f"RunRecord field type {hint} has no JSON check; add one to engine.store._checker.")


_CHECKS = {name: _checker(hint) for name, hint in _HINTS.items()}


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug or "run"


def _new_run_id(name: str, created_at: float) -> str:
    stamp = datetime.fromtimestamp(created_at, tz=timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{_slug(name)}-{secrets.token_hex(2)}"


def _as_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError(f"tags must be a sequence of strings, not the string {tags!r}.")
    return tuple(tags)


def _check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate ``update_run`` fields; returns them with tags normalised to a tuple."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ValueError(
            f"Unknown run field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(_FIELDS))}."
        )
    if "id" in fields:
        raise ValueError("A run's id cannot be changed.")
    if "stage" in fields and fields["stage"] not in STAGES:
        raise ValueError(f"Unknown stage {fields['stage']!r}; expected one of {', '.join(STAGES)}.")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(
            f"Unknown status {fields['status']!r}; expected one of {', '.join(STATUSES)}."
        )
    if "tags" in fields:
        fields = {**fields, "tags": _as_tags(fields["tags"])}
    for key in ("after", "devices", "loss_trace", "versions"):
        if key in fields:
            fields = {**fields, key: tuple(fields[key])}
    return fields


def _refuse_nonfinite(fields: Mapping[str, Any], run: str) -> None:
    """StoreError naming the first NaN or infinity in record ``fields``: the index holds standard JSON only."""
    found = next(nonfinite_values(fields), None)
    if found is not None:
        raise StoreError(f"Cannot record run {run}: {found[0]} is {found[1]}, and the store holds standard JSON "
                         "only (no NaN or Infinity, which strict JSON readers reject); nothing was written.")


def _segment_path(metrics_dir: Path, index: int) -> Path:
    return metrics_dir / f"{index:06d}.json"


def _segment_indices(metrics_dir: Path) -> list[int]:
    try:
        names = os.listdir(metrics_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StoreError(f"Cannot list {metrics_dir}: {_reason(exc)}.") from exc
    return sorted(int(m.group(1)) for name in names if (m := _SEGMENT_RE.match(name)))


def _encode_point(point: dict[str, Any]) -> dict[str, Any]:
    """A point as written: NaN and infinities become null, named in its ``"nonfinite"`` object."""
    flags = {key: "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
             for key, value in point.items() if isinstance(value, float) and not math.isfinite(value)}
    if not flags:
        return point
    return {**{key: None if key in flags else value for key, value in point.items()}, NONFINITE: flags}


def _decode_point(point: Any) -> Any:
    """A point as logged: each null value is the number its ``"nonfinite"`` flag names (NaN without one)."""
    if not isinstance(point, dict) or (NONFINITE not in point and None not in point.values()):
        return point
    flags = point.get(NONFINITE)
    flags = flags if isinstance(flags, dict) else {}
    return {key: float(flags.get(key) if flags.get(key) in ("inf", "-inf") else "nan") if value is None else value
            for key, value in point.items() if key != NONFINITE}


def _write_segment(path: Path, points: list[dict[str, Any]]) -> None:
    _atomic_write_json(path, {"points": [_encode_point(p) for p in points]})


def _read_segment(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path)
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise StoreError(f"Cannot read {path}: it is not a metrics segment.")
    return [_decode_point(p) for p in data["points"]]


def _read_points(metrics_dir: Path) -> list[dict[str, Any]]:
    """All flushed points in order.

    Segments are filled in order and a new one appears only once the previous one is
    full, so a listing taken mid-flush still yields a prefix of the series.
    """
    points: list[dict[str, Any]] = []
    for index in _segment_indices(metrics_dir):
        points.extend(_read_segment(_segment_path(metrics_dir, index)))
    return points


class MetricsWriter:
    """The single writer of one run's metric series.

    Points are buffered in memory and flushed every ``flush_every_s`` seconds (checked
    on ``log``), on ``flush()``, ``close()`` and context-manager exit. A flush rewrites
    only the last, partly filled segment and adds new ones, so its cost is bounded by
    ``segment_points``. Opening a writer on a run with metrics appends after them.
    """

    def __init__(self, run_dir: Path, *, flush_every_s: float = 2.0, segment_points: int = 5000) -> None:
        if segment_points < 1:
            raise ValueError(f"segment_points must be at least 1, got {segment_points}.")
        if flush_every_s < 0:
            raise ValueError(f"flush_every_s must not be negative, got {flush_every_s}.")
        self.run_id = run_dir.name
        self.metrics_dir = run_dir / "metrics"
        self.flush_every_s = flush_every_s
        self.segment_points = segment_points
        from filelock import FileLock, Timeout

        lock_path = run_dir / "metrics.lock"
        # Not thread-local: the writer may be closed by another thread than opened it.
        self._lock = FileLock(lock_path, thread_local=False)
        try:
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(blocking=False)
        except Timeout as exc:
            raise StoreError(
                f"Run {self.run_id} already has a metrics writer: {lock_path} is held by "
                "another process or by a writer that was not closed."
            ) from exc
        except OSError as exc:
            raise StoreError(f"Cannot open metrics of run {self.run_id}: {_reason(exc)}.") from exc
        try:
            _remove_stale_temps(self.metrics_dir)
            self._segment, self._points = self._resume_segment()
        except BaseException:
            self._lock.release()
            raise
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._closed = False

    def _resume_segment(self) -> tuple[int, list[dict[str, Any]]]:
        """The segment to append to and the points already in it."""
        indices = _segment_indices(self.metrics_dir)
        if not indices:
            return 0, []
        last = indices[-1]
        points = _read_segment(_segment_path(self.metrics_dir, last))
        if len(points) >= self.segment_points:
            return last + 1, []
        return last, points

    def rewind(self, step: int) -> None:
        """Drop flushed points after ``step``: a run resumed from the checkpoint at
        ``step`` logs those steps again, and its curve must not hold both copies."""
        self.flush()
        for index in reversed(_segment_indices(self.metrics_dir)):
            path = _segment_path(self.metrics_dir, index)
            points = _read_segment(path)
            kept = [p for p in points if p["step"] <= step]
            if len(kept) == len(points):
                break
            if kept:
                _write_segment(path, kept)
            else:
                try:
                    path.unlink()
                except OSError as exc:
                    raise StoreError(f"Cannot remove {path}: {_reason(exc)}.") from exc
        self._segment, self._points = self._resume_segment()

    def log(self, step: int, **values: float) -> None:
        """Buffer one point; flush when ``flush_every_s`` has passed since the last flush."""
        if self._closed:
            raise ValueError(f"The metrics writer of run {self.run_id} is closed.")
        for reserved in ("time", NONFINITE):
            if reserved in values:
                raise ValueError(f"{reserved!r} is recorded with the points; give the metric another name.")
        point: dict[str, Any] = {"step": int(step), "time": time.time()}
        point.update((key, float(value)) for key, value in values.items())
        self._pending.append(point)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write buffered points; on StoreError the unwritten points stay buffered."""
        while self._pending:
            room = self.segment_points - len(self._points)
            points = self._points + self._pending[:room]
            _write_segment(_segment_path(self.metrics_dir, self._segment), points)
            self._pending = self._pending[room:]
            if len(points) >= self.segment_points:
                self._segment, self._points = self._segment + 1, []
            else:
                self._points = points
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and release the run's writer lock; closing twice is harmless."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class QueueSettings:
    """How the queue worker places runs; stored in the index, so edits apply while it runs."""

    paused: bool = False
    """A paused queue starts nothing new; running runs go on."""
    cpu_slots: int = 1
    """Runs at once on a machine without GPUs."""
    runs_per_gpu: int = 1
    """Runs that may share one GPU."""
    allow_gpus: tuple[int, ...] | None = None
    """GPU indices (nvidia-smi numbering) the queue may use; None: all visible ones."""
    foreign_memory_mb: int | None = 1024
    """A GPU no ren run holds counts as busy when other processes use more than this
    much of its memory; None: ignore other processes."""
    cancel_grace_s: float = 60.0
    """Seconds a cancelled run has to checkpoint after SIGTERM before SIGKILL."""
    log_max_mb: float = 20.0
    """A run's log is rotated when it reaches this size."""
    log_backups: int = 3
    """Rotated logs kept per run (run.log.1 ... run.log.N)."""
    poll_s: float = 1.0
    """How often the worker looks at the queue when nothing wakes it."""

    def __post_init__(self) -> None:
        for name, low in (("cpu_slots", 1), ("runs_per_gpu", 1), ("log_backups", 0)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"queue setting {name} must be at least {low}, got {getattr(self, name)}.")
        for name in ("cancel_grace_s", "log_max_mb", "poll_s"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"queue setting {name} must be positive, got {getattr(self, name)}.")
        if self.foreign_memory_mb is not None and self.foreign_memory_mb < 0:
            raise ValueError(f"queue setting foreign_memory_mb must not be negative, got {self.foreign_memory_mb}.")

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        if self.allow_gpus is not None:
            doc["allow_gpus"] = list(self.allow_gpus)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> QueueSettings:
        # a null where the setting has a value by default (a NaN an older ren stored reads as null): the default
        values = {k: v for k, v in doc.items() if k in _SETTINGS and (v is not None or _NULLABLE_SETTINGS[k])}
        if values.get("allow_gpus") is not None:
            values["allow_gpus"] = tuple(values["allow_gpus"])
        return cls(**values)


_SETTINGS = frozenset(f.name for f in dataclasses.fields(QueueSettings))
_NULLABLE_SETTINGS = {f.name: f.default is None for f in dataclasses.fields(QueueSettings)}


class Store:
    """Façade over the run index and the per-run directories.

    Reads take no lock; every read-modify-write of the index holds ``index.lock``.
    Records of runs that are "running" on this host but whose process is gone are
    reported as "crashed" (the index itself is not changed by a read).
    """

    def __init__(self, root: Path | str | None = None, *, read_only: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.read_only = read_only
        self.index_path = self.root / "index.json"
        self._index_lock: Any = None  # the FileLock on index.lock, made by the first write (_lock)
        self._making_lock = threading.Lock()
        self._listed: tuple[tuple[int, int, int] | None, list[RunRecord], list[Unreadable]] = (None, [], [])
        self._parsed: tuple[tuple[int, int, int] | None, list[dict[str, Any]]] = (None, [])
        if not read_only:
            try:
                (self.root / "runs").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"Cannot create the store at {self.root}: {_reason(exc)}.") from exc

    def _db(self) -> TinyDB:
        return TinyDB(self.index_path, storage=AtomicJSONStorage, read_only=self.read_only)

    def _table(self, name: str = _RUNS_TABLE) -> Table:
        return self._db().table(name)

    @property
    def _lock(self) -> Any:
        """The index's FileLock (one per store, whichever thread asks first)."""
        if self._index_lock is None:
            from filelock import FileLock

            with self._making_lock:
                if self._index_lock is None:
                    self._index_lock = FileLock(self.root / "index.lock", timeout=INDEX_LOCK_TIMEOUT_S)
        return self._index_lock

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"The store at {self.root} was opened read-only.")

    @contextlib.contextmanager
    def _locked_table(self, name: str = _RUNS_TABLE) -> Iterator[Table]:
        """A table of the index (the runs by default), read fresh, while holding the index lock."""
        from filelock import Timeout

        self._check_writable()
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise StoreBusy(
                f"Waited {INDEX_LOCK_TIMEOUT_S:.0f} s for {self._lock.lock_file}; "
                "another ren process is holding it."
            ) from exc
        except OSError as exc:
            raise StoreError(f"Cannot lock {self._lock.lock_file}: {_reason(exc)}.") from exc
        try:
            _remove_stale_temps(self.root, self.index_path.name)
            yield self._table(name)
        finally:
            self._lock.release()

    def _find(self, docs: list[dict[str, Any]], key: str) -> RunRecord:
        """The record whose id is ``key`` or, failing that, the only one starting with it."""
        for doc in docs:
            if doc.get("id") == key:
                return self._record(doc)
        matches = [doc for doc in docs if key and str(doc.get("id", "")).startswith(key)]
        if len(matches) == 1:
            return self._record(matches[0])
        if not matches:
            raise RunNotFound(
                f"No run with id {key!r} in the store at {self.root}; `ren runs` lists the runs."
            )
        ids = sorted(str(doc["id"]) for doc in matches)
        raise RunNotFound(
            f"The id prefix {key!r} matches {len(ids)} runs ({', '.join(ids)}); "
            "give more of the id (`ren runs` lists them)."
        )

    def _record(self, doc: Mapping[str, Any]) -> RunRecord:
        """The run record of an index document; StoreError naming the file, the run and what is wrong."""
        try:
            return RunRecord.from_doc(doc)
        except UnreadableRecord as exc:
            raise StoreError(f"Run {_doc_name(doc)} in {self.index_path} is unreadable: {exc}. Restore the "
                             "record from a backup or remove it with a JSON editor; the other runs are not "
                             "affected.") from None

    def _records(self, docs: Iterable[Mapping[str, Any]]) -> tuple[list[RunRecord], list[Unreadable]]:
        """The readable records of ``docs``, and what is wrong with each of the others."""
        records, unreadable = [], []
        for doc in docs:
            try:
                records.append(RunRecord.from_doc(doc))
            except UnreadableRecord as exc:
                unreadable.append(Unreadable(_doc_name(doc), str(exc)))
        return records, unreadable

    def _report(self, record: RunRecord) -> RunRecord:
        """The record as it should be shown: a vanished local process means "crashed", with the reason."""
        if record.status != "running" or record.host != socket.gethostname():
            return record
        watched = [(pid, started) for pid, started in ((record.pid, record.pid_started),
                                                       (record.runner_pid, record.runner_started)) if pid]
        if not watched or any(is_alive(pid, started) for pid, started in watched):
            return record
        if record.runner_pid and group_alive(record.runner_pid):  # its runner is gone, its trainer is not
            return record
        return dataclasses.replace(record, status="crashed", error=record.error or _gone(record))

    def _run_path(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def create_run(
        self,
        *,
        name: str,
        stage: Stage,
        kind: str,
        config: Mapping[str, Any],
        preset_path: str | None = None,
        tags: Iterable[str] = (),
        notes: str = "",
        max_steps: int | None = None,
        init_from: str | None = None,
    ) -> RunRecord:
        """Record a new run with status "created" and make its directory."""
        if stage not in STAGES:
            raise ValueError(f"Unknown stage {stage!r}; expected one of {', '.join(STAGES)}.")
        _refuse_nonfinite({"config": config}, name)
        created_at = time.time()
        with self._locked_table() as table:
            taken = {doc.get("id") for doc in table.all()}
            run_id = _new_run_id(name, created_at)
            while run_id in taken:
                run_id = _new_run_id(name, created_at)
            record = RunRecord(
                id=run_id,
                name=name,
                stage=stage,
                kind=kind,
                status="created",
                preset_path=preset_path,
                config=dict(config),
                tags=_as_tags(tags),
                notes=notes,
                created_at=created_at,
                max_steps=max_steps,
                init_from=init_from,
            )
            try:
                self._run_path(run_id).mkdir(parents=True)
            except OSError as exc:
                raise StoreError(
                    f"Cannot create {self._run_path(run_id)}: {_reason(exc)}."
                ) from exc
            try:
                table.insert(record.to_doc())
            except StoreError:  # e.g. a full disk: leave no directory without a record
                with contextlib.suppress(OSError):
                    self._run_path(run_id).rmdir()
                raise
        return record

    def get_run(self, run_id: str) -> RunRecord:
        """The run with this id or unique id prefix; RunNotFound otherwise."""
        return self._report(self._find(self._index_docs()[1], run_id))

    def _index_docs(self) -> tuple[tuple[int, int, int] | None, list[dict[str, Any]]]:
        """(:meth:`index_stamp`, the run index's documents) for reads that take no lock: the file is parsed
        again only when it changed (every write replaces it), so a view that reads a run every second (the
        TUI's Monitor) does not parse a large index each time. The documents are shared: read them only."""
        stamp = self.index_stamp()
        parsed = self._parsed
        if stamp is not None and stamp == parsed[0]:
            return parsed
        parsed = (stamp, self._table().all())
        if stamp is not None:
            self._parsed = parsed
        return parsed

    def index_stamp(self) -> tuple[int, int, int] | None:
        """Changes with every write of the index (writes replace the file: a new inode);
        None before the first write."""
        try:
            st = os.stat(self.index_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def list_runs(self) -> list[RunRecord]:
        """All readable runs, newest first (:meth:`unreadable_runs` says which records are not). The parsed
        index is kept while the file is unchanged (every write replaces it, so its inode, time and size
        identify a version), which makes polling a large store cheap; liveness is checked afresh on every
        call."""
        stamp, docs = self._index_docs()
        if stamp is None or stamp != self._listed[0]:
            records, unreadable = self._records(docs)
            records.sort(key=lambda r: (r.created_at or 0.0, r.id), reverse=True)
            self._listed = (stamp, records, unreadable)
        return [self._report(record) for record in self._listed[1]]

    def unreadable_runs(self) -> list[Unreadable]:
        """The index's documents that are not run records (a field missing or of the wrong type), which
        :meth:`list_runs` leaves out, as of its last call."""
        return list(self._listed[2])

    def update_run(self, run_id: str, **fields: Any) -> RunRecord:
        """Set record fields; an unknown field name raises ValueError."""
        fields = _check_fields(fields)
        _refuse_nonfinite(fields, run_id)
        with self._locked_table() as table:
            record = dataclasses.replace(self._find(table.all(), run_id), **fields)
            table.update(record.to_doc(), Query().id == record.id)
        return self._report(record)

    def mark_running(self, run_id: str, *, pid: int, host: str, device: str, **fields: Any) -> RunRecord:
        """Record that process ``pid`` on ``host`` is now training the run (plus any
        other ``fields``, in the same index write).

        The session starts now, unless the queue launched this session: then it started at the
        launch (``started_at`` = ``launched_at``, set by the worker), and the trainer taking over
        from the runner keeps that, so the run's time does not restart when the trainer is up."""
        fields = _check_fields(fields)
        _refuse_nonfinite(fields, run_id)
        with self._locked_table() as table:
            stored = self._find(table.all(), run_id)
            launched = (stored.status == "running" and stored.launched_at is not None
                        and stored.started_at == stored.launched_at)
            record = dataclasses.replace(
                stored, **fields, status="running", pid=pid, pid_started=process_start_time(pid), host=host,
                device=device, started_at=stored.started_at if launched else time.time(), ended_at=None,
                error=None)
            table.update(record.to_doc(), Query().id == record.id)
        return self._report(record)

    def transition(self, run_id: str, statuses: Iterable[str], expect: Mapping[str, Any] | None = None,
                   **fields: Any) -> RunRecord | None:
        """Set ``fields`` only if the run, as reported (a vanished local process reads "crashed"), has one of
        ``statuses`` and the values of ``expect``; None, changing nothing, when it has not. The check and the
        write happen under one hold of the index lock, so the queue's processes (worker, runner, trainer, the
        CLI) never overwrite what another one wrote in between."""
        fields = _check_fields(fields)
        with self._locked_table() as table:
            stored = self._find(table.all(), run_id)
            shown = self._report(stored)
            if shown.status not in tuple(statuses) or any(getattr(shown, k) != v for k, v in (expect or {}).items()):
                return None
            record = dataclasses.replace(stored, **fields)
            table.update(record.to_doc(), Query().id == record.id)
        return self._report(record)

    def mark_ended(self, run_id: str, status: Status, error: str | None = None) -> RunRecord:
        """Record the end of the run with a terminal status."""
        if status not in END_STATUSES:
            raise ValueError(
                f"{status!r} is not an end status; expected one of {', '.join(END_STATUSES)}."
            )
        return self.update_run(run_id, status=status, error=error, ended_at=time.time())

    def delete_run(self, run_id: str) -> None:
        """Remove the record and the run directory; refuses a run that is still running."""
        with self._locked_table() as table:
            record = self._report(self._find(table.all(), run_id))
            if record.status == "running":
                raise StoreError(
                    f"Run {record.id} is still running (pid {record.pid} on {record.host}); "
                    "stop it before deleting it."
                )
            table.remove(Query().id == record.id)
        path = self._run_path(record.id)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(
                f"Removed run {record.id} from the index but cannot delete {path}: {_reason(exc)}."
            ) from exc

    # --- the queue -------------------------------------------------------------

    def enqueue(self, run_id: str, *, gpus: int = 1, after: Iterable[str] = (), resume: bool = False) -> RunRecord:
        """Put a created, failed or cancelled run at the end of the queue."""
        if gpus < 1:
            raise ValueError(f"A run needs at least one GPU or process, got gpus={gpus}.")
        with self._locked_table() as table:
            docs = table.all()
            record = self._report(self._find(docs, run_id))
            if record.status in ("queued", "running", "finished"):
                raise StoreError(f"Run {record.id} is {record.status}; only created, failed, cancelled "
                                 "or crashed runs can be queued.")
            deps = tuple(self._find(docs, dep).id for dep in after)
            if record.id in deps:
                raise StoreError(f"Run {record.id} cannot wait for itself.")
            last = max((d["queue_pos"] for d in docs if d.get("status") == "queued"
                        and d.get("queue_pos") is not None), default=0.0)
            record = dataclasses.replace(
                record, status="queued", gpus=gpus, after=deps, resume=resume, queue_pos=float(int(last) + 1),
                queued_at=time.time(), launched_at=None, devices=(), pid=None, pid_started=None, runner_pid=None,
                runner_started=None, cancel_requested_at=None, started_at=None, ended_at=None, error=None,
                log_tail=None,
            )
            table.update(record.to_doc(), Query().id == record.id)
        return record

    def queued_runs(self) -> list[RunRecord]:
        """Queued runs in queue order."""
        records = self._records(d for d in self._table().all() if d.get("status") == "queued")[0]
        return sorted(records, key=lambda r: (r.queue_pos or 0.0, r.queued_at or 0.0))

    def move_in_queue(self, run_id: str, position: int) -> list[RunRecord]:
        """Move a queued run to 1-based ``position`` (clamped to the queue); returns the new order."""
        with self._locked_table() as table:
            record = self._find(table.all(), run_id)
            if record.status != "queued":
                raise StoreError(f"Run {record.id} is {record.status}, not queued; only queued runs can move.")
            order = self._records(d for d in table.all() if d.get("status") == "queued")[0]
            order.sort(key=lambda r: (r.queue_pos or 0.0, r.queued_at or 0.0))
            order = [r for r in order if r.id != record.id]
            order.insert(min(max(position, 1), len(order) + 1) - 1, record)
            for pos, r in enumerate(order, start=1):
                if r.queue_pos != pos:
                    table.update({"queue_pos": float(pos)}, Query().id == r.id)
        return self.queued_runs()

    def queue_settings(self) -> QueueSettings:
        """The queue's settings (defaults until changed)."""
        docs = self._table(_QUEUE_TABLE).all()
        return QueueSettings.from_doc(docs[0]) if docs else QueueSettings()

    def update_queue_settings(self, **changes: Any) -> QueueSettings:
        """Change queue settings; an unknown name or a bad value raises ValueError."""
        unknown = sorted(set(changes) - _SETTINGS)
        if unknown:
            raise ValueError(f"Unknown queue setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_SETTINGS))}.")
        with self._locked_table(_QUEUE_TABLE) as table:
            docs = table.all()
            current = QueueSettings.from_doc(docs[0]) if docs else QueueSettings()
            settings = dataclasses.replace(current, **changes)
            table.truncate()
            table.insert(settings.to_doc())
        return settings

    def tui_settings_path(self, user: str) -> Path:
        """Where ``user``'s TUI settings live: ``tui/<user>.json`` (the name made safe for a file name)."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", user).strip("._") or "_"
        return self.root / _TUI_DIR / f"{name}.json"

    def tui_settings(self, user: str) -> dict[str, Any]:
        """What ``user``'s ``ren-tui`` saved of its view (marks, sort, filter, last screen), as a JSON object
        the TUI reads and writes whole; ``{}`` until it saved one. The store keeps it, not its meaning.

        One small file per user, outside the index: it changes as someone marks runs, and the run index
        (whose lock the trainers take every few seconds) should not. StoreError when it is unreadable."""
        path = self.tui_settings_path(user)
        data = _read_json(path)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise StoreError(f"Cannot read {path}: it holds a JSON {_json_kind(data)}, not TUI settings (an "
                             "object); remove it and ren-tui starts from its defaults.")
        return data

    def save_tui_settings(self, user: str, settings: Mapping[str, Any]) -> None:
        """Replace ``user``'s TUI settings, atomically (its one writer is that user's ``ren-tui``; with two of
        them open, the last one saved wins)."""
        self._check_writable()
        path = self.tui_settings_path(user)
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create {path.parent}: {_reason(exc)}.") from exc
        _atomic_write_json(path, dict(settings))

    def run_dir(self, run_id: str) -> Path:
        """The directory of the run with this id or unique id prefix."""
        return self._run_path(self._find(self._index_docs()[1], run_id).id)

    def metrics_writer(
        self, run_id: str, flush_every_s: float = 2.0, segment_points: int = 5000
    ) -> MetricsWriter:
        """The run's single metrics writer; StoreError if another one is open."""
        self._check_writable()
        return MetricsWriter(
            self.run_dir(run_id), flush_every_s=flush_every_s, segment_points=segment_points
        )

    def read_metrics(self, run_id: str) -> list[dict[str, Any]]:
        """Every flushed point in order: dicts with "step", "time" and the logged keys."""
        return _read_points(self.run_dir(run_id) / "metrics")

    def series(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` for the points that have ``key``."""
        return [(p["step"], p[key]) for p in self.read_metrics(run_id) if key in p]
