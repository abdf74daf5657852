"""``ren export``: a finished run as files that load without ren (docs/export.md).

Each tower is written the way its own library reads it back: a Hugging Face tower with ``save_pretrained``,
beside the run's tokenizer (text) or an image processor that prepares images as ren's evaluation did (vision),
so ``transformers.AutoModel.from_pretrained(DIR/text)`` loads it; a timm tower with timm's own ``save_for_hf``
(``timm.create_model("local-dir:DIR/vision", pretrained=True)``). The whole model is the run's final weights
(``model.safetensors``, which ``train.init_from = "DIR"`` starts a finetune from) and a ``config.json`` with the
run's resolved config and what rebuilding the model needs (:func:`rebuild_config`); ``README.md`` is its model
card (:mod:`engine.model_card`). Everything is written into a staging folder beside ``--out`` and moved in at
the end, so a failed export leaves ``--out`` as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.config import RunConfig, config_from_dict
from engine.display import eval_split_of
from engine.errors import RenError
from engine.model_card import model_card
from engine.runs import EXPORT_CONFIG, EXPORT_FORMAT, FINAL_WEIGHTS
from engine.store import RunRecord, Store, follow_umask, json_text

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from engine.data.transforms import Normalization
    from engine.models import VLModel

EXPORT_VERSION = 1
"""The layout of ``config.json``; a reader refuses a newer one."""
CARD = "README.md"
TOWER_TABLES = ("text", "vision", "backbone")
"""The tower tables under ``[model]``; each exported tower's folder is named after its table."""


@dataclass(frozen=True)
class Export:
    """What :func:`export_run` wrote: the folder, the run, and the folder of each tower by its config key."""

    out: Path
    run_id: str
    towers: dict[str, str]


def export_run(store: Store, run_id: str, out: Path, *, force: bool = False, towers: bool = True) -> Export:
    """Export finished run ``run_id`` into ``out`` (new or empty, unless ``force``: then the files an export
    writes are replaced and anything else there is left alone). ``towers=False`` writes the whole model only."""
    record = store.get_run(run_id)
    where = f"run {record.id}"
    weights = final_weights(store, record, where)
    out = Path(out).expanduser()
    check_out(out, force)
    cfg = config_from_dict(record.config, source=where)
    folders = tower_folders(cfg, record.id) if towers else {}
    tokenizer = _tokenizer(cfg, where)
    answers = _answers(store, record, cfg, where)
    model = _load_model(record.config, weights, len(tokenizer), answers, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with _no_progress_bars():
            _write(staging, record, cfg, model, weights, tokenizer, answers, folders)
        follow_umask(staging)  # mkdtemp and safetensors write 0700/0600: others could not read the export
        _move_into(staging, out)
    except OSError as exc:
        raise RenError(f"{where}: cannot write its export into {out}: {exc.strerror or exc} ({exc.filename or out}). "
                       "Free disk space, or pick a writable --out.") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Export(out, record.id, folders)


def final_weights(store: Store, record: RunRecord, where: str) -> Path:
    """A finished run's final weights; a :class:`RenError` saying why there are none to export otherwise."""
    path = store.run_dir(record.id) / FINAL_WEIGHTS
    if record.status in ("created", "queued", "running"):
        raise RenError(f"{where} is {record.status}, not finished: its final weights ({path}) are written when "
                       f"training ends. Export it once it has finished (`ren show {record.id}` says how far it is).")
    if record.status != "finished":
        raise RenError(f"{where} is {record.status}, not finished, so it has no final weights to export (its "
                       "checkpoints are training state, not a model anyone chose). Finish it with `ren run --resume "
                       f"{record.id}`, then export it.")
    if not path.is_file():
        raise RenError(f"{where} finished, but its final weights are gone: {path} does not exist (moved or "
                       "deleted). Put the file back, or train the run's preset again.")
    return path


def check_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder with something in it (unless ``force``)."""
    if out.exists() and not out.is_dir():
        raise RenError(f"--out {out} is a file; give the folder to export into (it is created).")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise RenError(f"--out {out} exists and is not empty ({shown}). Export into a new or empty folder, or add "
                       "--force to write into this one (the files and folders an export writes are replaced, "
                       "anything else in it is left alone).")


def tower_folders(cfg: RunConfig, run_id: str) -> dict[str, str]:
    """The folder each tower of the run's model is exported into, by its config key (``model.text`` ->
    ``text``); a :class:`RenError` for a model whose tower is no standalone model."""
    model = cfg.model
    if model.kind != "one_tower":
        return {"model.text": "text", "model.vision": "vision"}
    if model.backbone.embeddings == "fresh":
        name = f" {model.backbone.name!r}" if model.backbone.name else ""
        raise RenError(
            f"run {run_id} cannot be exported with its towers: it is a one_tower model whose backbone "
            f"(model.backbone{name}) has embeddings = \"fresh\", so only the backbone's encoder layers are in it "
            "(both modalities are embedded by ren's own fresh embeddings), and that is no standalone model "
            "transformers could load. Export the whole model alone (model.safetensors, config.json, its tokenizer "
            f"and image processor, the model card) with `ren export {run_id} --out DIR --no-towers`; ren rebuilds "
            "it from there (docs/export.md).")
    return {"model.backbone": "backbone"}


def read_export(folder: Path | str) -> dict[str, Any]:
    """The ``config.json`` of an export, checked to be one this ren reads."""
    path = Path(folder).expanduser() / EXPORT_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RenError(f"{path} cannot be read ({exc}); give the folder `ren export` wrote.") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise RenError(f"{path} is not the config of a ren export (its \"format\" is not {EXPORT_FORMAT!r}); give "
                       "the folder `ren export` wrote.")
    if not isinstance(meta.get("version"), int) or meta["version"] > EXPORT_VERSION:
        raise RenError(f"{path} was written by a newer ren (export layout {meta.get('version')!r}; this ren reads "
                       f"up to {EXPORT_VERSION}); update ren to load it.")
    return meta


def rebuild_config(folder: Path | str) -> RunConfig:
    """The config that rebuilds an export's model here, offline: the run's own, with each tower named by a hub
    id or a local path built (with random weights, which ``model.safetensors`` then replaces) from the
    exported tower's own config.json where the export has the tower, and a timm tower from its architecture."""
    folder = Path(folder).expanduser().resolve()
    meta = read_export(folder)
    return buildable_config(meta["config"], {key: folder / name for key, name in meta["towers"].items()},
                            f"the export in {folder}")


