"""Studies: one TOML file that expands into pretraining and finetuning runs.

A study names a base pretraining preset, the variants to compare (``[variants]`` or a grid of
``[axes.<name>]``), the seeds and the ``[[finetune]]`` tasks; every variant x seed is one pretraining run,
followed by one finetuning run per task that starts from it. :func:`load_study` validates every planned
config before anything is queued. The file format and rules: docs/studies-and-reports.md, "Studies".

This module imports neither torch nor transformers (the TUI uses it).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.config import RunConfig, _read_with_extends, config_from_dict, deep_merge, describe_error, load_preset
from engine.dotted import get_in, set_in
from engine.errors import ConfigError, RenError
from engine.jobs import api as Q
from engine.recipes import is_ren_model
from engine.runs import checkpoint_step, create_run
from engine.store import RunRecord, Store

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
_NAME_HINT = "letters, digits and _ . + - (starting with a letter or digit)"
# Keys the study sets on every run itself.
_STUDY_KEYS = {"run.seed": "[study] seeds", "run.name": "the study (<study>/<variant>/s<seed>)"}
# engine.tasks.METRICS (torch-bound): the score each task's final evaluation records.
_TASK_METRIC = {"vqa": "vqa_score", "snli_ve": "accuracy", "nlvr2": "accuracy", "refcoco": "accuracy"}
_RERUN = ("failed", "cancelled", "crashed")

Stage = Literal["pretrain", "finetune"]
Action = Literal["new", "keep", "queue", "retry", "changed"]


# ----------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _name(name: str) -> str:
    """Study and [[finetune]] names (their rule and its wording: the variant names follow the same)."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"names may use {_NAME_HINT}")
    return name


def _overrides(table: Any) -> Any:
    """A variant, or a level of an axis: the error's wording goes on from the value (``variants.x = 3 must be ...``)."""
    if not isinstance(table, dict):
        raise PydanticCustomError("overrides_table", 'must be a table of preset overrides, e.g. '
                                  '{ "freeze.groups" = ["vision"] } (or {} for the preset as it is)')
    return table


def _levels(table: Any) -> Any:
    if not isinstance(table, dict):
        raise PydanticCustomError("levels_table", "must be a table of levels, each a table of preset overrides, "
                                  'e.g. { none = {}, vision = { "freeze.groups" = ["vision"] } }')
    return table


_Name = Annotated[str, AfterValidator(_name)]
_Overrides = Annotated[dict[str, Any], BeforeValidator(_overrides)]


class _StudySection(_Strict):
    name: _Name = Field(max_length=40)
    description: str = ""
    pretrain: str
    baseline: str | None = None
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    overrides: dict[str, Any] = Field({}, alias="set")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in seeds):
            raise ValueError("seeds must be whole numbers >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds lists a seed twice")
        return seeds


class _FinetuneSection(_Strict):
    name: _Name = Field(max_length=24)
    preset: str
    overrides: dict[str, Any] = Field({}, alias="set")
    inherit: tuple[str, ...] = ("model",)


class _StudyFile(_Strict):
    study: _StudySection
    variants: dict[str, _Overrides] | None = None
    axes: dict[str, Annotated[dict[str, _Overrides], BeforeValidator(_levels)]] | None = None
    finetune: tuple[_FinetuneSection, ...] = ()

    @model_validator(mode="after")
    def _one_axis_form(self) -> "_StudyFile":
        if (self.variants is None) == (self.axes is None):
            raise ValueError("give the variants either as [variants] (one axis of named overrides) or as "
                             "[axes.<name>] tables (a grid); " + ("both are set" if self.variants is not None
                                                                 else "neither is set"))
        names = [("variants", n) for n in self.variants or {}]
        for axis, levels in (self.axes or {}).items():
            names.append(("axes", axis))
            names += [(f"axes.{axis}", level) for level in levels]
            if not levels:
                raise ValueError(f"axes.{axis} has no levels; give at least one, e.g. none = {{}}")
        if self.variants == {}:
            raise ValueError("[variants] is empty; give at least one, e.g. none = {}")
        if self.axes == {}:
            raise ValueError("[axes] is empty; give at least one [axes.<name>] table")
        for where, name in names:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"{where}.{name}: names may use {_NAME_HINT}")
        tasks = [f.name for f in self.finetune]
        twice = sorted({n for n in tasks if tasks.count(n) > 1})
        if twice:
            raise ValueError(f"[[finetune]] names must differ; {', '.join(twice)} appears more than once")
        return self


