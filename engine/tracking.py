"""Experiment trackers (TensorBoard, MLflow, W&B) fed through accelerate's tracker API.

The store is the source of truth; a tracker gets a copy. A run built with ``[tracking] log_with`` hands
:func:`build_trackers`'s trackers to its ``Accelerator(log_with=...)``, calls ``init_trackers`` with the
resolved config as hyper-parameters, and every point its metrics writer records also goes to
``accelerator.log`` (:class:`TrackedWriter`). ``ren sync`` replays a stored run the same way.

Each tracker is wrapped in :class:`Guarded`: a tracker that is not installed, cannot reach its server or
fails later gives one warning and is off for the rest of the run, which goes on. MLflow is given short
HTTP retries and asynchronous metric logging, so an unreachable or slow server never holds a step up.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from engine.config import TrackingConfig

TRACKERS_FILE = "trackers.json"  # in the run's folder: the tracker-side ids a resume continues
EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
CONNECT_TIMEOUT_S = 3.0
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}  # ren's end -> MLflow's
# ren's own tags on an MLflow run (and W&B config): how the lab view finds a run's box and store
TAG_RUN_ID, TAG_HOST, TAG_STORE, TAG_STAGE, TAG_KIND = "ren.run_id", "ren.host", "ren.store", "ren.stage", "ren.kind"


@dataclass(frozen=True)
class RunIdentity:
    """What a tracker is told about the run it mirrors, so a shared view can link back to it."""

    run_id: str
    name: str
    host: str
    store: str  # the run's folder in its store, on its host
    stage: str
    kind: str
    tags: tuple[str, ...] = ()
    notes: str = ""

    def hparams(self, config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
        """What a tracker stores as the run's hyper-parameters: the config (:func:`hparams`), id and host."""
        return {**hparams(config), TAG_RUN_ID: self.run_id, TAG_HOST: self.host}

    def tags_dict(self) -> dict[str, str]:
        return {TAG_RUN_ID: self.run_id, TAG_HOST: self.host, TAG_STORE: self.store, TAG_STAGE: self.stage,
                TAG_KIND: self.kind, **{f"ren.tag.{tag}": "1" for tag in self.tags}}


def hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The resolved config flattened to dotted keys with scalar values (what every tracker takes as
    hyper-parameters): lists, and tables inside lists, as JSON text."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # lists, None
            flat[prefix] = json.dumps(value)

    walk("", config)
    return flat


class Guarded(GeneralTracker):
    """One tracker that can neither fail nor stop a run: its first error is reported once through
    ``warn`` and the tracker is off from then on."""

    requires_logging_directory = False

    def __init__(self, inner: GeneralTracker, warn: Callable[[str], None]) -> None:
        self.inner, self.warn, self.off = inner, warn, False
        super().__init__()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def tracker(self) -> Any:
        return None if self.off else self.inner.tracker

    def start(self) -> None:
        self._call("start")

    def store_init_configuration(self, values: dict) -> None:
        self._call("store_init_configuration", values)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._call("log", values, step=step, **kwargs)

    def finish(self) -> None:
        self._call("finish")

    def finish_as(self, status: str) -> None:
        """Finish, telling a tracker that records how a run ended (MLflow) that it ended ``status`` (ren's:
        finished, failed, cancelled)."""
        if hasattr(self.inner, "finish_as"):
            self._call("finish_as", status)
        else:
            self._call("finish")

    def _call(self, what: str, *args: Any, **kwargs: Any) -> None:
        if self.off:
            return
        try:
            getattr(self.inner, what)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of a tracker must leave the run alone
            self.off = True
            self.warn(_failure_text(self.inner.name, what, exc))


def _failure_text(name: str, what: str, exc: Exception) -> str:
    if isinstance(exc, ImportError):
        return (f"tracker {name} is off: its library is not installed ({exc}); `pip install 'ren[{EXTRA[name]}]'` "
                "adds it. The run goes on; the store keeps every metric.")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"tracker {name} is off: its {what} failed ({type(exc).__name__}: {reason[:300]}). The run goes on "
            "without it; the store keeps every metric (`ren sync` can replay the run into it later).")


