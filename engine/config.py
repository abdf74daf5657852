"""Presets: TOML files turned into one frozen, validated run config.

A preset is read with :mod:`tomllib`, merged over the preset it ``extends``,
patched with ``--set key=value`` overrides and validated into :class:`RunConfig`.
Every section forbids unknown keys, and the architecture kind is a tagged
choice, so a key that does not apply to the chosen kind is an error rather
than silently ignored. All errors are :class:`~engine.errors.ConfigError`
with a message that names the key and, where it can, suggests the fix.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import difflib
import errno
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import core_schema

from engine.errors import ConfigError

# ----------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------


class _Section(BaseModel):
    # allow_inf_nan: TOML has inf and nan literals, and no key means anything with them
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


def _mlp_has_units(mlp_ratio: float, info: ValidationInfo) -> float:
    """A field validator of ``mlp_ratio``: the MLP of ``int(hidden_size x mlp_ratio)`` units must have one."""
    hidden = info.data.get("hidden_size")
    if hidden is not None and int(hidden * mlp_ratio) < 1:
        raise ValueError(f"hidden_size x mlp_ratio ({hidden} x {mlp_ratio}) gives an MLP of no units; "
                         f"set mlp_ratio >= {1 / hidden:g}")
    return mlp_ratio


class _Dropouts:
    """For sections with the fields ``dropout`` and ``attention_dropout`` (unset: ``dropout``)."""

    @property
    def attention_p(self) -> float | None:
        """The attention dropout in effect; None only for a tower whose checkpoint config could not be read
        when the preset was validated (the checkpoint's own is then kept)."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout


class _Tower(_Section, _Dropouts):
    source: Literal["manual", "pretrained", "random"] = "manual"
    """``manual``: sized by the keys below, random init, no download.
    ``pretrained``: weights from ``name`` (a hub id or a local directory).
    ``random``: the architecture of ``name``'s config, randomly initialised."""
    name: str | None = None
    """Hub id or local directory (HF format) for ``pretrained``/``random``."""
    hidden_size: int = Field(128, ge=8, le=16384)
    """Manual towers: width of the encoder."""
    layers: int = Field(2, ge=0, le=128)
    """Manual towers: number of transformer layers."""
    heads: int = Field(4, ge=1, le=256)
    """Manual towers: attention heads (must divide hidden_size)."""
    mlp_ratio: float = Field(4.0, gt=0, le=16)
    """Manual towers: MLP width as a multiple of hidden_size (at least one unit)."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Dropout inside the tower (all sources): on hidden states and, unless ``attention_dropout`` is
    set, on attention probabilities. Unset: 0.0 for manual towers (and timm ones); a pretrained or random
    tower keeps its checkpoint's own (e.g. ELECTRA's 0.1), which the resolved config records (with
    ``attention_dropout`` where the checkpoint's differs)."""
    attention_dropout: float | None = Field(None, ge=0, lt=1)
    """Dropout on attention probabilities (all sources); unset: ``dropout``. Hugging Face configs keep
    the two apart (``hidden_dropout_prob``, ``attention_probs_dropout_prob``). 0 with ``dropout`` > 0
    keeps PyTorch's fused attention kernel while training (it has no dropout)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""

    _mlp_units = field_validator("mlp_ratio")(_mlp_has_units)

    @model_validator(mode="after")
    def _source_consistency(self) -> "_Tower":
        if self.source == "manual":
            if self.name is not None and not self._allows_manual_name():
                raise ValueError(
                    "'name' only applies when source is 'pretrained' or 'random'; "
                    "remove it or set source = \"pretrained\""
                )
            if self.hidden_size % self.heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})"
                )
        else:
            if not self.name:
                raise ValueError(
                    f"source = {self.source!r} needs 'name': a hub id such as "
                    "\"google/electra-small-discriminator\" or a local model directory"
                )
            sized = sorted(set(self.model_fields_set) & set(self.manual_only_keys))
            if sized:
                raise ValueError(
                    f"{', '.join(sized)} only appl{'ies' if len(sized) == 1 else 'y'} when "
                    f"source = \"manual\"; the size of {self.name!r} comes from its config"
                )
        return self

    @model_validator(mode="after")
    def _dropout_in_effect(self) -> "_Tower":
        """Record the dropout the tower runs with when the preset leaves it unset: the checkpoint's own
        for a named HF model (left unset when its config cannot be read here; building it will say why)."""
        if self.dropout is not None:
            return self
        if self.source == "manual" or getattr(self, "library", "hf") == "timm":
            object.__setattr__(self, "dropout", 0.0)
            return self
        from engine.hub import checkpoint_dropouts  # torch-free, but for ren: models

        assert self.name is not None
        hidden, attention = checkpoint_dropouts(self.name, self.config_part)
        if hidden is not None:
            object.__setattr__(self, "dropout", hidden)
            if self.attention_dropout is None and attention is not None and attention != hidden:
                object.__setattr__(self, "attention_dropout", attention)
        return self

    def _allows_manual_name(self) -> bool:
        return False

    manual_only_keys: ClassVar[tuple[str, ...]] = ("hidden_size", "layers", "heads", "mlp_ratio")
    """Keys that size a manual tower. Any other source takes its size from its checkpoint config, so
    validation refuses them there and the stored config leaves them out."""
    unused_unless_manual: ClassVar[tuple[str, ...]] = ()
    """Keys accepted from any source but used by a manual tower only (a pretrained or random tower
    ignores them)."""
    config_part: ClassVar[str] = ""
    """Which part of a composite (CLIP-like) checkpoint config the tower is: ``text``, ``vision``, or the
    whole config."""

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        """The stored config leaves out keys that do not apply (manual sizes of a
        pretrained tower), so it validates again as it was written."""
        data = handler(self)
        if self.source != "manual":
            for key in self.manual_only_keys:
                data.pop(key, None)
        return data


class TextTower(_Tower):
    """A text encoder (BERT, ELECTRA, RoBERTa, ... or a manual BERT-style stack)."""

    config_part: ClassVar[str] = "text"

    max_positions: int = Field(64, ge=8, le=8192)
    """Manual towers only: size of the position table (>= data.max_text_len)."""

    unused_unless_manual: ClassVar[tuple[str, ...]] = ("max_positions",)


class VisionTower(_Tower):
    """A vision encoder: a HF vision model (ViT, DeiT, ...) or any timm model."""

    config_part: ClassVar[str] = "vision"

    library: Literal["hf", "timm"] = "hf"
    """``timm`` builds ``name`` with timm.create_model (CNNs included: their last
    feature map becomes a token sequence)."""
    patch_size: int = Field(16, ge=1, le=64)
    """Manual towers: side of the square image patches."""
    image_size: int = Field(224, ge=8, le=2048)
    """Input resolution. For pretrained towers this sets the data resolution;
    position embeddings are interpolated when it differs from the checkpoint."""

    manual_only_keys: ClassVar[tuple[str, ...]] = _Tower.manual_only_keys + ("patch_size",)

    def _allows_manual_name(self) -> bool:
        return False

    @model_validator(mode="after")
    def _timm_source(self) -> "VisionTower":
        if self.library == "timm" and self.source == "manual":
            raise ValueError(
                "library = \"timm\" needs source = \"pretrained\" or \"random\" and a timm "
                "model name (e.g. name = \"resnet18\")"
            )
        if self.image_size % self.patch_size and self.source == "manual":
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        return self


class Backbone(_Tower):
    """The single shared encoder of a one-tower model.

    ``modality`` says which modality the backbone was built for: with
    ``embeddings = "backbone"`` its own embeddings are kept for that modality
    and a fresh embedding is added for the other. For pretrained/random
    backbones it is read from the config.
    """

    modality: Literal["text", "vision"] | None = None
    """The backbone's native modality; manual backbones default to ``text``,
    pretrained/random ones take it from their config."""
    embeddings: Literal["backbone", "fresh"] = "backbone"
    """``backbone`` (ViLT): keep the backbone's own embedding for its modality, and its final LayerNorm;
    the other modality gets a fresh one. ``fresh`` (Renaissance, one_tower_encoder.py): keep only the
    encoder layers; both modalities get fresh embeddings (word + position + LayerNorm for text, patches
    + [CLS] + position for images) and there is no final LayerNorm, as Renaissance takes ``model.encoder``
    alone (a ViT's final ``layernorm`` and any pooler sit outside it)."""
    image_embedding: Literal["patch", "conv"] = "patch"
    """A fresh image embedding (a text backbone's, or any with ``embeddings = "fresh"``): ``patch`` (ViLT:
    one linear projection per patch) or ``conv`` (a stride-2 convolution stem, "early convolutions"; needs
    a power-of-two patch_size)."""
    patch_size: int = Field(16, ge=1, le=64)
    """Patch size of the image embedding (fresh for text backbones and with ``embeddings = "fresh"``; must
    match a vision backbone's own patch size when it keeps its embedding and the key is given)."""
    image_size: int = Field(224, ge=8, le=2048)
    """Input resolution of the images."""
    max_text_positions: int = Field(64, ge=8, le=8192)
    """Size of the text position table when the text embedding is fresh."""

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        """As :meth:`_Tower._resolved`; a pretrained or random backbone's ``patch_size`` is stored only when the
        preset gave it or the embeddings are fresh (which use it), since a vision backbone's own patch size
        (which the default need not match) wins, and a stored default would then read back as a contradiction."""
        data = super()._resolved(handler)
        if self.source != "manual" and "patch_size" not in self.model_fields_set and self.embeddings == "backbone":
            data.pop("patch_size", None)
        return data

    @model_validator(mode="after")
    def _manual_modality(self) -> "Backbone":
        if self.source == "manual" and self.modality is None:
            object.__setattr__(self, "modality", "text")
        if self.image_embedding == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(
                f"image_embedding = \"conv\" needs a power-of-two patch_size (got {self.patch_size})"
            )
        if self.modality == "vision" and self.image_embedding != "patch" and self.embeddings == "backbone":
            raise ValueError(
                "image_embedding applies to fresh image embeddings only; a vision backbone keeps "
                "its own pretrained patch embedding unless embeddings = \"fresh\""
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        return self


class Fusion(_Section, _Dropouts):
    """Co-attention fusion layers (METER-style): each layer runs self-attention,
    cross-attention to the other modality and an MLP, for both streams."""

    layers: int = Field(2, ge=1, le=48)
    """Number of fusion layers (each updates both streams)."""
    hidden_size: int = Field(256, ge=8, le=16384)
    """Fusion width; both towers are projected to it."""
    heads: int = Field(4, ge=1, le=256)
    """Attention heads in the fusion layers."""
    mlp_ratio: float = Field(4.0, gt=0, le=16)
    """MLP width as a multiple of hidden_size (at least one unit)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout in the fusion layers: on each block's output before its residual and, unless
    ``attention_dropout`` is set, on attention probabilities."""
    attention_dropout: float | None = Field(None, ge=0, lt=1)
    """Dropout on the fusion layers' attention probabilities; unset: ``dropout``."""

    _mlp_units = field_validator("mlp_ratio")(_mlp_has_units)

    @model_validator(mode="after")
    def _divisible(self) -> "Fusion":
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})"
            )
        return self


