"""What the screens may call: the store façade and the queue API, nothing else.

Screens never touch subprocesses, TinyDB documents or torch. Everything that
reads the disk here is meant to run in a Textual worker thread
(``@work(thread=True)``), so live updates never block typing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import getpass
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import RenError, StoreError
from engine.jobs.gpus import GPU, visible_gpus
from engine.jobs.runner import log_files, log_path, read_log_tail
from engine.store import RunRecord, Store

if TYPE_CHECKING:
    from engine.jobs.api import QueueView
    from engine.predictions import SplitPredictions
    from engine.report import ReportTable
    from ren_tui.inspector import Inspector


_gc_pauses = 0
_gc_lock = threading.Lock()
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a large file is parsed into objects (a metric series, the run index;
    threads may nest it). Parsing allocates tens of thousands of containers, which starts collections; in
    the TUI's process, whose heap is large, a full one took 0.2 s here, inside the Monitor's first read.
    Collection resumes right after (RenApp also freezes what start-up made, see RenApp.freeze_heap)."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name, no passwd entry (a container's random uid)
        return f"uid{os.getuid()}"


@dataclasses.dataclass(frozen=True)
class Series:
    """One run's metric points: ``points`` as written (dicts with step, time and values)."""

    run_id: str
    points: list[dict[str, Any]]

    def keys(self) -> list[str]:
        """Metric names in first-seen order (step and time excluded)."""
        seen: dict[str, None] = {}
        for point in self.points:
            for key in point:
                if key not in ("step", "time"):
                    seen.setdefault(key, None)
        return list(seen)

    def xy(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """``(xs, ys)`` for ``key``; ``x`` is "step" or "time" (seconds since the first point)."""
        pts = [p for p in self.points if key in p]
        if x == "time":
            t0 = self.points[0]["time"] if self.points else 0.0
            return [p["time"] - t0 for p in pts], [p[key] for p in pts]
        return [float(p["step"]) for p in pts], [p[key] for p in pts]


@dataclasses.dataclass(frozen=True)
class LogChunk:
    """New lines of a run's log (complete lines only, as written: not yet made terminal-safe) and where
    to read on from (``position``: the file's inode and offset; None while there is no log). ``note`` says
    what the lines skip, if anything: the file was rotated or replaced, or it grew faster than shown."""

    lines: list[str]
    position: tuple[int, int] | None
    note: str = ""


class Backend:
    """The TUI's single door to runs, metrics, logs, the queue and the GPUs.

    ``start_worker=False`` (tests) queues runs without starting a worker process, and starts no model
    inspector before a screen asks for one.
    ``inventory`` lists the GPUs (default: NVML's; tests pass fake ones).
    """

    def __init__(self, store: Store, *, start_worker: bool = True,
                 inventory: Callable[[], Sequence[GPU]] = visible_gpus) -> None:
        self.store = store
        self.start_worker = start_worker
        self.inventory = inventory
        # The model-inspector client, created on first use. Tests may set a fake: any object
        # with ``start() -> str | None``, ``inspect(config) -> dict`` and ``close()``.
        self.inspector: Inspector | None = None
        self._inspector_lock = threading.Lock()
        self.user = _user_name()  # whose TUI settings these are: a store may be shared
        self._pending_settings: dict[str, Any] | None = None
        self._settings_lock = threading.Lock()  # guards _pending_settings
        self._settings_writer = threading.Lock()  # one write of the settings file at a time
        self._prefetch: threading.Thread | None = None  # prefetch_runs's read

    # --- runs -----------------------------------------------------------------

    def prefetch_runs(self) -> None:
        """Start reading the run index now, in a thread of its own (the app calls this before it sets up its
        first screen): the first :meth:`runs` then finds it read, or waits for that read to end. A large index
        takes a tenth of a second to parse, which would otherwise start only once the screen is mounted."""
        if self._prefetch is None:
            self._prefetch = threading.Thread(target=self._prefetch_runs, name="ren-read-runs", daemon=True)
            self._prefetch.start()

    def _prefetch_runs(self) -> None:
        try:
            with gc_paused():
                self.store.list_runs()
        except (RenError, OSError):
            pass  # the screen's own read says what is wrong

    def runs(self) -> list[RunRecord]:
        prefetch = self._prefetch
        if prefetch is not None and prefetch is not threading.current_thread():
            prefetch.join()
        with gc_paused():  # cheap unless the index changed: then it is parsed again
            return self.store.list_runs()

    def run(self, run_id: str) -> RunRecord:
        return self.store.get_run(run_id)

    def series(self, run_id: str) -> Series:
        with gc_paused():
            return Series(run_id, self.store.read_metrics(run_id))

    def report(self, run_ids: Sequence[str]) -> ReportTable:
        """The study report's table for these runs (engine.report): per variant, downstream
        scores over seeds, pretraining compute and what it saves against the first run."""
        from engine.report import report_rows

        return report_rows(self.store, list(run_ids))

    def predictions(self, run_id: str) -> list[SplitPredictions]:
        """The run's kept predictions (``ren eval task RUN --examples N``), one per evaluated split, by
        ``dataset/split``; [] when it has none. Each one's ``thumbnail_path(example)`` is its picture's file."""
        from engine.predictions import kept_predictions

        return kept_predictions(self.store, run_id)

    def log_tail(self, run_id: str, lines: int = 20) -> list[str]:
        """The last lines of a queued run's log ([] for runs without one)."""
        return read_log_tail(self.store.run_dir(run_id), lines)

    LOG_SKIP_BYTES = 4 * 1024 * 1024
    """More new log than this between two reads: a view skips to the last ``first_bytes`` of it."""

    def read_log(self, run_id: str, since: tuple[int, int] | None = None, *, first_bytes: int = 64 * 1024,
                 backups: bool = False) -> LogChunk:
        """The complete lines of a queued run's log written since ``since`` (a :attr:`LogChunk.position`).
        On the first read (``since`` None), its last ``first_bytes`` (``backups``: of its rotated files and
        it, oldest first); when more than LOG_SKIP_BYTES arrived in between, the last ``first_bytes`` too.
        A view that follows a log calls it again with each chunk's position; a rotated or replaced file is
        read afresh from its start."""
        run_dir = self.store.run_dir(run_id)
        path = log_path(run_dir)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                size, note = st.st_size, ""
                if since is None:
                    start = max(size - first_bytes, 0)
                elif since[0] != st.st_ino or size < since[1]:
                    start, note = 0, "(the log file was rotated or replaced: reading the new one)"
                elif size - since[1] > self.LOG_SKIP_BYTES:
                    start = size - first_bytes
                    note = f"(… {start - since[1]:,} bytes of log skipped …)"
                else:
                    start = since[1]
                fh.seek(start)
                data = fh.read(size - start)
        except FileNotFoundError:
            return LogChunk([], None)
        except OSError as exc:
            raise StoreError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
        cut = start > 0 and (since is None or note.startswith("(…"))
        skip = data.find(b"\n") + 1 if cut else 0  # the line the start cut in two
        end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
        lines = data[skip:end].decode("utf-8", errors="replace").split("\n")[:-1] if end > skip else []
        if backups and since is None and start == 0:
            budget = first_bytes - size
            for backup in reversed(log_files(run_dir)[:-1]):  # the newest backup first
                if budget <= 0:
                    break
                try:
                    with open(backup, "rb") as fh:
                        fh.seek(0, os.SEEK_END)
                        begin = max(fh.tell() - budget, 0)
                        fh.seek(begin)
                        older = fh.read()
                except OSError:
                    continue
                budget -= len(older)
                if begin:
                    older = older[older.find(b"\n") + 1:]
                lines = older.decode("utf-8", errors="replace").splitlines() + lines
        return LogChunk(lines, (st.st_ino, start + max(end, skip)), note)

    def update(self, run_id: str, *, tags: Sequence[str] | None = None, notes: str | None = None) -> RunRecord:
        fields: dict[str, Any] = {}
        if tags is not None:
            fields["tags"] = tuple(tags)
        if notes is not None:
            fields["notes"] = notes
        return self.store.update_run(run_id, **fields)

    def delete(self, run_id: str) -> None:
        self.store.delete_run(run_id)

    # --- the TUI's own settings ----------------------------------------------------

    def tui_settings(self) -> dict[str, Any]:
        """What this user's last ``ren-tui`` saved (Store.tui_settings); {} when there is nothing usable."""
        try:
            return self.store.tui_settings(self.user)
        except (RenError, OSError):
            return {}

    def remember_tui_settings(self, settings: dict[str, Any]) -> None:
        """Take a copy of ``settings`` to save at the next :meth:`flush_tui_settings` (cheap: UI thread)."""
        copy = json.loads(json.dumps(settings))
        with self._settings_lock:
            self._pending_settings = copy

    def flush_tui_settings(self) -> None:
        """Write the latest remembered settings, if any; one writer at a time, so the file always ends
        with the newest version. A failure (a read-only store, a full disk) loses only the view."""
        with self._settings_writer:
            with self._settings_lock:
                pending, self._pending_settings = self._pending_settings, None
            if pending is not None:
                try:
                    self.store.save_tui_settings(self.user, pending)
                except (RenError, OSError):
                    pass

    # --- queue ----------------------------------------------------------------

    def queue(self, gpus: list[GPU] | None = None) -> QueueView:
        from engine.jobs import api as Q

        return Q.view(self.store, gpus=self.gpus() if gpus is None else gpus)

    def gpus(self) -> list[GPU]:
        return list(self.inventory())

    def queue_preset(self, preset: Path, *, gpus: int = 1, overrides: Sequence[str] = (),
                     after: Sequence[str] = ()) -> list[RunRecord]:
        from engine.jobs import api as Q

        return Q.add(self.store, preset, list(overrides), gpus=gpus, after=list(after),
                     start_worker=self.start_worker, inventory=self.gpus())

    def cancel(self, run_id: str) -> RunRecord:
        from engine.jobs import api as Q

        return Q.cancel(self.store, run_id)

    def retry(self, run_id: str) -> RunRecord:
        from engine.jobs import api as Q

        return Q.retry(self.store, run_id, start_worker=self.start_worker)

    def retry_outcome(self, run_id: str) -> str:
        """What queueing the run again does, in words: it resumes from step N, or starts over (reads its
        checkpoints: call from a worker thread)."""
        from engine.runs import retry_outcome

        return retry_outcome(self.store, run_id)

    def checkpoint_step(self, run_id: str) -> int | None:
        """The step a resume of the run continues from (its last complete checkpoint), None without one."""
        from engine.runs import checkpoint_step

        return checkpoint_step(self.store.run_dir(run_id))

    def move(self, run_id: str, position: int) -> list[RunRecord]:
        from engine.jobs import api as Q

        return Q.move(self.store, run_id, position)

    def set_gpus(self, run_id: str, gpus: int) -> RunRecord:
        """Change how many GPUs a queued run asks for."""
        record = self.store.get_run(run_id)
        if record.status != "queued":
            raise RenError(f"run {record.id} is {record.status}; only a queued run's GPU count can change.")
        if gpus < 1:
            raise RenError("a run needs at least one GPU (or CPU process).")
        return self.store.update_run(record.id, gpus=gpus)

    def set_paused(self, paused: bool) -> None:
        """Pause or resume the queue; resuming starts a worker unless ``start_worker`` is off."""
        from engine.jobs import api as Q

        if self.start_worker:
            Q.set_paused(self.store, paused)
        else:
            self.store.update_queue_settings(paused=paused)

    # --- Compose and Freeze screens: presets and the model inspector -----------

    SHIPPED_PRESETS = Path(__file__).resolve().parents[1] / "presets"
    """The repository's presets (``presets/*.toml``; ``presets/base`` holds fragments)."""

    def _the_inspector(self) -> Inspector:
        with self._inspector_lock:
            if self.inspector is None:
                from ren_tui.inspector import Inspector

                self.inspector = Inspector(log=self.store.root / "inspector.log")
            return self.inspector

    def start_inspector(self) -> str | None:
        """Start the model inspector now (it imports torch: seconds); why it failed, else None."""
        return self._the_inspector().start()

    def warm_inspector(self) -> None:
        """Start the model inspector and have it answer the default preset (run at app start, in a
        worker), so the first Compose answers at once. A backend that starts no processes of its own
        (``start_worker=False``: tests) warms only an inspector it was given."""
        if not self.start_worker and self.inspector is None:
            return
        if self.start_inspector() is not None:
            return  # Compose says why when it opens
        preset = self.default_preset()
        if preset is not None:
            try:
                self.inspect(self.preset_config(preset))
            except RenError:
                pass  # Compose reports a preset that does not load

    def inspect(self, config: dict[str, Any]) -> dict[str, Any]:
        """Validate ``config`` here (milliseconds), then ask the model inspector for its
        parameter report and compute estimate. The answer is a dict as
        :mod:`engine.inspector` writes it (``ok``, then ``params``, ``flops_per_sample``,
        ``frozen_groups``, or ``error`` and ``key``)."""
        from engine.config import config_from_dict
        from engine.errors import ConfigError
        from engine.runs import check_init_from

        try:
            check_init_from(self.store, config_from_dict(config))
        except ConfigError as exc:
            return {"id": None, "ok": False, "error": str(exc), "key": exc.key}
        except RenError as exc:  # a damaged weights file
            return {"id": None, "ok": False, "error": str(exc), "key": "train.init_from"}
        return self._the_inspector().inspect(config)

    def timed_runs(self) -> tuple[str, list[RunRecord]]:
        """(this machine's host name, the store's finished runs): Compose times a config by the
        training throughput runs measured here (``ren_tui.estimate``)."""
        import socket

        return socket.gethostname(), [r for r in self.store.list_runs() if r.status == "finished"]

    def init_sources(self) -> list[tuple[str, str]]:
        """What a run can start from (``train.init_from``), as (label, value): finished runs, newest
        first, then the presets (a preset's finished run is reused, or it is queued first)."""
        from engine.runs import PRESET_PREFIX, RUN_PREFIX

        runs = sorted((r for r in self.store.list_runs() if r.status == "finished"),
                      key=lambda r: r.ended_at or 0.0, reverse=True)
        out = [(f"run {r.name} · {r.stage}/{r.kind} · {r.id[-4:]}", RUN_PREFIX + r.id) for r in runs]
        return out + [(f"preset {label}", PRESET_PREFIX + str(path.resolve())) for label, path in self.presets()]

    def close_inspector(self) -> None:
        """Stop the model inspector's process, if one was started."""
        if self.inspector is not None:
            self.inspector.close()

    def user_presets_dir(self) -> Path:
        return self.store.root / "presets"

    def presets(self) -> list[tuple[str, Path]]:
        """(label, path) of the shipped presets, then the user's (``<store>/presets/*.toml``)."""
        shipped = [(p.stem, p) for p in sorted(self.SHIPPED_PRESETS.glob("*.toml"))]
        return shipped + [(f"{p.stem} (yours)", p) for p in sorted(self.user_presets_dir().glob("*.toml"))]

    def default_preset(self) -> Path | None:
        """The preset Compose starts from: ``quickstart``, else the first."""
        presets = self.presets()
        return next((p for label, p in presets if label == "quickstart"), presets[0][1] if presets else None)

    def preset_config(self, path: Path) -> dict[str, Any]:
        """A preset's resolved config. A relative ``train.init_from = "preset:FILE"`` is
        made absolute, so the config still works when saved in another directory."""
        from engine.config import load_preset
        from engine.runs import PRESET_PREFIX

        raw = load_preset(path).to_dict()
        source = raw.get("train", {}).get("init_from")
        if isinstance(source, str) and source.startswith(PRESET_PREFIX):
            target = Path(source[len(PRESET_PREFIX):]).expanduser()
            if not target.is_absolute():
                raw["train"]["init_from"] = PRESET_PREFIX + str((Path(path).parent / target).resolve())
        return raw

    def save_preset(self, config: dict[str, Any], path: Path) -> Path:
        """Validate ``config`` and write it, resolved (every key), as a preset TOML file."""
        import tomli_w

        from engine.config import config_from_dict

        path = Path(path).expanduser()
        resolved = config_from_dict(config, source=str(path)).to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(resolved), encoding="utf-8")
        return path

    def queue_config(self, config: dict[str, Any], *, gpus: int = 1) -> list[RunRecord]:
        """Save ``config`` as ``<store>/presets/queued/<name>-<time>.toml`` and queue that
        preset (a pretraining it starts from is queued first)."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(config.get("run", {}).get("name", "run"))).strip("-.") or "run"
        stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = self.user_presets_dir() / "queued"
        path, n = folder / f"{stem}.toml", 1
        while path.exists():
            n += 1
            path = folder / f"{stem}-{n}.toml"
        self.save_preset(config, path)
        return self.queue_preset(path, gpus=gpus)

    # --- Monitor screen ---------------------------------------------------------

    def series_stamp(self, run_id: str) -> tuple[tuple[str, int, int, int], ...]:
        """A cheap fingerprint of the run's flushed metrics (segment names, inodes, sizes,
        mtimes): it changes whenever points are written, so a live view re-reads the
        whole series only then."""
        metrics = self.store.run_dir(run_id) / "metrics"
        try:
            with os.scandir(metrics) as entries:
                stats = [(e.name, e.stat()) for e in entries if e.name.endswith(".json") and not e.name.startswith(".")]
        except FileNotFoundError:
            return ()
        except OSError as exc:
            raise StoreError(f"Cannot list {metrics}: {exc.strerror or exc}.") from exc
        return tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats))