class _MLflow(MLflowTracker):
    """accelerate's MLflow tracker pointed at ``tracking_uri``, refusing at once a server that does not
    answer, and remembering the MLflow run id (for a resume)."""

    def __init__(self, tracking_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tracking_uri = tracking_uri

    def start(self) -> None:
        import mlflow

        check_reachable(self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        super().start()
        self.run_id = self.active_run.info.run_id
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        """Numbers as metrics of this tracker's run, by run id (MLflow's active run is per thread, and
        TrackedWriter logs from a thread of its own) through the client, which queues them when asynchronous
        logging is on; ``mlflow.log_metrics(run_id=...)`` would wait for the server on every call."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step or 0) for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self) -> None:
        self.finish_as("finished")

    def finish_as(self, status: str) -> None:
        import mlflow

        mlflow.flush_async_logging()
        mlflow.end_run(status=MLFLOW_STATUS.get(status, "FINISHED"))


def check_reachable(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ConnectionError naming ``uri`` when it is an HTTP server that does not accept a connection within
    ``timeout_s`` (a local store always is)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {uri}: {exc}") from None


def mlflow_uri(cfg: TrackingConfig, store_root: Path) -> str:
    """The MLflow tracking URI a run uses: its preset's, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    file in the store."""
    return (cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(store_root / 'mlflow.db').resolve()}")


def _quiet_mlflow_defaults() -> None:
    """Bound how long MLflow may hold a step: few HTTP retries, a short timeout, metrics sent in the
    background. A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "true")


def build_trackers(cfg: TrackingConfig, identity: RunIdentity, run_dir: Path, store_root: Path,
                   warn: Callable[[str], None], *, names: Iterable[str] | None = None,
                   resume_step: int | None = None) -> list[Guarded]:
    """Guarded trackers for ``names`` (default: ``cfg.log_with``). ``resume_step``: the run resumes
    from the checkpoint at that step, so the trackers continue the runs they started (TensorBoard drops
    what it logged after that step)."""
    known = read_tracker_ids(run_dir) if resume_step is not None else {}
    built: list[Guarded] = []
    for name in names if names is not None else cfg.log_with:
        if name == "tensorboard":
            logdir = Path(cfg.tensorboard.logging_dir) if cfg.tensorboard.logging_dir else store_root / "tensorboard"
            extra = {"purge_step": resume_step + 1} if resume_step is not None else {}
            inner: GeneralTracker = TensorBoardTracker(identity.run_id, logdir, **extra)
        elif name == "mlflow":
            _quiet_mlflow_defaults()
            inner = _MLflow(mlflow_uri(cfg, store_root), experiment_name=cfg.mlflow.experiment or cfg.project,
                            run_id=known.get("mlflow"), tags=identity.tags_dict(), run_name=identity.name,
                            description=identity.notes or None)
        elif name == "wandb":
            inner = WandBTracker(cfg.project, id=identity.run_id, resume="allow", name=identity.name,
                                 dir=str(run_dir), mode=cfg.wandb.mode, entity=cfg.wandb.entity or None,
                                 tags=list(identity.tags), notes=identity.notes or None,
                                 config={TAG_RUN_ID: identity.run_id, TAG_HOST: identity.host,
                                         TAG_STORE: identity.store})
        else:
            raise ValueError(f"unknown tracker {name!r}")
        built.append(Guarded(inner, warn))
    return built


def read_tracker_ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def save_tracker_ids(run_dir: Path, trackers: Iterable[Guarded]) -> None:
    """Remember the tracker-side run ids (MLflow's), so a resume logs into the same tracker run."""
    ids = {t.name: t.inner.run_id for t in trackers if not t.off and getattr(t.inner, "run_id", None)}
    if ids:
        (run_dir / TRACKERS_FILE).write_text(json.dumps({**read_tracker_ids(run_dir), **ids}))


class TrackedWriter:
    """A run's metrics writer whose every point also goes to the accelerator's trackers.

    The store's writer is called on the training thread; the trackers are fed by one thread of their own
    through a queue, in order, so a tracker's work (protobuf encoding, an HTTP request, a W&B record) is not
    on the step's path: a log call costs the training loop a queue put. :meth:`close` waits up to
    ``close_timeout_s`` for the queue to drain, then finishes the trackers."""

    _DONE = object()

    def __init__(self, writer: Any, accelerator: Any, *, close_timeout_s: float = 120.0,
                 warn: Callable[[str], None] = print) -> None:
        self.writer, self.accelerator = writer, accelerator
        self.close_timeout_s, self.warn = close_timeout_s, warn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._feed, name="ren-trackers", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            values, step = item
            self.accelerator.log(values, step=step)  # each tracker is Guarded: it cannot raise

    def log(self, step: int, **values: float) -> None:
        self.writer.log(step, **values)
        self._queue.put((values, step))

    def summary(self, step: int, values: Mapping[str, float]) -> None:
        """Scores the store keeps on the run record rather than as points (the test split's)."""
        if values:
            self._queue.put((dict(values), step))

    def flush(self) -> None:
        self.writer.flush()

    def rewind(self, step: int) -> None:
        self.writer.rewind(step)

    def close(self, status: str = "finished") -> None:
        """Close the store's writer, then let the trackers take the last points and finish them, saying how
        the run ended (``status``: finished, failed, cancelled)."""
        try:
            self.writer.close()
        finally:
            self._queue.put(self._DONE)
            self._thread.join(self.close_timeout_s)
            if self._thread.is_alive():
                self.warn(f"trackers: gave up waiting after {self.close_timeout_s:g} s for them to take the last "
                          "points (a slow tracker server?); the store has every metric, and `ren sync RUN --to "
                          "TRACKER` replays them.")
            else:  # not accelerator.end_training(): that also ends the process group, which the run still uses
                for tracker in self.accelerator.trackers:
                    tracker.finish_as(status) if isinstance(tracker, Guarded) else tracker.finish()


def replay(store: Any, run_id: str, to: str, warn: Callable[[str], None], *, tracking_uri: str = "",
           logging_dir: str = "") -> Guarded | None:
    """Replay a stored run into tracker ``to`` (``ren sync``): its config as hyper-parameters, every
    metric point, its test scores. TensorBoard replaces what it held for the run; MLflow skips a run it
    already holds (None then). The tracker is returned ``off`` when it failed (``warn`` said why)."""
    from engine.config import config_from_dict

    record = store.get_run(run_id)
    cfg = config_from_dict(record.config).tracking
    cfg = cfg.model_copy(update={
        "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": tracking_uri or cfg.mlflow.tracking_uri}),
        "tensorboard": cfg.tensorboard.model_copy(update={"logging_dir": logging_dir or cfg.tensorboard.logging_dir}),
    })
    run_dir = store.run_dir(record.id)
    if to == "mlflow" and _in_mlflow(mlflow_uri(cfg, store.root), cfg.mlflow.experiment or cfg.project, record.id):
        return None
    identity = RunIdentity(run_id=record.id, name=record.name, host=record.host or "", store=str(run_dir.resolve()),
                           stage=record.stage, kind=record.kind, tags=tuple(record.tags), notes=record.notes)
    # TensorBoard: a purge from step 1 on, so a replay replaces what an earlier replay or the live run wrote
    (tracker,) = build_trackers(cfg, identity, run_dir, store.root, warn, names=[to],
                                resume_step=0 if to == "tensorboard" else None)
    tracker.start()
    tracker.store_init_configuration(identity.hparams(record.config))
    for step, values in _points_by_step(store.read_metrics(record.id)):
        tracker.log(values, step=step)
    if record.test_scores:
        tracker.log(dict(record.test_scores), step=record.step)
    tracker.finish()
    return tracker


def _points_by_step(points: Iterable[Mapping[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Stored points merged per step, in step order (trackers such as W&B want each step once)."""
    merged: dict[int, dict[str, float]] = {}
    for point in points:
        values = {k: v for k, v in point.items() if k not in ("step", "time") and v is not None}
        merged.setdefault(point["step"], {}).update(values)
    return sorted(merged.items())


def _in_mlflow(uri: str, experiment: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return bool(found and client.search_runs([found.experiment_id], f"tags.`{TAG_RUN_ID}` = '{run_id}'",
                                             max_results=1))


@dataclass(frozen=True)
class LabRun:
    """A ren run as an MLflow server holds it (``ren runs --mlflow``)."""

    run_id: str
    name: str
    host: str
    store: str
    stage: str
    kind: str
    experiment: str
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    start_time: float | None  # Unix seconds
    metrics: dict[str, float]


def lab_runs(uri: str, limit: int = 1000) -> list[LabRun]:
    """Every run with a ren run id on the MLflow server at ``uri``, newest first, from every experiment."""
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    found = client.search_runs(list(experiments), f"tags.`{TAG_RUN_ID}` != ''", max_results=limit,
                               order_by=["attributes.start_time DESC"])
    return [LabRun(run_id=r.data.tags[TAG_RUN_ID], name=r.info.run_name or "", host=r.data.tags.get(TAG_HOST, ""),
                   store=r.data.tags.get(TAG_STORE, ""), stage=r.data.tags.get(TAG_STAGE, ""),
                   kind=r.data.tags.get(TAG_KIND, ""), experiment=experiments.get(r.info.experiment_id, ""),
                   status=r.info.status, start_time=r.info.start_time / 1000 if r.info.start_time else None,
                   metrics=dict(r.data.metrics)) for r in found]