def buildable_config(raw: dict[str, Any], folders: dict[str, Path], where: str) -> RunConfig:
    """``raw`` (a run's stored config) with every named tower switched to random weights of the same
    architecture, read from ``folders[key]`` where given: building it downloads and trains nothing, and the
    final weights are loaded over it."""
    raw = copy.deepcopy(raw)
    for table in TOWER_TABLES:
        tower = raw["model"].get(table)
        if not isinstance(tower, dict) or tower.get("source", "manual") == "manual":
            continue
        tower["source"] = "random"
        if tower.get("library") == "timm":
            tower["name"] = tower["name"].partition("@")[0]  # "arch@/path/weights.safetensors": the architecture
        elif f"model.{table}" in folders:
            tower["name"] = str(folders[f"model.{table}"])
    return config_from_dict(raw, source=where)


def image_processor(size: int, norm: Normalization) -> Any:
    """A transformers image processor that prepares an image as ren's evaluation does: the shorter side resized
    to ``size`` (bilinear), the centred ``size`` x ``size`` crop, ``x / 255`` normalised by the run's statistics."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              resample=Image.Resampling.BILINEAR, image_mean=list(norm.mean),
                              image_std=list(norm.std))


def _tokenizer(cfg: RunConfig, where: str) -> PreTrainedTokenizerBase:
    """The run's tokenizer, as training built it, truncating where the run's texts were truncated."""
    from engine.data.pipeline import build_tokenizer

    try:
        tokenizer = copy.deepcopy(build_tokenizer(cfg))  # the pipeline caches it: leave that one as it is
    except RenError as exc:
        raise RenError(f"{where}: its tokenizer cannot be rebuilt here, and the export needs it: {exc}") from None
    tokenizer.model_max_length = cfg.data.max_text_len
    return tokenizer


def _answers(store: Store, record: RunRecord, cfg: RunConfig, where: str) -> list[str] | None:
    """What the task head's outputs mean, by index (VQA's answers, a classification task's classes); None
    for a pretraining run and for RefCOCO (one output per candidate box)."""
    if cfg.task is None:
        return None
    from engine.evaluate import run_answers

    return run_answers(store, record, cfg, where)[0]


def _load_model(raw: dict[str, Any], weights: Path, vocab_size: int, answers: list[str] | None,
                where: str) -> VLModel:
    """The run's model with its final weights, every tensor of the file in place (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.models import build_model

    model = build_model(buildable_config(raw, {}, where), vocab_size=vocab_size,
                        num_answers=len(answers) if answers is not None else None)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, SafetensorError, OSError) as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) < 400 else detail[:400] + " ..."
        raise RenError(f"{where}: its final weights {weights} do not fit the model its stored config builds: "
                       f"{detail}") from None
    return model.eval()