@dataclass(frozen=True)
class Finetune:
    """One ``[[finetune]]`` entry: a task run after every pretraining run."""

    name: str
    preset: Path
    overrides: dict[str, Any]
    """Nested patch merged over the preset."""
    inherit: tuple[str, ...]
    """Dotted keys copied from the variant's pretraining config (default: ``model``)."""


@dataclass(frozen=True)
class PlannedRun:
    """One run a study asks for, with its validated config."""

    variant: str
    seed: int
    stage: Stage
    task: str | None
    name: str
    preset: Path
    """The preset the config was built from."""
    overrides: dict[str, Any]
    """Dotted key -> value applied over the preset (the study's and the variant's, or the finetune's)."""
    inherited: tuple[str, ...]
    """Finetunes: the keys taken from the pretraining config."""
    config: RunConfig
    """Finetunes: ``train.init_from`` is unset until the pretraining run exists (see :meth:`resolved`)."""

    @property
    def key(self) -> tuple[str, int, str, str | None]:
        return (self.variant, self.seed, self.stage, self.task)

    @property
    def pretrain_key(self) -> tuple[str, int, str, None]:
        """The key of the pretraining run a finetune starts from (its own key for a pretraining)."""
        return (self.variant, self.seed, "pretrain", None)

    @property
    def metric(self) -> str | None:
        """The score a finetune's final evaluation records (None for a pretraining)."""
        return _TASK_METRIC.get(self.config.task.name) if self.config.task else None

    def resolved(self, pretrain_id: str | None) -> RunConfig:
        """The config to store: a finetune starts from run ``pretrain_id``."""
        if self.stage == "pretrain":
            return self.config
        raw = self.config.to_dict()
        raw["train"]["init_from"] = f"run:{pretrain_id}"
        return config_from_dict(raw, source=self.name)


@dataclass(frozen=True)
class Study:
    """A loaded, validated study file."""

    name: str
    description: str
    path: Path
    """Absolute path of the study file."""
    pretrain: Path
    baseline: str
    seeds: tuple[int, ...]
    overrides: dict[str, Any]
    """``[study] set``: a nested patch merged over the pretraining preset for every variant."""
    variants: dict[str, dict[str, Any]]
    """Variant name -> nested patch, in file order (a grid: the product, named ``a=x,b=y``)."""
    finetunes: tuple[Finetune, ...]

    def expand(self) -> list[PlannedRun]:
        """Every run of the study, validated: per variant and seed the pretraining, then its
        finetunes. A bad override raises ConfigError naming the variant (or task) and the key."""
        base = _read_preset(self.pretrain, self.path, "[study] pretrain")
        finetune_bases = {f.name: _read_preset(f.preset, self.path, f"[[finetune]] {f.name!r} preset")
                          for f in self.finetunes}
        planned = []
        for variant, patch in self.variants.items():
            for seed in self.seeds:
                pre = self._pretraining(base, variant, patch, seed)
                planned.append(pre)
                planned += [self._finetuning(finetune_bases[f.name], f, pre) for f in self.finetunes]
        return planned

    def _pretraining(self, base: dict[str, Any], variant: str, patch: dict[str, Any], seed: int) -> PlannedRun:
        name = f"{self.name}/{variant}/s{seed}"
        raw = deep_merge(deep_merge(copy.deepcopy(base), self.overrides), patch)
        raw["run"] = {**raw.get("run", {}), "seed": seed, "name": name,
                      "tags": _tags(raw.get("run", {}).get("tags", ()), self.name)}
        where = f"{self.path}: variant {variant!r} ({self.pretrain.name} with the variant's overrides)"
        cfg = config_from_dict(raw, source=where)
        if cfg.stage != "pretrain":
            raise ConfigError(f"{self.path}: [study] pretrain = {self.pretrain.name!r} is a finetuning preset "
                              "([task]); name a pretraining preset ([objectives]) and list tasks in [[finetune]].",
                              key="study.pretrain")
        if (cfg.train.init_from or "").startswith("preset:"):
            raise ConfigError(f"{self.path}: variant {variant!r}: train.init_from = {cfg.train.init_from!r}; a "
                              "study's pretraining may start from a run (\"run:<id>\") or a checkpoint directory, "
                              "not from another preset.", key="train.init_from")
        overrides = {**flatten(self.overrides), **flatten(patch)}
        return PlannedRun(variant, seed, "pretrain", None, name, self.pretrain, overrides, (), cfg)

    def _finetuning(self, base: dict[str, Any], finetune: Finetune, pre: PlannedRun) -> PlannedRun:
        name = f"{pre.name}/{finetune.name}"
        raw = deep_merge(copy.deepcopy(base), finetune.overrides)
        pretrain_raw = pre.config.to_dict()
        for key in finetune.inherit:
            value = get_in(pretrain_raw, key, _MISSING)
            if value is _MISSING:
                raise ConfigError(f"{self.path}: [[finetune]] {finetune.name!r}: inherit names {key!r}, which the "
                                  f"pretraining config of variant {pre.variant!r} does not set; inherit takes "
                                  "dotted keys such as \"model\" or \"data.tokenizer\".", key=key)
            set_in(raw, key, copy.deepcopy(value))
        raw["run"] = {**raw.get("run", {}), "seed": pre.seed, "name": name,
                      "tags": _tags(raw.get("run", {}).get("tags", ()), self.name)}
        raw.setdefault("train", {})["init_from"] = None
        where = (f"{self.path}: [[finetune]] {finetune.name!r} of variant {pre.variant!r} "
                 f"({finetune.preset.name} with the finetune's overrides)")
        cfg = config_from_dict(raw, source=where)
        if cfg.stage != "finetune":
            raise ConfigError(f"{self.path}: [[finetune]] {finetune.name!r}: {finetune.preset.name} is a "
                              "pretraining preset; name a finetuning preset ([task]).", key="finetune.preset")
        return PlannedRun(pre.variant, pre.seed, "finetune", finetune.name, name, finetune.preset,
                          flatten(finetune.overrides), finetune.inherit, cfg)


