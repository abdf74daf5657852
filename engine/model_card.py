"""The model card (``README.md``) of an exported run (:mod:`engine.export`): Hugging Face front matter, then the
model, its data, its scores with the split each was measured on, its compute and the Renaissance citation, all
read from the run's record and resolved config. Text only (no torch), so it can be read and tested anywhere."""

from __future__ import annotations

import json
from collections.abc import Sequence

import tomli_w

from engine.config import Backbone, RunConfig, TextTower, VisionTower
from engine.display import eval_split_of, format_seconds, markdown_table, si
from engine.hub import looks_like_path
from engine.store import RunRecord

CITATION = """@article{fields2024renaissance,
  title   = {Renaissance: Investigating the Pretraining of Vision-Language Encoders},
  author  = {Fields, Clayton and Kennington, Casey},
  journal = {arXiv preprint arXiv:2411.06657},
  year    = {2024}
}"""

KINDS = {"one_tower": "one-tower (ViLT-style single-stream)", "two_tower": "two-tower (METER-style co-attention)",
         "dual_encoder": "dual-encoder (CLIP-style)"}

ScoreRow = tuple[str, str, str, float]
"""(split, which weights scored it, metric, score)."""


def model_card(record: RunRecord, cfg: RunConfig, towers: dict[str, str]) -> str:
    """The card of ``record``'s export; ``towers``: the folder of each exported tower by its config key."""
    sections = [_front_matter(record, cfg), _title(record, cfg), _files(towers), _model(record, cfg, towers),
                _data(record, cfg), _scores(record), _compute(record), _preset(record), _citation()]
    return "\n\n".join(section.rstrip("\n") for section in sections) + "\n"


def datasets_of(cfg: RunConfig) -> list[str]:
    """What the run trained on, as the card's ``datasets`` names it: a Hugging Face data set by its hub id,
    ren's caption pretraining by its corpora, anything else (a local data set too) by ren's name for it
    (``easy_vqa``, ``vqav2``)."""
    if cfg.data.hf is not None and not looks_like_path(cfg.data.hf.path):
        return [cfg.data.hf.path]
    return list(cfg.data.corpora) if cfg.data.dataset == "captions" else [cfg.data.dataset]


def score_rows(record: RunRecord) -> list[ScoreRow]:
    """Every score of the run with the split it was measured on: the best and final ones on the run's eval
    split, those ``ren eval`` added (keyed ``dataset/split/metric``), and the test split's, scored once."""
    split = eval_split_of(record) or "eval"
    rows = [(split, "best during training", key.removeprefix("eval/"), value)
            for key, value in record.best_scores.items()]
    for key, value in record.final_scores.items():
        parts = key.split("/")
        if key == "eval_samples":
            continue
        if len(parts) == 3:
            rows.append((f"{parts[0]} {parts[1]}", "final (`ren eval`)", parts[2], value))
        else:
            rows.append((split, "final", key.removeprefix("eval/"), value))
    for key, value in record.test_scores.items():
        name, _, metric = key.rpartition("/")
        rows.append((name or "test", "final, scored once", metric, value))
    return rows


def _front_matter(record: RunRecord, cfg: RunConfig) -> str:
    stage = "pretraining" if cfg.objectives is not None else "finetuning"
    what = [cfg.task.name] if cfg.task is not None else _objectives(cfg)
    tags = _unique(["ren", "vision-language", cfg.model.kind, stage, *what, *record.tags])
    metrics = _unique([metric for _, _, metric, _ in score_rows(record)])
    lines = ["---", "library_name: ren"]
    for key, values in (("tags", tags), ("datasets", datasets_of(cfg)), ("metrics", metrics)):
        if values:
            lines += [f"{key}:", *(f"- {json.dumps(value)}" for value in values)]  # JSON strings are YAML's too
    return "\n".join([*lines, "---"])


def _title(record: RunRecord, cfg: RunConfig) -> str:
    doing = (f"finetuned for {cfg.task.name} on {', '.join(datasets_of(cfg))}" if cfg.task is not None
             else f"pretrained with {', '.join(o.upper() for o in _objectives(cfg))} on {', '.join(datasets_of(cfg))}")
    notes = f"\n\n{record.notes}" if record.notes else ""
    return (f"# {record.name}\n\nA {KINDS[cfg.model.kind]} vision-language encoder {doing}, trained with ren (a "
            f"workbench for vision-language encoder research) as run `{record.id}` and exported with "
            f"`ren export`.{notes}")


def _files(towers: dict[str, str]) -> str:
    rows = [("`model.safetensors`, `config.json`", "the whole model with its heads; the run's resolved config and "
             "what rebuilding it needs", "ren: `train.init_from = \"DIR\"`, or the snippet of ren's docs/export.md"),
            ("tokenizer and `preprocessor_config.json`", "what the whole model reads: the run's tokenizer, an image "
             "processor that prepares images as ren's evaluation did", "`AutoTokenizer`, `AutoImageProcessor`")]
    loads = {"text": "`transformers.AutoModel`, `AutoTokenizer`", "backbone": "`transformers.AutoModel`",
             "vision": "`transformers.AutoModel`, `AutoImageProcessor`"}
    for key, folder in towers.items():
        rows.append((f"`{folder}/`", f"the {_tower_role(key)} alone", loads[folder]))
    return "## Files\n\n" + markdown_table(("path", "what", "loads with"), rows)