class OneTowerModel(_Section):
    """ViLT-style single stream: [text tokens ; image patches] through one encoder."""

    kind: Literal["one_tower"]
    """The architecture: ``one_tower``, ``two_tower`` or ``dual_encoder``."""
    backbone: Backbone = Backbone()
    """The shared encoder ([model.backbone])."""
    pooler: Literal["single", "double"] = "single"
    """``single``: the first (text CLS) token; ``double``: text CLS and image CLS concatenated."""


class TwoTowerModel(_Section):
    """METER-style: a text tower and a vision tower joined by co-attention fusion."""

    kind: Literal["two_tower"]
    """The architecture: ``one_tower``, ``two_tower`` or ``dual_encoder``."""
    text: TextTower = TextTower()
    """The text tower ([model.text])."""
    vision: VisionTower = VisionTower()
    """The vision tower ([model.vision])."""
    fusion: Fusion = Fusion()
    """The co-attention fusion stack ([model.fusion])."""
    pooler: Literal["double"] = "double"
    """Text CLS and image CLS of the last fusion layer, concatenated."""


class DualEncoderModel(_Section):
    """CLIP-style: two towers with projection heads, compared by cosine similarity."""

    kind: Literal["dual_encoder"]
    """The architecture: ``one_tower``, ``two_tower`` or ``dual_encoder``."""
    text: TextTower = TextTower()
    """The text tower ([model.text])."""
    vision: VisionTower = VisionTower()
    """The vision tower ([model.vision])."""
    projection_dim: int = Field(256, ge=8, le=8192)
    """Size of the shared image-text embedding space."""


ModelConfig = Annotated[
    Union[OneTowerModel, TwoTowerModel, DualEncoderModel], Field(discriminator="kind")
]
MODEL_KINDS = {"one_tower": OneTowerModel, "two_tower": TwoTowerModel, "dual_encoder": DualEncoderModel}
"""The architecture kinds (``model.kind``) and their schemas."""
TOWERS: dict[str, type[_Tower]] = {
    name: field.annotation for model in MODEL_KINDS.values() for name, field in model.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Tower)
}
"""The tower tables under ``[model]`` of any kind (``backbone``, ``text``, ``vision``) and their schemas."""
MANUAL_ONLY_KEYS: dict[str, tuple[str, ...]] = {name: tower.manual_only_keys for name, tower in TOWERS.items()}
"""Per tower table, the keys only a ``source = "manual"`` tower may set: validation refuses them for a
pretrained or random one (its size comes from its checkpoint config)."""
MANUAL_USE_KEYS: dict[str, tuple[str, ...]] = {
    name: tower.manual_only_keys + tower.unused_unless_manual for name, tower in TOWERS.items()
}
"""Per tower table, the keys that take effect for a manual tower only: :data:`MANUAL_ONLY_KEYS` and the keys
other sources accept but ignore (a text tower's ``max_positions``)."""


class FreezeConfig(_Section):
    """Which parameter groups are frozen. Patterns match group names produced by
    the builder (``ren validate`` lists them), e.g. ``"vision.*"``,
    ``"text.layers[0:6]"``, ``"backbone.embeddings"``."""

    groups: tuple[str, ...] = ()
    """Patterns of the groups to freeze."""
    unfreeze: tuple[str, ...] = ()
    """Exceptions to ``groups`` (applied after it)."""


