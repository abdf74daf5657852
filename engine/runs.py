"""Turning a preset into stored runs: creation, and pretraining dependencies.

A finetuning preset may name its pretraining by preset instead of by run id:
``train.init_from = "preset:easyvqa_pretrain.toml"``. Before the finetuning run
is created, :func:`resolve_init_from` looks in the store for a finished run of
exactly that preset's resolved config and reuses it; if there is none, it
trains one first. The finetuning run then stores ``init_from = "run:<id>"``,
so its config says exactly which weights it started from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import tomli_w

from engine.config import RunConfig, config_from_dict, load_preset
from engine.errors import ConfigError, RenError, RunNotFound
from engine.store import RunRecord, Store

CHECKPOINTS, LATEST = "checkpoints", "latest"  # as engine.train lays them out
PRESET_PREFIX = "preset:"
RUN_PREFIX = "run:"
FINAL_WEIGHTS = "model.safetensors"  # a run's final weights; accelerate names a checkpoint's weights alike
EXPORT_CONFIG, EXPORT_FORMAT = "config.json", "ren-export"  # `ren export`'s config beside FINAL_WEIGHTS, its "format"
# keys that fix the shapes of a model's weights (what may differ: dropout, image_size, checkpointing, source)
_SHAPE_KEYS = ("library", "modality", "hidden_size", "layers", "heads", "mlp_ratio", "patch_size", "projection_dim",
               "image_embedding", "embeddings")

Trainer = Callable[[RunConfig, str], None]
Provider = Callable[[RunConfig, Path], str]  # (pretraining config, its preset) -> the run id to start from


def create_run(store: Store, cfg: RunConfig, preset_path: str | None) -> RunRecord:
    """A new run in the store, with its resolved config also written as config.toml."""
    record = store.create_run(
        name=cfg.run.name, stage=cfg.stage, kind=cfg.model.kind, config=cfg.to_dict(),
        preset_path=preset_path, tags=cfg.run.tags, notes=cfg.run.notes,
        max_steps=cfg.train.max_steps, init_from=cfg.train.init_from,
    )
    (store.run_dir(record.id) / "config.toml").write_text(tomli_w.dumps(cfg.to_dict()))
    return record


def stored_config(store: Store, run_id: str) -> tuple[RunRecord, RunConfig]:
    """A stored run and its config, to continue it; refuses a run that is running, queued or finished."""
    record = store.get_run(run_id)
    if record.status == "running":
        if record.pid is None and record.runner_pid is None:
            where = "the queue's worker is starting it"
        else:
            where = f"pid {record.pid}" if record.pid else f"its queue runner, pid {record.runner_pid}"
        raise RenError(f"run {record.id} is still running ({where}); stop it before continuing it (`ren queue "
                       f"cancel {record.id}` for a run of the queue, Ctrl-C for one in a terminal).")
    if record.status == "queued":
        raise RenError(f"run {record.id} is queued: the queue's worker starts it. To train it here instead, take it "
                       f"out of the queue first (`ren queue cancel {record.id}`).")
    if record.status == "finished":
        raise RenError(f"run {record.id} is finished (step {record.step} of {record.max_steps}); there is nothing to "
                       "resume, and resuming would overwrite its final weights. To train further, start a new run "
                       f"from its weights: `ren run PRESET --set train.init_from='\"run:{record.id}\"'` with a "
                       "larger train.max_steps.")
    return record, config_from_dict(record.config, source=f"run {record.id}")


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's last complete checkpoint (what a resume continues from; the checkpoint
    ``engine.train.latest_checkpoint`` picks), or None when it has none. Reads no tensors, imports no torch."""
    pointer = run_dir / CHECKPOINTS / LATEST
    try:
        name = pointer.read_text().strip()
        state = json.loads((run_dir / CHECKPOINTS / name / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    step = state.get("step") if isinstance(state, dict) and name else None
    return step if isinstance(step, int) else None


def resume_point(store: Store, run_id: str) -> str:
    """Where a resume of the run continues, in words: ``from step N`` (its last complete checkpoint; the
    record's step is updated every few seconds and may be behind it, or ahead of it after a kill) or
    ``from the start (it saved no checkpoint)``."""
    step = checkpoint_step(store.run_dir(run_id))
    return "from the start (it saved no checkpoint)" if step is None else f"from step {step}"


def retry_outcome(store: Store, run_id: str) -> str:
    """What queueing the run again does, in words, from its checkpoints: ``it resumes from step N, its last
    checkpoint``, or ``it saved no checkpoint, so it starts over from step 0`` (a run cancelled while still
    queued, or one that failed before its first checkpoint). ``ren queue retry`` and the TUI's Queue say this."""
    step = checkpoint_step(store.run_dir(run_id))
    return ("it saved no checkpoint, so it starts over from step 0" if step is None
            else f"it resumes from step {step}, its last checkpoint")


def find_finished(store: Store, cfg: RunConfig) -> RunRecord | None:
    """The newest finished run whose stored config equals ``cfg``."""
    for record in store.list_runs():
        if record.status != "finished":
            continue
        try:
            if config_from_dict(record.config) == cfg:
                return record
        except ConfigError:  # a run stored by an older, incompatible version
            continue
    return None


def trained_now(store: Store, train: Trainer, say: Callable[[str], None] = lambda _: None) -> Provider:
    """Provide a pretraining by reusing a finished run of its config or training it now."""

    def provide(upstream: RunConfig, path: Path) -> str:
        done = find_finished(store, upstream)
        if done is not None:
            say(f"init_from: reusing finished run {done.id} of {path}")
            return done.id
        record = create_run(store, upstream, str(path))
        say(f"init_from: training {path} first, as run {record.id}")
        train(upstream, record.id)
        done = store.get_run(record.id)
        if done.status != "finished":
            raise RenError(
                f"train.init_from: the run {done.id} of {path} ended {done.status}; "
                f"resume it with `ren run --resume {done.id}`, then run this preset again."
            )
        return done.id

    return provide


def resolve_init_from(cfg: RunConfig, preset_path: Path, store: Store, provide: Provider,
                      chain: tuple[Path, ...] = ()) -> RunConfig:
    """Replace ``init_from = "preset:FILE"`` by ``"run:<id>"`` of the run that ``provide``
    gives for that preset (found, trained or queued). ``FILE`` is relative to the
    directory of ``preset_path``; a preset that itself starts from a preset is resolved first."""
    source = cfg.train.init_from
    if not source or not source.startswith(PRESET_PREFIX):
        return cfg
    path = Path(source[len(PRESET_PREFIX):]).expanduser()
    if not path.is_absolute():
        path = preset_path.parent / path
    if path.resolve() in chain or path.resolve() == preset_path.resolve():
        raise ConfigError(f"train.init_from = {source!r}: the presets start from each other in a loop.")
    upstream = load_preset(path)
    upstream = resolve_init_from(upstream, path, store, provide, (*chain, preset_path.resolve()))
    raw = cfg.to_dict()
    raw["train"]["init_from"] = f"run:{provide(upstream, path)}"
    return config_from_dict(raw)


def check_init_from(store: Store, cfg: RunConfig) -> None:
    """Refuse, before a run is created, a ``train.init_from`` that cannot give this model weights: an
    unknown run, a run of another architecture, a missing file, or one that is not a safetensors file.
    ``preset:`` sources are resolved by :func:`resolve_init_from` first."""
    source = cfg.train.init_from
    if not source or source.startswith(PRESET_PREFIX):
        return
    key = f"train.init_from = {source!r}"
    if source.startswith(RUN_PREFIX):
        try:
            record = store.get_run(source[len(RUN_PREFIX):])
        except RunNotFound as exc:
            raise ConfigError(f"{key}: {exc}", key="train.init_from") from None
        differences = _shape_differences(record.config.get("model", {}), cfg.to_dict()["model"])
        if differences:
            raise ConfigError(
                f"{key}: run {record.id} is another architecture ({'; '.join(differences)}), so its weights do not "
                "fit this model. Start from a run of the same model, or remove init_from.", key="train.init_from")
        path = store.run_dir(record.id) / FINAL_WEIGHTS
        if path.exists():
            _check_weights_file(path, key)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        _check_export(path, cfg, key)
        path = path / FINAL_WEIGHTS
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist; give a run (\"run:<id>\"), a checkpoint directory or a "
                          ".safetensors file.", key="train.init_from")
    _check_weights_file(path, key)


def _check_export(directory: Path, cfg: RunConfig, key: str) -> None:
    """Refuse an export (``ren export``) of another architecture, as a run of one is refused; a directory
    without an export's config (a checkpoint) is left to the weights check."""
    try:
        meta = json.loads((directory / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        return
    theirs = meta.get("config", {}).get("model", {})
    differences = _shape_differences(theirs if isinstance(theirs, dict) else {}, cfg.to_dict()["model"])
    if differences:
        run = meta.get("run", {}).get("id", "?")
        raise ConfigError(
            f"{key}: the export of run {run} in {directory} is another architecture ({'; '.join(differences)}), so "
            "its weights do not fit this model. Start from an export of the same model, or remove init_from.",
            key="train.init_from")


def _shape_differences(theirs: dict, ours: dict) -> list[str]:
    """``"model.fusion.hidden_size 32 there, 64 here"`` for each shape-setting key the two model tables set
    differently (keys only one of them sets, such as sizes of a pretrained tower, are not compared)."""
    if theirs.get("kind") != ours.get("kind"):
        return [f"model.kind {theirs.get('kind')!r} there, {ours.get('kind')!r} here"]
    out = []
    for section in sorted(set(theirs) & set(ours)):
        a, b = theirs[section], ours[section]
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"model.{section}.{k} {a[k]!r} there, {b[k]!r} here"
                    for k in _SHAPE_KEYS if k in a and k in b and a[k] != b[k]]
    return out


def _check_weights_file(path: Path, key: str) -> None:
    """A :class:`RenError` unless ``path`` is a safetensors file whose header reads and covers the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as exc:
        raise RenError(f"{key}: {path} is not a readable safetensors file ({exc}); it is damaged or was not "
                       "written by ren (only .safetensors weights are loaded, never pickles).") from None