_MISSING = object()


def _tags(tags: Any, study: str) -> list[str]:
    tags = list(tags) if isinstance(tags, (list, tuple)) else [tags]
    return tags if study in tags else [*tags, study]


def _read_preset(path: Path, study: Path, what: str) -> dict[str, Any]:
    """The preset's merged (``extends`` followed) raw table; the preset must validate alone."""
    if not path.is_file():
        raise ConfigError(f"{study}: {what} = {path.name!r}, but {path} does not exist (paths are relative to "
                          "the study file).", key="study.pretrain" if "study" in what else "finetune.preset")
    load_preset(path)
    return _read_with_extends(path, chain=())


def _leaves(table: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; quoted dotted keys and nested tables alike (an empty
    table is a value: ``"objectives.itc" = {}`` turns ITC on with its defaults)."""
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def flatten(patch: dict[str, Any]) -> dict[str, Any]:
    """``{"freeze": {"groups": [...]}}`` -> ``{"freeze.groups": [...]}``."""
    return dict(_leaves(patch))


def _as_patch(table: dict[str, Any], where: str, forbidden: dict[str, str]) -> dict[str, Any]:
    """A table of overrides (quoted dotted keys, nested tables or both) as one nested patch."""
    patch: dict[str, Any] = {}
    for dotted, value in _leaves(table):
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"{where}: {dotted!r} is not a dotted key such as \"train.max_steps\".", key=dotted)
        if dotted in forbidden:
            raise ConfigError(f"{where}: {dotted} is set by {forbidden[dotted]}; remove it.", key=dotted)
        node = patch
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is given both a value and sub-keys.",
                                  key=dotted)
            node = child
        if parts[-1] in node:
            raise ConfigError(f"{where}: {dotted} is given twice.", key=dotted)
        node[parts[-1]] = value
    return patch


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def load_study(path: str | Path) -> Study:
    """Read and validate a study file and every config it plans; ConfigError names the key."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"Study path {path} is a directory; give a .toml file.")
    if not path.exists():
        shipped = Path(__file__).resolve().parent.parent / "presets" / "studies"
        near = difflib.get_close_matches(path.name, [p.name for p in shipped.glob("*.toml")], n=1)
        raise ConfigError(f"Study file not found: {path}." + (f" Did you mean presets/studies/{near[0]}?" if near
                                                              else ""))
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc}.") from None
    try:
        parsed = _StudyFile.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        key = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        lines = [describe_error(e, _StudyFile, top="study file") for e in errors]
        raise ConfigError("\n  ".join([f"{path}: invalid study file.", *lines]),
                          key=key or None) from None
    meta = parsed.study
    variants = _variants(parsed, path)
    baseline = meta.baseline if meta.baseline is not None else next(iter(variants))
    if baseline not in variants:
        near = difflib.get_close_matches(baseline, list(variants), n=1)
        raise ConfigError(f"{path}: study.baseline = {baseline!r} is not a variant"
                          + (f" — did you mean {near[0]!r}?" if near else "")
                          + f" The variants are: {', '.join(variants)}.", key="study.baseline")
    forbidden = {**_STUDY_KEYS, "train.init_from": "the study (each finetune starts from its pretraining run)"}
    study = Study(
        name=meta.name, description=meta.description, path=path, pretrain=(path.parent / meta.pretrain).resolve(),
        baseline=baseline, seeds=meta.seeds, overrides=_as_patch(meta.overrides, f"{path}: study.set", _STUDY_KEYS),
        variants=variants,
        finetunes=tuple(Finetune(f.name, (path.parent / f.preset).resolve(),
                                 _as_patch(f.overrides, f"{path}: [[finetune]] {f.name!r} set", forbidden),
                                 f.inherit) for f in parsed.finetune),
    )
    too_long = max((len(p.name) for p in study.expand()), default=0)
    if too_long > 80:
        raise ConfigError(f"{path}: run names <study>/<variant>/s<seed>/<task> would be {too_long} characters; "
                          "the limit is 80. Shorten study.name, the variant or the [[finetune]] names.",
                          key="study.name")
    return study