def _model(record: RunRecord, cfg: RunConfig, towers: dict[str, str]) -> str:
    model = cfg.model
    lines = [f"- architecture: {KINDS[model.kind]} (`model.kind = \"{model.kind}\"`)"]
    for table in ("backbone", "text", "vision"):
        tower = getattr(model, table, None)
        if tower is not None:
            folder = towers.get(f"model.{table}")
            lines.append(f"- {_tower_role(f'model.{table}')}: {_describe_tower(tower)}"
                         + (f", exported in `{folder}/`" if folder else ""))
    if model.kind == "two_tower":
        f = model.fusion
        lines.append(f"- fusion: {f.layers} co-attention layer(s) of width {f.hidden_size}, {f.heads} heads")
    if model.kind == "dual_encoder":
        lines.append(f"- projection: {model.projection_dim}-dimensional shared image-text space")
    heads = (f"a {cfg.task.name} head" if cfg.task is not None
             else f"{', '.join(o.upper() for o in _objectives(cfg))} heads")
    lines.append(f"- heads: {heads} (in `model.safetensors` only)")
    params = record.params
    if params.get("total"):
        trained = params.get("trainable", params["total"])
        lines.append(f"- parameters: {params['total']:,} ({trained:,} trained, {params['total'] - trained:,} "
                     f"frozen{_frozen(cfg)})")
    lines.append(f"- started from: {record.init_from or 'the towers as configured (no `train.init_from`)'}")
    return "## Model\n\n" + "\n".join(lines)


def _data(record: RunRecord, cfg: RunConfig) -> str:
    data = cfg.data
    source = f"Hugging Face data set `{data.hf.path}`" if data.hf is not None else ", ".join(datasets_of(cfg))
    lines = [f"- data: {source}" + (f" (arrow files of `{data.root}`)" if data.root and data.hf is None else ""),
             f"- trained on split `{data.train_split}`; evaluated on `{eval_split_of(record) or data.eval_split}`"]
    if record.test_scores:
        lines.append("- test split scored once, with the final weights, after training")
    lines.append(f"- texts truncated to {data.max_text_len} tokens; images {_image_size(cfg)} px, augmentation "
                 f"`{data.augment}`")
    return "## Data\n\n" + "\n".join(lines)


def _scores(record: RunRecord) -> str:
    rows = [(f"`{split}`", when, metric, f"{value:.4f}") for split, when, metric, value in score_rows(record)]
    if not rows:
        why = " (a pretraining run is scored by the finetunes started from it)" if record.stage == "pretrain" else ""
        return f"## Scores\n\nThe run recorded no scores{why}."
    return "## Scores\n\n" + markdown_table(("split", "weights", "metric", "score"), rows)


def _compute(record: RunRecord) -> str:
    c = record.compute
    if not c:
        return "## Compute\n\nThe run recorded no compute accounting."
    lines = [f"- device: {c.get('device', '?')}, {c.get('processes', 1)} process(es), {c.get('dtype', '?')}"]
    batch = record.config.get("train", {}).get("batch_size")
    lines.append(f"- {record.step:,} optimizer steps" + (f" of batch {batch}" if batch else ""))
    if "train_seconds" in c:
        lines.append(f"- training time: {format_seconds(c['train_seconds'])} "
                     f"({c.get('device_hours', 0.0):.4g} device-hours), evaluations excluded")
    if "pflops" in c:
        lines.append(f"- {c['pflops']:.4g} PFLOPs of training"
                     + (f", {c['eval_pflops']:.4g} of evaluation" if c.get("eval_pflops") else ""))
    per_sample = c.get("flops_per_sample") or {}
    if per_sample.get("train"):
        lines.append(f"- {si(per_sample['train'], 'FLOP')} per training sample (forward and backward)")
    if c.get("peak_memory_mb"):
        lines.append(f"- peak memory: {c['peak_memory_mb']:,.0f} MiB")
    lines.append("\nAs ren measures it: ren's docs/queue-and-store.md, \"Compute accounting\".")
    return "## Compute\n\n" + "\n".join(lines)


def _preset(record: RunRecord) -> str:
    origin = f"from the preset `{record.preset_path}`, " if record.preset_path else ""
    return (f"## Preset\n\nThe run's resolved config ({origin}every default filled in): `ren run` on it repeats "
            "the run (a `train.init_from = \"run:...\"` names a run of the store it trained in).\n\n"
            f"```toml\n{tomli_w.dumps(record.config).rstrip()}\n```")


def _citation() -> str:
    return ("## Citation\n\nren follows the questions of the Renaissance paper (Fields & Kennington, "
            f"arXiv 2411.06657, 2024):\n\n```bibtex\n{CITATION}\n```")


def _tower_role(key: str) -> str:
    return {"model.text": "text tower", "model.vision": "vision tower",
            "model.backbone": "backbone (the shared transformer)"}[key]


def _describe_tower(tower: TextTower | VisionTower | Backbone) -> str:
    """How the run's config built the tower (the weights it started from are the run's ``init_from``'s
    where it has one)."""
    if tower.source == "manual":
        return f"sized by the preset: {tower.layers} layers of width {tower.hidden_size}, {tower.heads} heads"
    library = "timm" if getattr(tower, "library", "hf") == "timm" else "Hugging Face"
    start = "the weights of" if tower.source == "pretrained" else "random weights in the architecture of"
    return f"{library} model, from {start} `{tower.name}`"


def _objectives(cfg: RunConfig) -> list[str]:
    objectives = cfg.objectives
    return [name for name in ("mlm", "itm", "itc") if objectives is not None and getattr(objectives, name)]


def _frozen(cfg: RunConfig) -> str:
    return f": `freeze.groups = {json.dumps(list(cfg.freeze.groups))}`" if cfg.freeze.groups else ""


def _image_size(cfg: RunConfig) -> int:
    return cfg.model.backbone.image_size if cfg.model.kind == "one_tower" else cfg.model.vision.image_size


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))