class MLMObjective(_Section):
    """Masked language modelling on the text, conditioned on the image."""

    weight: float = Field(1.0, ge=0)
    """Weight in the summed loss."""
    mask_prob: float = Field(0.15, gt=0, lt=1)
    """Share of words (or tokens) chosen for prediction (80% [MASK], 10% random, 10% kept)."""
    whole_word: bool = True
    """Mask every sub-word token of a chosen word together."""


class ITMObjective(_Section):
    """Image-text matching: does this image go with this text?"""

    weight: float = Field(1.0, ge=0)
    """Weight in the summed loss."""
    negative_ratio: float = Field(0.5, gt=0, lt=1)
    """Share of pairs in a batch whose image is replaced by another image."""
    negatives: Literal["random", "hard"] = "random"
    """Where a negative image comes from, among the images of the batch gathered over all
    processes that neither show the pair's image nor carry its caption: ``random`` uniformly;
    ``hard`` drawn from the softmax of the ITC similarities, as ALBEF (needs [objectives.itc];
    costs one extra tower pass without gradients)."""


class ITCObjective(_Section):
    """Image-text contrastive loss on the unimodal summaries (two towers only), over the
    batch gathered from every process (with gradients, as open_clip); pairs with the same
    image or the same caption text are positives."""

    weight: float = Field(1.0, ge=0)
    """Weight in the summed loss."""
    temperature: float = Field(0.07, gt=0, le=10)
    """Initial softmax temperature."""
    learn_temperature: bool = True
    """Learn the temperature (as CLIP does)."""


class Objectives(_Section):
    """Pretraining objectives; the loss is the weighted sum of the enabled ones."""

    mlm: MLMObjective | None = None
    """[objectives.mlm]"""
    itm: ITMObjective | None = None
    """[objectives.itm]"""
    itc: ITCObjective | None = None
    """[objectives.itc]"""

    @model_validator(mode="after")
    def _at_least_one(self) -> "Objectives":
        if not (self.mlm or self.itm or self.itc):
            raise ValueError(
                "enable at least one objective, e.g. [objectives.mlm] or [objectives.itm]"
            )
        enabled = [o for o in (self.mlm, self.itm, self.itc) if o is not None]
        if not any(o.weight for o in enabled):
            raise ValueError("every enabled objective has weight 0, so the loss is 0 and nothing would learn; "
                             "give at least one a weight > 0")
        if self.itm and self.itm.negatives == "hard" and not self.itc:
            raise ValueError(
                "itm.negatives = \"hard\" draws each negative from the ITC similarities; add "
                "[objectives.itc] (a two_tower model) or set itm.negatives = \"random\""
            )
        return self


class TaskConfig(_Section):
    """A downstream task to finetune and evaluate on."""

    name: Literal["vqa", "snli_ve", "nlvr2", "refcoco"] = "vqa"
    """The task: ``vqa`` (soft-target VQA: easy_vqa or vqav2), ``snli_ve`` (3-way
    visual entailment), ``nlvr2`` (true/false about a pair of images; each image
    is encoded with the sentence and the two pooled features are concatenated,
    as in ViLT), ``refcoco`` (pick the referred object among the image's
    candidate boxes; on refcoco, refcoco+ or refcocog)."""
    loss: Literal["bce", "ce"] = "bce"
    """``bce``: binary cross-entropy per answer against the soft targets (ViLT,
    METER, Renaissance). ``ce``: softmax cross-entropy against the targets
    normalised to a distribution; on single-answer data (easy-VQA) it learns
    far faster (see presets/quickstart.toml)."""
    head_hidden_mult: float = Field(2.0, gt=0, le=8)
    """Width of the task head's hidden layer, in units of the pooled feature size."""

    @model_validator(mode="after")
    def _loss_is_vqa_only(self) -> "TaskConfig":
        if "loss" in self.model_fields_set and self.name != "vqa":
            raise ValueError(f"'loss' applies to task \"vqa\"; {self.name} is trained with cross-entropy "
                             "(remove it)")
        return self

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.name != "vqa":
            data.pop("loss", None)
        return data


_DEFAULT_SPLITS = {"easy_vqa": ("train", "val"), "vqav2": ("train+trainable_val", "rest_val"),
                   "snli_ve": ("train", "dev"), "nlvr2": ("train", "dev"), "captions": ("train", "val"),
                   "refcoco": ("train", "val"), "refcoco+": ("train", "val"), "refcocog": ("train", "val")}
_TASK_DATASETS = {"vqa": ("easy_vqa", "vqav2"), "snli_ve": ("snli_ve",), "nlvr2": ("nlvr2",),
                  "refcoco": ("refcoco", "refcoco+", "refcocog")}


# [data.hf] column mapping: ren's layout columns (engine.data.arrow's, plus those marked) -> the HF column each
# reads by default, per data.dataset. Defaults follow the common hub layouts (HuggingFaceM4/VQAv2's, ...).
HF_COLUMNS: dict[str, dict[str, str]] = {
    "vqav2": {"image": "image", "questions": "question", "answers": "answers", "question_id": "question_id",
              "image_id": "image_id", "multiple_choice_answer": "multiple_choice_answer"},
    "snli_ve": {"image": "image", "premise": "premise", "hypothesis": "hypothesis", "labels": "label"},
    "nlvr2": {"image_0": "left_image", "image_1": "right_image", "questions": "sentence", "answers": "label",
              "identifier": "identifier"},
    "captions": {"image": "image", "caption": "caption", "image_id": "image_id"},
    **{name: {"image": "image", "sentences": "sentences", "bboxes": "bboxes", "labels": "labels"}
       for name in ("refcoco", "refcoco+", "refcocog")},
}


def _hf_columns_text() -> str:
    names = {"refcoco": "refcoco, refcoco+, refcocog"}
    return "; ".join(f"{names.get(dataset, dataset)}: " + ", ".join(f"{key} = \"{column}\"" for key, column in
                                                                   columns.items())
                     for dataset, columns in HF_COLUMNS.items() if dataset not in ("refcoco+", "refcocog"))


class HFDataConfig(_Section):
    """A Hugging Face ``datasets`` data set as the source of ``data.dataset``, instead
    of arrow files in ``data.root``. Each HF row is one example (one question,
    hypothesis, sentence or caption; a list of captions also works) and is read as
    a ViLT row of one image. ``data.train_split`` and ``data.eval_split`` name its
    splits (default ``train`` and ``validation``; ``a+b`` joins splits). With
    ``dataset = "captions"``, ``data.corpora`` names the one corpus it holds."""

    path: str
    """A hub id (``owner/name``; data sets that need a loading script cannot be read
    by ``datasets`` 4 and later) or a local directory."""
    format: Literal["auto", "hub", "disk", "parquet", "imagefolder"] = "auto"
    """``disk``: a ``save_to_disk`` directory (a DatasetDict: ``dataset_dict.json`` and
    one folder per split). ``parquet``: a directory of parquet files named by split
    (``train-00000-of-00001.parquet``, also under ``data/``). ``imagefolder``: one
    folder per split of images with a ``metadata.jsonl``/``metadata.csv`` whose
    ``file_name`` names each row's image. ``hub``: ``datasets.load_dataset(path)``.
    ``auto``: a directory is recognised by those files; anything else is a hub id.
    Hub, parquet and imagefolder data are converted once into the ``datasets``
    cache (``HF_DATASETS_CACHE``); every format is read memory-mapped."""
    subset: str | None = None
    """The hub data set's configuration (``name`` of ``load_dataset``)."""
    columns: dict[str, str] = Field({}, description=(
        "ren's column -> the HF data set's column, over the defaults per data.dataset: " + _hf_columns_text()
        + ". Images are HF Image() columns or raw bytes. VQAv2 answers are a list of {answer, ...} structs, a "
        "list of strings or one string; labels and soft scores are derived (see answer_min_count). SNLI-VE "
        "labels are METER's ids, or names (strings or ClassLabel). NLVR2 answers are \"True\"/\"False\", bools "
        "or 0/1. image_id, multiple_choice_answer, premise and identifier may be absent from the data."))
    answer_min_count: int = Field(9, ge=1)
    """VQAv2: the answer vocabulary holds the answers that are the majority answer
    (``multiple_choice_answer``, else the commonest of a question's answers) of at
    least this many training questions (ViLT's rule, 9 over VQAv2); soft scores are
    ViLT's table over each question's normalised answers."""