def _variants(parsed: _StudyFile, path: Path) -> dict[str, dict[str, Any]]:
    """Variant name -> nested patch; a grid is the product of its axes' levels."""
    if parsed.variants is not None:
        return {name: _as_patch(table, f"{path}: variant {name!r}", _STUDY_KEYS)
                for name, table in parsed.variants.items()}
    axes = {axis: {level: _as_patch(table, f"{path}: axes.{axis}.{level}", _STUDY_KEYS)
                   for level, table in levels.items()} for axis, levels in (parsed.axes or {}).items()}
    out: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(list(levels.items()) for levels in axes.values())):
        name = ",".join(f"{axis}={level}" for axis, (level, _) in zip(axes, combo))
        owner: dict[str, str] = {}
        patch: dict[str, Any] = {}
        for axis, (level, level_patch) in zip(axes, combo):
            for key, value in _leaves(level_patch):
                clash = next((k for k in owner if k == key or k.startswith(key + ".") or key.startswith(k + ".")),
                             None)
                if clash is not None:
                    raise ConfigError(f"{path}: axes.{owner[clash]} and axes.{axis}.{level} both set {clash}; "
                                      "each key may vary along one axis only.", key=key)
                owner[key] = f"{axis}.{level}"
                set_in(patch, key, value)
        out[name] = patch
    return out


# ----------------------------------------------------------------------------
# Queuing
# ----------------------------------------------------------------------------


def study_info(study: Study, planned: PlannedRun) -> dict[str, Any]:
    """What ``RunRecord.study`` holds for a planned run."""
    return {"name": study.name, "variant": planned.variant, "seed": planned.seed, "stage": planned.stage,
            "task": planned.task, "file": str(study.path)}


@dataclass(frozen=True)
class StudyStep:
    """What :func:`apply_plan` does for one planned run, decided against the store.

    ``new``: create and queue it. ``keep``: a run with this config exists, finished, queued
    or running. ``queue``: one exists but was never queued. ``retry``: one failed, was
    cancelled or crashed; queue it again (resuming from its checkpoint if it has one).
    ``changed``: the stored run of this variant, seed and task has another config (the
    study file changed); a new run is queued and the old one kept.
    """

    planned: PlannedRun
    action: Action
    existing: RunRecord | None
    changes: tuple[str, ...] = ()
    """``changed``: the config keys in which the stored run differs."""