def _write(staging: Path, record: RunRecord, cfg: RunConfig, model: VLModel, weights: Path,
           tokenizer: PreTrainedTokenizerBase, answers: list[str] | None, folders: dict[str, str]) -> None:
    """Every file of the export, into ``staging``."""
    from engine.data.pipeline import image_size_of
    from engine.data.transforms import resolve_normalization

    size, norm = image_size_of(cfg), resolve_normalization(cfg)
    processor = image_processor(size, norm)
    shutil.copyfile(weights, staging / FINAL_WEIGHTS)
    tokenizer.save_pretrained(staging)
    processor.save_pretrained(staging)
    for key, folder in folders.items():
        module = _tower_module(model, key)
        if key == "model.vision" and cfg.model.vision.library == "timm":
            _save_timm(module, staging / folder, size, norm, record.id)
            continue
        module.save_pretrained(staging / folder)
        reads_text = key == "model.text" or (key == "model.backbone" and model.encoder.modality == "text")
        (tokenizer if reads_text else processor).save_pretrained(staging / folder)
    meta = _export_config(record, len(tokenizer), answers, folders)
    (staging / EXPORT_CONFIG).write_text(json_text(meta, staging / EXPORT_CONFIG, indent=2) + "\n", encoding="utf-8")
    (staging / CARD).write_text(model_card(record, cfg, folders), encoding="utf-8")


def _tower_module(model: VLModel, key: str) -> nn.Module:
    """The Hugging Face (or timm) model inside the tower ``key``."""
    table = key.removeprefix("model.")
    encoder: Any = model.encoder
    return encoder.backbone if table == "backbone" else getattr(encoder, table).model


def _save_timm(module: nn.Module, folder: Path, size: int, norm: Normalization, run_id: str) -> None:
    """A timm tower as timm's own hub helpers write one: ``config.json`` (its architecture, the arguments that
    rebuild it, the run's input size and image statistics) and ``model.safetensors``."""
    from timm.models import save_for_hf

    data = {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "mean": tuple(norm.mean), "std": tuple(norm.std)}
    try:
        save_for_hf(module, str(folder), safe_serialization=True, data_config=data)
    except ValueError as exc:
        raise RenError(f"run {run_id} cannot be exported with its towers: timm cannot record how to rebuild its "
                       f"vision tower (model.vision, {type(module).__name__}): {exc} Export the whole model alone "
                       f"with `ren export {run_id} --out DIR --no-towers`.") from None


def _export_config(record: RunRecord, vocab_size: int, answers: list[str] | None,
                   folders: dict[str, str]) -> dict[str, Any]:
    """``config.json``: the run's resolved config, and what building its model takes besides (the
    vocabulary size, the size of the task head, the exported towers' folders); what the task head's outputs
    mean, and the run's scores, for readers."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "ren_version": __version__,
        "run": {"id": record.id, "name": record.name, "stage": record.stage, "kind": record.kind,
                "step": record.step, "ended_at": record.ended_at, "init_from": record.init_from,
                "preset_path": record.preset_path},
        "vocab_size": vocab_size,
        "num_answers": len(answers) if answers is not None else None,
        "answers": answers,
        "towers": folders,
        "scores": {"eval_split": eval_split_of(record), "best": record.best_scores, "final": record.final_scores,
                   "test": record.test_scores},
        "config": record.config,
    }


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar per file it saves: noise among what ``ren export`` says."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _move_into(staging: Path, out: Path) -> None:
    """Move the staged export into ``out``: renamed whole when ``out`` does not exist, else entry by entry,
    each replacing the file or folder of its name."""
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