class DataConfig(_Section):
    dataset: Literal["easy_vqa", "vqav2", "snli_ve", "nlvr2", "refcoco", "refcoco+", "refcocog",
                     "captions"] = "easy_vqa"
    """``easy_vqa``: the embedded default (VQA for tasks, derived captions for
    pretraining). ``vqav2``, ``snli_ve``, ``nlvr2``, ``refcoco``, ``refcoco+``,
    ``refcocog``: read from ViLT/METER/Renaissance-format arrow files in
    ``root``. ``captions``: pretraining on the caption corpora
    listed in ``corpora``, from arrow files in ``root``. Any of these can instead be
    read from a Hugging Face data set: see [data.hf]."""
    corpora: tuple[Literal["coco_caption", "vg", "f30k_caption", "cc", "sbu"], ...] = ()
    """Caption corpora mixed for pretraining (``dataset = "captions"``): concatenated
    as ViLT and METER do, so each is drawn in proportion to its captions."""
    root: str | None = None
    """Directory of the data set's arrow files (``vqav2_*.arrow``, ``snli_*.arrow``, ``nlvr2_*.arrow``,
    ``refcoco_unc_*.arrow``, ...)."""
    hf: HFDataConfig | None = None
    """[data.hf]: read the data set from a Hugging Face ``datasets`` data set instead of ``root``."""
    train_split: str | None = None
    """Split(s) trained on, joined with ``+``; default: the literature's
    (``train+trainable_val`` for vqav2, as ViLT and METER train)."""
    tokenizer: str = "auto"
    """``auto``: the text backbone's own tokenizer when it is pretrained, else a
    word-level tokenizer built from the data set's text. Or a hub id / directory."""
    max_text_len: int = Field(40, ge=4, le=4096)
    """Texts are truncated to this many tokens (special tokens included). Unset where the preset sizes a
    smaller text position table (``model.text.max_positions`` of a manual tower, a one-tower model's
    ``max_text_positions``), it is that table's size; a value beyond the table is an error."""
    eval_split: str | None = None
    """The split evaluated during and after training (``best_scores`` and
    ``final_scores``); default ``val`` for easy_vqa (400 train images held out;
    its test split is scored once after training, as ``test_scores``; ``test``
    selects on the test split, as runs made before ``val`` existed did),
    ``rest_val`` (ViLT's minival) for vqav2, ``dev`` for snli_ve and nlvr2,
    ``val`` for the RefCOCO sets (``testA``, ``testB`` and Renaissance's ``test`` also exist)."""
    eval_max_samples: int | None = Field(None, ge=1)
    """Evaluate on the first N samples of the eval split during training (the
    final evaluation always uses the whole split)."""
    cache_dir: str | None = None
    """Where decoded images are cached; default ``$REN_HOME/cache``."""
    augment: Literal["none", "randaugment", "crop", "crop+randaugment"] = "none"
    """Training images (file-backed data sets; easy-VQA's images are pre-resized).
    ``none``: as evaluation sees them (shorter side resized, centre crop), as ViLT
    and METER finetune and pretrain without ``randaug``. ``randaugment``: RandAugment
    (2 ops, magnitude 9) first, as their ``*_randaug`` transforms. ``crop``: a random
    50-100% area crop instead of the centre crop (ALBEF's; neither ViLT nor METER
    crops); ``crop+randaugment``: that crop, then RandAugment."""
    num_workers: int = Field(0, ge=0, le=64)
    """DataLoader worker processes decoding images (file-backed data sets)."""
    image_norm: Literal["auto", "imagenet", "clip", "half"] = "auto"
    """Pixel normalisation. ``auto``: the pretrained vision backbone's own mean and
    std (its ``preprocessor_config.json``, or timm's pretrained config); 0.5/0.5
    for towers trained from scratch. Or a named choice: ``imagenet``, ``clip``,
    ``half`` (mean 0.5, std 0.5)."""


    @model_validator(mode="after")
    def _dataset_keys(self) -> "DataConfig":
        train, evaluate = ("train", "validation") if self.hf is not None else _DEFAULT_SPLITS[self.dataset]
        if self.train_split is None:
            object.__setattr__(self, "train_split", train)
        if self.eval_split is None:
            object.__setattr__(self, "eval_split", evaluate)
        if self.dataset == "easy_vqa":
            if self.hf is not None:
                raise ValueError("[data.hf] applies to data sets read from files; easy_vqa is embedded (remove it)")
            if self.train_split != train:
                raise ValueError(f"train_split = {self.train_split!r}: easy_vqa has one train split, {train!r}")
            if self.eval_split not in ("val", "test"):
                raise ValueError(f"eval_split = {self.eval_split!r}: easy_vqa evaluates on 'val' (held out of its "
                                 "train split) or, as runs made before 'val' existed did, 'test'")
            if self.root is not None:
                raise ValueError("'root' applies to data sets read from files; easy_vqa is embedded (remove it)")
            if self.augment != "none" or self.num_workers:
                raise ValueError("augment and num_workers apply to data sets read from files; easy_vqa keeps "
                                 "its images decoded in memory")
        elif self.hf is not None:
            self._check_hf(self.hf)
        elif self.root is None:
            raise ValueError(f"dataset = {self.dataset!r} needs 'root' (the directory of its arrow files) or a "
                             "[data.hf] table (a Hugging Face data set)")
        if self.dataset.startswith("refcoco") and self.augment != "none":
            raise ValueError(f"augment = {self.augment!r}: {self.dataset} images are seen whole so that the candidate "
                             "boxes keep their place; random crops and RandAugment's shears, rotations and "
                             "translations would move the objects away from their boxes. Remove augment")
        if (self.dataset == "captions") != bool(self.corpora):
            raise ValueError("'corpora' lists the caption corpora of dataset = \"captions\" (e.g. "
                             "[\"coco_caption\", \"vg\"]); give both or neither")
        return self

    def _check_hf(self, hf: HFDataConfig) -> None:
        if self.root is not None:
            raise ValueError("'root' (arrow files) and [data.hf] (a Hugging Face data set) are two sources; "
                             "give one")
        valid = HF_COLUMNS[self.dataset]
        for key in hf.columns:
            if key not in valid:
                raise ValueError(f"data.hf.columns.{key}: {self.dataset} has no column {key!r}; the keys are "
                                 f"{', '.join(valid)}")
        if self.dataset == "captions" and len(self.corpora) > 1:
            raise ValueError(f"[data.hf] is one data set, so corpora names one corpus (got {list(self.corpora)}); "
                             "pretraining on several corpora reads arrow files from 'root'")
        if "answer_min_count" in hf.model_fields_set and self.dataset != "vqav2":
            raise ValueError("data.hf.answer_min_count applies to dataset = \"vqav2\" only (remove it)")
        if hf.subset is not None and hf.format not in ("auto", "hub"):
            raise ValueError(f"data.hf.subset names a configuration of a hub data set; format = {hf.format!r} "
                             "has none (remove it)")

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.hf is not None and self.dataset != "vqav2":
            data["hf"].pop("answer_min_count", None)
        return data


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0, le=10)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0, le=1)
    """Decoupled weight decay; never applied to biases, norms and embedding tables."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas: the decay rates of the gradient's running mean and of its square, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0, le=1)
    """AdamW epsilon."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup, stepped once per optimizer step."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the optimizer steps spent warming up linearly from 0."""
    head_lr_mult: float = Field(1.0, gt=0, le=1000)
    """Learning-rate multiplier for the heads (poolers: see ``fusion_lr_mult``)."""
    fusion_lr_mult: float = Field(1.0, gt=0, le=1000)
    """Learning-rate multiplier for the fusion layers and a two-tower model's poolers (METER's cross-modal
    rate); a one-tower model's pooler learns at the base rate (ViLT)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (omit to disable)."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each beta must lie in [0, 1) (they are AdamW's decay rates of its running averages; "
                             "the usual values are [0.9, 0.999])")
        return betas