def study_runs(store: Store, name: str) -> list[RunRecord]:
    """The stored runs of study ``name``, oldest first."""
    runs = [r for r in store.list_runs() if r.study and r.study.get("name") == name]
    return sorted(runs, key=lambda r: (r.created_at or 0.0, r.id))


def _record_key(record: RunRecord) -> tuple[str, int, str, str | None]:
    s = record.study or {}
    return (s.get("variant"), s.get("seed"), s.get("stage"), s.get("task"))


def _same_config(record: RunRecord, cfg: RunConfig) -> bool:
    try:
        return config_from_dict(record.config) == cfg
    except ConfigError:  # stored by an older, incompatible version
        return False


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def plan_study(store: Store, study: Study) -> list[StudyStep]:
    """Decide, for every planned run, what :func:`apply_plan` will do; changes nothing."""
    by_key: dict[tuple, list[RunRecord]] = {}
    for record in reversed(study_runs(store, study.name)):  # newest first
        by_key.setdefault(_record_key(record), []).append(record)
    steps: list[StudyStep] = []
    pretrain_of: dict[tuple, StudyStep] = {}
    for planned in study.expand():
        candidates = by_key.get(planned.key, [])
        if planned.stage == "pretrain":
            cfg = planned.config
        else:
            upstream = pretrain_of[planned.pretrain_key]
            if upstream.action in ("new", "changed"):  # its pretraining run does not exist yet
                step = StudyStep(planned, "changed", candidates[0], ("train.init_from",)) if candidates \
                    else StudyStep(planned, "new", None)
                steps.append(step)
                continue
            cfg = planned.resolved(upstream.existing.id)
        step = _decide(planned, cfg, candidates)
        if planned.stage == "pretrain":
            pretrain_of[planned.key] = step
        steps.append(step)
    return steps


def _decide(planned: PlannedRun, cfg: RunConfig, candidates: list[RunRecord]) -> StudyStep:
    same = [r for r in candidates if _same_config(r, cfg)]
    if same:
        record = same[0]
        if record.status in ("finished", "queued", "running"):
            return StudyStep(planned, "keep", record)
        return StudyStep(planned, "retry" if record.status in _RERUN else "queue", record)
    if candidates:
        return StudyStep(planned, "changed", candidates[0], tuple(_differences(candidates[0].config, cfg.to_dict())))
    return StudyStep(planned, "new", None)


def has_checkpoint(store: Store, run_id: str) -> bool:
    """Whether the run saved a resumable checkpoint."""
    return checkpoint_step(store.run_dir(run_id)) is not None


def apply_plan(store: Store, study: Study, steps: list[StudyStep], *, gpus: int = 1,
               start_worker: bool = True) -> list[RunRecord]:
    """Create and queue what ``steps`` ask for, in order; returns every planned run's record
    (the kept ones included), in plan order."""
    if gpus < 1:
        raise RenError(f"--gpus {gpus}: a run needs at least one GPU (or CPU process).")
    records: list[RunRecord] = []
    pretrain_ids: dict[tuple, str] = {}
    for step in steps:
        planned = step.planned
        upstream = pretrain_ids.get(planned.pretrain_key) if planned.stage == "finetune" else None
        after = [upstream] if upstream else []
        if step.action in ("new", "changed"):
            cfg = planned.resolved(upstream)
            record = create_run(store, cfg, str(planned.preset))
            store.update_run(record.id, study=study_info(study, planned))
            record = store.enqueue(record.id, gpus=gpus, after=after)
        elif step.action == "queue":
            record = store.enqueue(step.existing.id, gpus=gpus, after=after)
        elif step.action == "retry":
            if has_checkpoint(store, step.existing.id):
                record = Q.retry(store, step.existing.id, start_worker=False)
            else:  # resuming without a checkpoint would skip train.init_from: start afresh
                record = store.enqueue(step.existing.id, gpus=step.existing.gpus, after=after)
        else:
            record = step.existing
        if planned.stage == "pretrain":
            pretrain_ids[planned.key] = record.id
        records.append(record)
    if start_worker and any(r.status == "queued" for r in records):
        Q.ensure_worker(store)
    return records