class TrainConfig(_Section):
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(64, ge=1)
    """Global batch size (samples per optimizer step, over all processes)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Per-process batch per forward pass; gradient accumulation makes up the
    rest. Default: batch_size / number of processes. batch_size must be a multiple
    of micro_batch_size x processes (`ren validate --gpus N` checks N processes)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (through accelerate)."""
    compile: bool = False
    """Run the model under ``torch.compile`` (through accelerate's dynamo plugin, inductor backend). The
    first steps take longer while it compiles; the losses match eager training within rounding
    (docs/presets-guide.md, "Compiled steps"). The step whose FLOPs are counted runs eagerly."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """``torch.compile``'s mode: ``reduce-overhead`` adds CUDA graphs (GPU, static shapes), ``max-autotune``
    also searches kernel configurations (longer compile)."""
    compile_regions: bool = True
    """Compile each repeated transformer block once and reuse it (accelerate's regional compilation): a
    much shorter compile than the whole model's, for about the same speed."""
    log_every: int = Field(20, ge=1)
    """Write averaged training metrics every N optimizer steps."""
    eval_every: int = Field(500, ge=1)
    """Evaluate the task every N optimizer steps (finetuning)."""
    checkpoint_every: int = Field(500, ge=1)
    """Save a resumable checkpoint every N optimizer steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep."""
    init_from: str | None = None
    """Start from a previous run's weights: ``"run:<id>"`` or a checkpoint directory."""
    cpu_threads: int | None = Field(None, ge=1, le=1024)
    """torch CPU threads (default: torch's choice)."""
    max_nonfinite_steps: int = Field(10, ge=0)
    """Fail the run once this many optimizer steps in a row had a NaN or infinite loss on any process
    (0: never). A degenerate batch or an fp16 overflow spoils a step and the next ones recover, while
    weights that turned NaN never do: ten in a row tells the two apart and wastes little compute.
    Checked where metrics are logged (every log_every steps) and before each checkpoint."""

    @field_validator("micro_batch_size")
    @classmethod
    def _micro_divides_batch(cls, micro: int | None, info: ValidationInfo) -> int | None:
        batch = info.data.get("batch_size")
        if micro is not None and batch is not None and batch % micro:
            raise ValueError(f"it does not divide train.batch_size = {batch}; an optimizer step accumulates whole "
                             "micro batches, so pick a divisor of batch_size")
        return micro

    @model_validator(mode="after")
    def _compile_keys_need_compile(self) -> "TrainConfig":
        stray = [k for k in _COMPILE_KEYS if k in self.model_fields_set]
        if stray and not self.compile:
            raise ValueError(f"{', '.join(stray)} only appl{'ies' if len(stray) == 1 else 'y'} with compile = true; "
                             f"set train.compile = true, or remove {'it' if len(stray) == 1 else 'them'}")
        return self

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        """The stored config keeps the compile options only when it compiles, so it validates again."""
        data = handler(self)
        if not self.compile:
            for key in _COMPILE_KEYS:
                data.pop(key, None)
        return data


_COMPILE_KEYS = ("compile_mode", "compile_regions")
_STRATEGY_KEYS = {"fsdp": ("fsdp_sharding", "fsdp_offload"), "deepspeed": ("zero_stage", "zero_offload")}


class DistributedConfig(_Section):
    """How the processes of a multi-process run share the model, set on the
    ``accelerate launch`` command line. ``fsdp_*`` keys apply to strategy
    ``fsdp`` only, ``zero_*`` keys to ``deepspeed`` only."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """``ddp``: every process holds the whole model and optimizer (data parallel).
    ``fsdp``: parameters, gradients and optimizer state are sharded over the
    processes (PyTorch FSDP). ``deepspeed``: DeepSpeed ZeRO (needs the
    ``deepspeed`` package where the run trains)."""
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = "full_shard"
    """FSDP: ``full_shard`` shards parameters, gradients and optimizer state;
    ``shard_grad_op`` gradients and optimizer state only; ``hybrid_shard`` shards
    within a machine and replicates across machines; ``no_shard`` is DDP-like."""
    fsdp_offload: bool = False
    """FSDP: keep parameters and gradients in CPU memory between uses (less GPU
    memory, slower steps)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed: ZeRO stage; 1 shards optimizer state, 2 also gradients, 3 also
    parameters (0: plain data parallel)."""
    zero_offload: bool = False
    """DeepSpeed: keep the optimizer state in CPU memory and step it there
    (ZeRO-Offload; needs zero_stage >= 1)."""

    @model_validator(mode="after")
    def _keys_of_strategy(self) -> "DistributedConfig":
        for strategy, keys in _STRATEGY_KEYS.items():
            stray = [k for k in keys if k in self.model_fields_set]
            if stray and self.strategy != strategy:
                raise ValueError(
                    f"{', '.join(stray)} only appl{'ies' if len(stray) == 1 else 'y'} when "
                    f"strategy = \"{strategy}\" (it is \"{self.strategy}\"); remove "
                    f"{'it' if len(stray) == 1 else 'them'} or set strategy = \"{strategy}\""
                )
        if self.zero_offload and self.zero_stage == 0:
            raise ValueError("zero_offload needs zero_stage >= 1 (stage 0 has no optimizer state to offload)")
        return self

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        """The stored config keeps only the keys of the chosen strategy, so it
        validates again as it was written."""
        data = handler(self)
        for strategy, keys in _STRATEGY_KEYS.items():
            if strategy != self.strategy:
                for key in keys:
                    data.pop(key, None)
        return data


class TensorBoardTracking(_Section):
    logging_dir: str = ""
    """Where the event files go, one folder per run id; empty: ``tensorboard/`` in the store, so
    ``tensorboard --logdir $REN_HOME/tensorboard`` shows every run of the store."""


class MLflowTracking(_Section):
    tracking_uri: str = ""
    """The MLflow tracking server (``http://host:5000``) or store (``sqlite:///path.db``); empty:
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///`` a ``mlflow.db`` in the store."""
    experiment: str = ""
    """The MLflow experiment; empty: ``tracking.project``."""


class WandbTracking(_Section):
    mode: Literal["online", "offline"] = "online"
    """``offline`` writes the run under the run's folder for a later ``wandb sync``."""
    entity: str = ""
    """The W&B team or user; empty: the logged-in default."""


class TrackingConfig(_Section):
    """Experiment trackers that get a copy of what the store records, through accelerate's tracker API.
    The store stays the source of truth: a tracker that is missing or cannot be reached gives one
    warning and the run goes on without it."""

    log_with: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ()
    """Trackers to feed, e.g. ``["tensorboard", "mlflow"]``; each needs its extra
    (``pip install 'ren[tensorboard]'``, ``ren[mlflow]``, ``ren[wandb]``)."""
    project: str = Field("ren", min_length=1)
    """The project (TensorBoard: unused; MLflow: the default experiment; W&B: the project)."""
    tensorboard: TensorBoardTracking = TensorBoardTracking()
    """[tracking.tensorboard]: where the event files go."""
    mlflow: MLflowTracking = MLflowTracking()
    """[tracking.mlflow]: the tracking server and experiment."""
    wandb: WandbTracking = WandbTracking()
    """[tracking.wandb]: mode and entity."""

    @field_validator("log_with")
    @classmethod
    def _once_each(cls, log_with: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(log_with)) != len(log_with):
            raise ValueError(f"a tracker is named twice in {list(log_with)}; name each once")
        return log_with


class RunMeta(_Section):
    name: str = Field("run", min_length=1, max_length=80)
    """Human-readable run name (part of the run id)."""
    tags: tuple[str, ...] = ()
    """Free-form labels, shown in `ren runs` and the TUI."""
    notes: str = ""
    """Free-form notes."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed for initialisation, data order and masking (numpy takes seeds below 2**32)."""


class RunConfig(_Section):
    """One fully resolved run."""

    run: RunMeta = RunMeta()
    """[run]: name, tags, notes, seed."""
    model: ModelConfig
    """[model]: the architecture."""
    freeze: FreezeConfig = FreezeConfig()
    """[freeze]: frozen layer groups."""
    objectives: Objectives | None = None
    """[objectives]: pretraining losses (exclusive with [task])."""
    task: TaskConfig | None = None
    """[task]: the finetuning task (exclusive with [objectives])."""
    data: DataConfig = DataConfig()
    """[data]: data set and tokenizer."""
    optim: OptimConfig = OptimConfig()
    """[optim]: optimizer and schedule."""
    train: TrainConfig = TrainConfig()
    """[train]: steps, batch, precision, logging, checkpoints."""
    distributed: DistributedConfig = DistributedConfig()
    """[distributed]: how multi-process runs are sharded (passed to accelerate launch)."""
    tracking: TrackingConfig = TrackingConfig()
    """[tracking]: experiment trackers (TensorBoard, MLflow, W&B) that mirror the run's metrics."""

    @model_validator(mode="after")
    def _stage(self) -> "RunConfig":
        if (self.objectives is None) == (self.task is None):
            raise ValueError(
                "a preset either pretrains ([objectives]) or finetunes ([task]); "
                + ("both are set" if self.objectives else "neither is set")
            )
        if self.objectives and self.objectives.itc and self.model.kind == "one_tower":
            raise ValueError(
                "objectives.itc needs separate text and image embeddings; use "
                "kind = \"two_tower\" or \"dual_encoder\", or drop [objectives.itc]"
            )
        if self.objectives and (self.objectives.itm or self.objectives.itc):
            _check_pairs(self.train)
        positions = _text_positions(self.model)
        if positions and "max_text_len" not in self.data.model_fields_set:
            fitted = self.data.model_copy(update={"max_text_len": min(self.data.max_text_len, positions[1])})
            object.__setattr__(self, "data", fitted)  # a copy: the default DataConfig() is shared
        too_long = positions and text_positions_error(self.data.max_text_len, *positions)
        if too_long:
            raise ValueError(too_long)
        if self.model.kind == "dual_encoder" and self.objectives and (
            self.objectives.mlm or self.objectives.itm
        ):
            raise ValueError(
                "a dual_encoder has no fusion layers, so only objectives.itc applies; "
                "remove [objectives.mlm]/[objectives.itm]"
            )
        if self.data.dataset not in ("easy_vqa", "captions") and self.objectives:
            raise ValueError(
                f"data.dataset = \"{self.data.dataset}\" is a finetuning data set; pretrain on easy_vqa or "
                "dataset = \"captions\", then finetune with [task]"
            )
        if self.task and self.data.dataset not in _TASK_DATASETS[self.task.name]:
            raise ValueError(
                f"task {self.task.name!r} runs on data.dataset = "
                f"{' or '.join(repr(d) for d in _TASK_DATASETS[self.task.name])}, not {self.data.dataset!r}"
            )
        if self.model.kind == "dual_encoder" and self.task:
            raise ValueError(
                f"task {self.task.name!r} needs fusion; finetune a one_tower or two_tower model instead"
            )
        return self

    @property
    def stage(self) -> str:
        return "pretrain" if self.objectives else "finetune"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain TOML/JSON-compatible data."""
        return _drop_none(self.model_dump(mode="json"))


def _check_pairs(train: TrainConfig) -> None:
    """ITM needs another pair to draw a negative from and ITC another pair to contrast with.
    Both see the micro batch gathered over processes, micro_batch_size x processes pairs; the
    number of processes is only known at launch, so a micro batch of 1 is refused outright
    (on one process it leaves every ITM pair a match and the ITC loss 0)."""
    if train.batch_size < 2:
        raise ValueError(f"train.batch_size = {train.batch_size}: [objectives.itm] and [objectives.itc] compare "
                         "each pair with the other pairs of the batch; set batch_size >= 2")
    if train.micro_batch_size == 1:
        raise ValueError("train.micro_batch_size = 1: [objectives.itm] and [objectives.itc] compare each pair with "
                         "the other pairs of the micro batch (gathered over processes), and on one process a micro "
                         "batch of 1 has none; set micro_batch_size >= 2")


def check_processes(train: TrainConfig, processes: int) -> None:
    """Refuse a global batch that ``processes`` processes cannot split into whole micro batches: batch_size must
    be a multiple of micro_batch_size x processes (of processes, when micro_batch_size is unset). Called where the
    number of processes is known: `ren validate --gpus`, `ren run`, `ren submit`, and the trainer itself."""
    batch, micro = train.batch_size, train.micro_batch_size
    if micro is None and batch % processes:
        raise ConfigError(f"train.batch_size = {batch} cannot be split evenly over {processes} processes; make it a "
                          f"multiple of {processes}, or run on a number of processes that divides it.",
                          key="train.batch_size")
    if micro is not None and batch % (micro * processes):
        raise ConfigError(f"train.micro_batch_size = {micro}: train.batch_size = {batch} is not a multiple of "
                          f"micro_batch_size x {processes} processes ({micro * processes}); lower micro_batch_size "
                          "or change batch_size so that it is.", key="train.micro_batch_size")


def _text_positions(model: OneTowerModel | TwoTowerModel | DualEncoderModel) -> tuple[str, int] | None:
    """The key sizing the text position table (and its size) where the preset alone decides it: a manual text
    tower, or a one-tower model's fresh text embedding (a manual or vision backbone, or embeddings = "fresh").
    A pretrained backbone of unset modality is checked when the model is built."""
    if isinstance(model, OneTowerModel):
        b = model.backbone
        if b.source == "manual" or b.modality == "vision" or b.embeddings == "fresh":
            return "model.backbone.max_text_positions", b.max_text_positions
    elif model.text.source == "manual":
        return "model.text.max_positions", model.text.max_positions
    return None


def text_positions_error(max_text_len: int, key: str, positions: int) -> str | None:
    """Why a text of ``data.max_text_len`` tokens does not fit the position table of ``positions`` (set by
    ``key``), or None: a longer text would index past the table mid-run, when the data first holds one."""
    if max_text_len <= positions:
        return None
    return (f"data.max_text_len = {max_text_len} is longer than {key} = {positions}, the size of the text "
            f"position table; raise {key.rsplit('.', 1)[1]} or lower max_text_len")


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------
# Loading: files, extends, overrides
# ----------------------------------------------------------------------------


def load_preset(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (following ``extends``), apply ``key=value`` overrides, validate."""
    path = Path(path)
    raw = _read_with_extends(path, chain=())
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate an already-merged dict (a preset, or a run's stored config)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source), key=_error_key(exc)) from None


def _read_toml(path: Path, via: str = "") -> dict[str, Any]:
    """The TOML table of the preset file ``path``; ``via`` (``"<file>: extends = '...'"``) says where the path
    came from. A UTF-8 byte-order mark is skipped. Anything that is not a regular file is refused before it is
    opened (opening a FIFO would wait for a writer)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if via:
            raise ConfigError(f"{via}, but {path} does not exist (paths are relative to the extending preset).",
                              key="extends") from None
        hint = ""
        presets = Path(__file__).resolve().parent.parent / "presets"
        near = difflib.get_close_matches(path.name, [p.name for p in presets.glob("*.toml")], n=1)
        if near:
            hint = f" Did you mean presets/{near[0]}?"
        raise ConfigError(f"Preset file not found: {path}.{hint}") from None
    except OSError as exc:
        what = "is a symbolic link that loops back on itself" if exc.errno == errno.ELOOP else \
            f"cannot be read ({exc.strerror})"
        raise ConfigError(f"{via + ': ' if via else 'Preset '}{path} {what}; give a preset file.",
                          key="extends" if via else None) from None
    except ValueError as exc:  # a NUL character in an extends string
        raise ConfigError(f"{via}: that is not a file name ({exc}).", key="extends") from None
    if stat.S_ISDIR(info.st_mode):
        if via:
            raise ConfigError(f"{via}: {path} is a directory; extends names a .toml preset file.", key="extends")
        raise ConfigError(f"Preset path {path} is a directory; give a .toml file.")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{via + ': ' if via else 'Preset '}{path} is not a regular file (a device, a FIFO or a "
                          "socket); give a .toml preset file.", key="extends" if via else None)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{via + ': ' if via else ''}Cannot read preset {path}: {exc.strerror}.",
                          key="extends" if via else None) from None
    try:
        return tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    except RecursionError:
        raise ConfigError(f"{path}: its arrays or tables are nested too deeply to read.") from None


def _read_with_extends(path: Path, chain: tuple[Path, ...], via: str = "") -> dict[str, Any]:
    data = _read_toml(path, via)
    resolved = path.resolve()
    if resolved in chain:
        loop = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"Presets extend each other in a loop: {loop}.", key="extends")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a file name string, got {parent!r}.", key="extends")
    if not parent.strip():
        raise ConfigError(f"{path}: extends = {parent!r} names no file; give the preset this one builds on (a path "
                          "relative to this file, e.g. extends = \"quickstart.toml\"), or remove the key.",
                          key="extends")
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    base = _read_with_extends(parent_path, (*chain, resolved), via=f"{path}: extends = {parent!r}")
    return deep_merge(base, data)


_TAGS = ("kind", "source", "strategy")


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value in ``patch`` replaces the base's.

    A table whose tag (``kind`` of the model, ``source`` of a tower) differs from
    the base's replaces the base table whole: keys of a manual tower do not
    leak into the pretrained tower that replaces it, nor two-tower keys into a
    one-tower model.
    """
    out = dict(base)
    for key, value in patch.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and not _retagged(old, value):
            out[key] = deep_merge(old, value)
        else:
            out[key] = value
    return out


def _retagged(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(tag in new and new[tag] != old.get(tag, new[tag]) for tag in _TAGS)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are TOML values;
    anything that does not parse as TOML is taken as a plain string."""
    if "=" not in item:
        raise ConfigError(
            f"--set {item!r} is not of the form KEY=VALUE (e.g. --set optim.lr=3e-4)."
        )
    key, _, text = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key such as train.max_steps.")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return parts, value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    parts, value = parse_override(item)
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {item!r}: {where} is a value, not a table.")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------
# Error messages
# ----------------------------------------------------------------------------


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid preset."]
    for err in exc.errors():
        lines.append(describe_error(err))
    return "\n  ".join(lines)


_LEADING_KEY = re.compile(r"([a-z_]+(?:\.[a-z_]+)+) = ")


def _error_key(exc: ValidationError) -> str | None:
    """The dotted key of the first error (``model.kind`` for a bad or missing kind; ``optim.betas`` for one of
    its items; for a rule over several keys, the key its message opens with); None for errors about the whole
    config."""
    errors = exc.errors()
    if not errors:
        return None
    loc = [part for part in _display_loc(tuple(errors[0]["loc"])) if not part.startswith("[")]
    if errors[0]["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("kind")
    leading = _LEADING_KEY.match(str((errors[0].get("ctx") or {}).get("error", "")))
    if errors[0]["type"] == "value_error" and leading and leading[1].startswith(".".join(loc)):
        return leading[1]
    return ".".join(loc) or None


def _kind_tag(loc: tuple[Any, ...], i: int) -> bool:
    """Whether ``loc[i]`` is the tag pydantic puts after ``model`` (the kind whose schema applied)."""
    return i == 1 and loc[0] == "model" and loc[i] in MODEL_KINDS


def _display_loc(loc: tuple[Any, ...], schema: type[BaseModel] = RunConfig) -> list[str]:
    """The parts of a key as the TOML file writes it: pydantic's tag segment dropped (``model.one_tower.backbone``
    -> ``model.backbone``); an item of a list of values is ``[i]`` (``optim.betas[0]`` once joined), an item of a
    list of tables is ``[[name]] #n``, counted from 1 as the file's ``[[name]]`` headers are."""
    out: list[str] = []
    for i, part in enumerate(loc):
        if _kind_tag(loc, i):
            continue
        if isinstance(part, int) and _schema_at(loc[:i], schema) is not None:
            out = [f"[[{'.'.join(out)}]] #{part + 1}"]
        else:
            out.append(f"[{part}]" if isinstance(part, int) else str(part))
    return out


def _join(loc: list[str]) -> str:
    return ".".join(loc).replace(".[", "[")


def _schema_at(loc: tuple[Any, ...], schema: type[BaseModel] = RunConfig) -> type[BaseModel] | None:
    """The pydantic model describing the table at ``loc`` (a pydantic error location) under ``schema``, or None
    where that is no table the schema names (a value, a list of values, the inside of a free-form table). An
    item of a list of tables has its items' model."""
    model: type[BaseModel] | None = schema
    for i, part in enumerate(loc):
        if model is None:
            return None
        if _kind_tag(loc, i):
            model = MODEL_KINDS[part]
        elif not isinstance(part, int):
            field = model.model_fields.get(part)
            model = _model_type(field.annotation) if field else None
    return model


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_type(arg)
        if found:
            return found
    return None


_PYDANTIC_ERRORS = frozenset(get_args(core_schema.ErrorType))


def describe_error(err: Mapping[str, Any], schema: type[BaseModel] = RunConfig, *, top: str = "(top level)") -> str:
    """One line for one pydantic error (an item of ``ValidationError.errors()``) of a TOML file validated with
    ``schema`` (a preset's :class:`RunConfig`, or a study file's): the key as the file writes it, the value where
    it helps, what is wrong and, for an unknown key, the key meant or the keys valid there. ``top`` names the
    whole file in errors about no one key.

    A validator that wants its own words raises ``ValueError(message)`` (the line is ``key = value: message``,
    or ``message`` alone when a file-wide rule's message starts with ``some.key = ``), or for a sentence that
    goes on from the value, ``PydanticCustomError(type, "must be ...")`` (the line is ``key = value must be ...``).
    """
    raw_loc = tuple(err["loc"])
    loc = _display_loc(raw_loc, schema)
    key = _join(loc) or top
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, name = loc[:-1], loc[-1]
        table = _schema_at(raw_loc[:-1], schema)
        where = ".".join(parent) or "the top level"
        msg = f"unknown key '{key}'"
        if table is not None:
            keys = [field.alias or n for n, field in table.model_fields.items()]
            near = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
            if near:
                msg += f" — did you mean '{'.'.join([*parent, near[0]])}'?"
            elif schema is RunConfig and parent and parent[0] == "model":
                users = [k for k, m in MODEL_KINDS.items() if _accepts(m, parent[1:], name)]
                if users:
                    msg += f" — it does not apply to kind '{raw_loc[1]}' (it belongs to: {', '.join(users)})"
                else:
                    msg += f"; valid keys in {where}: {', '.join(keys)}"
            else:
                msg += f"; valid keys in {where}: {', '.join(keys)}"
        return msg if msg.endswith("?") else msg + "."
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return (
            f"{key}: 'kind' must be one of {', '.join(repr(k) for k in MODEL_KINDS)} "
            f"(got {err.get('input', {}).get('kind') if isinstance(err.get('input'), dict) else None!r})."
        )
    if kind == "missing":
        return f"missing required key '{key}'."
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "finite_number":
        return (f"{key} = {value!r} is not a finite number; give a number (TOML's inf and nan, and the strings "
                "that read as them, mean nothing here).")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return f"{key} = {value!r} is out of range: {err['msg'].lower()}{_range_text(raw_loc, schema)}."
    if kind == "literal_error":
        return f"{key} = {value!r} is not allowed: expected {ctx.get('expected')}."
    if kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
        if not loc and _LEADING_KEY.match(message):
            return f"{message}."
        if loc and not isinstance(value, dict):  # a rule about one value
            return f"{key} = {value!r}: {message}."
        return f"{key}: {message}."
    if kind not in _PYDANTIC_ERRORS:  # a validator's PydanticCustomError
        return f"{key} = {value!r} {err['msg']}."
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float":
        return f"{key} = {value!r} has the wrong type: {err['msg'].lower()}."
    if isinstance(value, dict):
        return f"{key}: {err['msg'].lower()}."
    return f"{key} = {value!r}: {err['msg'].lower()}."


def _accepts(model: type[BaseModel], path: list[str], name: str) -> bool:
    for part in path:
        field = model.model_fields.get(part)
        model = _model_type(field.annotation) if field else None
        if model is None:
            return False
    return name in model.model_fields


def _range_text(loc: tuple[Any, ...], schema: type[BaseModel]) -> str:
    table = _schema_at(loc[:-1], schema)
    field = table.model_fields.get(loc[-1]) if table and isinstance(loc[-1], str) else None
    if field is None:
        return ""
    lo = hi = None
    for meta in field.metadata:
        lo = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else lo
        lo = getattr(meta, "gt", None) if getattr(meta, "gt", None) is not None else lo
        hi = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else hi
        hi = getattr(meta, "lt", None) if getattr(meta, "lt", None) is not None else hi
    if lo is not None and hi is not None:
        return f" (allowed range {lo} to {hi})"
    return ""


# ----------------------------------------------------------------------------
# Reference documentation (docs/presets.md is generated from the schema)
# ----------------------------------------------------------------------------

_REFERENCE_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("run", RunMeta),
    ("model (kind = \"one_tower\")", OneTowerModel),
    ("model.backbone", Backbone),
    ("model (kind = \"two_tower\")", TwoTowerModel),
    ("model (kind = \"dual_encoder\")", DualEncoderModel),
    ("model.text", TextTower),
    ("model.vision", VisionTower),
    ("model.fusion", Fusion),
    ("freeze", FreezeConfig),
    ("objectives.mlm", MLMObjective),
    ("objectives.itm", ITMObjective),
    ("objectives.itc", ITCObjective),
    ("task", TaskConfig),
    ("data", DataConfig),
    ("data.hf", HFDataConfig),
    ("optim", OptimConfig),
    ("train", TrainConfig),
    ("distributed", DistributedConfig),
    ("tracking", TrackingConfig),
    ("tracking.tensorboard", TensorBoardTracking),
    ("tracking.mlflow", MLflowTracking),
    ("tracking.wandb", WandbTracking),
)


def _type_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace(f"{__name__}.", "")  # a section: its class name
    return text.replace("Literal", "one of ").replace("NoneType", "none")


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "table"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("'", '"')


def _range_of(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sym} {getattr(meta, attr)}")
    return ", ".join(parts)


def reference_markdown() -> str:
    """Every preset key with its type, default, allowed range and meaning."""
    out = [
        "# Preset reference",
        "",
        "Generated from `engine/config.py` by `python -m engine.config > docs/presets.md`;",
        "a test keeps it in step with the code. Unknown keys are errors everywhere.",
        "",
    ]
    for title, model in _REFERENCE_SECTIONS:
        out += [f"## [{title}]", ""]
        if model.__doc__ and model.__doc__.strip() and not model.__doc__.startswith(model.__name__ + "("):
            out += [" ".join(model.__doc__.split()), ""]
        out += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            out.append(
                f"| `{name}` | {_type_text(field.annotation).replace('|', 'or')} | {_default_text(field)} "
                f"| {_range_of(field)} | {desc} |"
            )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