def models_to_build(steps: list[StudyStep]) -> list[str]:
    """The models ren builds itself (``ren:...``) whose pretrained weights the runs still to train load, in
    first-use order. ``ren study run`` builds them before queueing, so a build never counts in a run's wall
    time and the variants' times compare."""
    names: list[str] = []
    for step in steps:
        if step.action == "keep":
            continue
        model = step.planned.config.model
        towers = (model.backbone,) if model.kind == "one_tower" else (model.vision, model.text)
        for tower in towers:
            if tower.source == "pretrained" and is_ren_model(tower.name) and tower.name not in names:
                names.append(tower.name)
    return names


def run_study(store: Store, path: str | Path, *, gpus: int = 1, start_worker: bool = True) -> list[RunRecord]:
    """Load the study at ``path`` and queue what the store lacks (see :class:`StudyStep`);
    returns every planned run's record in plan order."""
    study = load_study(path)
    return apply_plan(store, study, plan_study(store, study), gpus=gpus, start_worker=start_worker)


# ----------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRow:
    """One run of a study, for tables (``ren study status``, reports, the TUI)."""

    variant: str
    seed: int
    stage: str
    task: str | None
    name: str
    run_id: str | None
    status: str
    """The run's status; ``planned`` when the store has no run for it yet."""
    step: int
    max_steps: int | None
    metric: str | None
    """Finetunes: the task's score (``vqa_score``, ``accuracy``)."""
    score: float | None
    """Finetunes: that score from the final evaluation."""
    train_s: float | None
    """Seconds the run trained, over all its sessions (:attr:`RunRecord.train_s`)."""
    current: bool
    """False when the stored run's config differs from the study file's (``ren study run``
    queues the new config as a new run)."""
    after: str | None
    """Finetunes: the pretraining run they start from."""
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def study_table(store: Store, study: Study | str) -> list[StudyRow]:
    """A row per variant x seed x stage (and task). With a :class:`Study`, every planned run
    in plan order, matched to its stored run; with a study name, the stored runs only."""
    if isinstance(study, str):
        latest: dict[tuple, RunRecord] = {}
        for record in study_runs(store, study):
            latest[_record_key(record)] = record
        return [_row(record.study["variant"], record.study["seed"], record.stage, record.study.get("task"),
                     record.name, record, True, _metric_of(record)) for record in latest.values()]
    rows = []
    for step in plan_study(store, study):
        p = step.planned
        record = step.existing
        rows.append(_row(p.variant, p.seed, p.stage, p.task, p.name, record, step.action != "changed", p.metric))
    return rows


def _metric_of(record: RunRecord) -> str | None:
    task = (record.config.get("task") or {}).get("name")
    return _TASK_METRIC.get(task) if task else None


def _row(variant: str, seed: int, stage: str, task: str | None, name: str, record: RunRecord | None,
         current: bool, metric: str | None) -> StudyRow:
    if record is None:
        return StudyRow(variant, seed, stage, task, name, None, "planned", 0, None, metric, None, None, True, None,
                        None)
    init = record.init_from or ""
    return StudyRow(variant, seed, stage, task, name, record.id, record.status, record.step, record.max_steps, metric,
                    record.final_scores.get(metric) if metric else None, record.train_s, current,
                    init[4:] if init.startswith("run:") else None, record.error)


def find_study(store: Store, ref: str | Path) -> Study | str:
    """``ref`` as a study: a study file, else the name of a study in the store, loaded from
    the file its runs name when that still exists (else the name, for :func:`study_table`)."""
    path = Path(ref).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in str(ref):
        return load_study(path)
    runs = study_runs(store, str(ref))
    if not runs:
        names = sorted({r.study["name"] for r in store.list_runs() if r.study and r.study.get("name")})
        near = difflib.get_close_matches(str(ref), names, n=1)
        raise RenError(f"No study {str(ref)!r} in the store at {store.root}"
                       + (f"; did you mean {near[0]!r}?" if near else ".")
                       + (f" Studies with runs: {', '.join(names)}." if names
                          else " Queue one with `ren study run STUDY.toml`."))
    file = Path(runs[-1].study.get("file") or "")
    if file.is_file():
        try:
            study = load_study(file)
        except ConfigError:
            return str(ref)
        if study.name == str(ref):
            return study
    return str(ref)
