"""From a run config to datasets and a tokenizer.

``build_tokenizer`` is cheap (it reads only text) so ``ren validate`` can use it;
``build_data`` also decodes (or loads the cached) images. ``eval_dataset`` reads
any one split of a task run's data set as training's evaluation reads its
eval split (``ren eval task``). Each arrow data set is built split by split by
``_split_set``, which both use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from engine.config import RunConfig
from engine.data.datasets import CaptionDataset, VQADataset
from engine.data.easyvqa import RUN_SPLITS as EASY_VQA_SPLITS
from engine.data.easyvqa import EasyVQA, load_easy_vqa, run_split_captions, run_split_rows
from engine.data.tokenizer import build_word_tokenizer, easy_vqa_word_tokenizer, load_tokenizer
from engine.data.transforms import Normalization, resolve_normalization
from engine.errors import ConfigError, RenError

if TYPE_CHECKING:
    from engine.data.arrow import ArrowSource
    from engine.data.hf_source import HFSource


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset
    tokenizer: PreTrainedTokenizerBase
    num_answers: int | None
    answers: list[str] | None
    test: Dataset | None = None  # scored once after training, never during it (easy-VQA's test split)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def mask_token_id(self) -> int:
        return int(self.tokenizer.mask_token_id)

    @property
    def num_special_tokens(self) -> int:
        """Ids below this are special tokens (never drawn as random MLM replacements)."""
        return max(self.tokenizer.all_special_ids) + 1


def image_size_of(cfg: RunConfig) -> int:
    model = cfg.model
    if model.kind == "one_tower":
        return model.backbone.image_size
    return model.vision.image_size


def pretrained_text_source(cfg: RunConfig) -> str | None:
    """The hub id/directory whose tokenizer the text side uses, if pretrained."""
    model = cfg.model
    if model.kind == "one_tower":
        b = model.backbone
        return b.name if b.source != "manual" and b.modality != "vision" and _is_text_model(b.name) else None
    return model.text.name if model.text.source != "manual" else None


def _is_text_model(name: str | None) -> bool:
    from engine.backbones import load_hf_config, modality_of

    return name is not None and modality_of(load_hf_config(name, "model.backbone.name")) == "text"


def build_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer: ``data.tokenizer`` when named; with ``auto``, the pretrained text backbone's
    own, else a word-level tokenizer built from the data's text (:func:`describe_tokenizer`)."""
    if cfg.data.tokenizer != "auto":
        return load_tokenizer(cfg.data.tokenizer, "data.tokenizer")
    source = pretrained_text_source(cfg)
    if source is not None:
        return load_tokenizer(source)
    if cfg.data.dataset == "easy_vqa":
        return easy_vqa_word_tokenizer()
    return _data_word_tokenizer(cfg)


def describe_tokenizer(cfg: RunConfig) -> str:
    """Which tokenizer :func:`build_tokenizer` builds for ``cfg``, in words (for ``ren show``)."""
    if cfg.data.tokenizer != "auto":
        return f"{cfg.data.tokenizer} (data.tokenizer)"
    source = pretrained_text_source(cfg)
    if source is not None:
        return f"{source} (the pretrained text backbone's, data.tokenizer = \"auto\")"
    if cfg.data.dataset == "easy_vqa":
        return "word-level, built from easy-VQA's questions and captions (data.tokenizer = \"auto\")"
    corpora = ", ".join(_text_kinds(cfg))
    return (f"word-level, built from the text of the {cfg.data.train_split!r} split of {corpora} "
            "(data.tokenizer = \"auto\")")


_WORD_TOKENIZERS: dict[tuple, PreTrainedTokenizerBase] = {}  # reading every training text once per process


def _data_word_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    """Word-level tokenizer over every text of the training split (all of its corpora for caption
    pretraining): deterministic, as the vocabulary is sorted, and the same for evaluation, which
    rebuilds it from the same files."""
    kinds = _text_kinds(cfg)
    key = (kinds, cfg.data.train_split, cfg.data.root, cfg.data.hf.model_dump_json() if cfg.data.hf else None)
    if key not in _WORD_TOKENIZERS:
        texts = [text for kind in kinds for text in _split_texts(open_source(cfg, kind, cfg.data.train_split), kind)]
        _WORD_TOKENIZERS[key] = build_word_tokenizer(texts)
    return _WORD_TOKENIZERS[key]


def _text_kinds(cfg: RunConfig) -> tuple[str, ...]:
    """The arrow kinds whose text the run trains on."""
    return tuple(cfg.data.corpora) if cfg.data.dataset == "captions" else (cfg.data.dataset,)


def _split_texts(source: ArrowSource | HFSource, kind: str) -> list[str]:
    """Every text of ``source``: its kind's text column (ViLT's ``text_column_name``), flattened."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.data.arrow import arrow_kind

    column = source.column(arrow_kind(kind).text_column)
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_flatten(column)
    return [text for text in column.to_pylist() if text]


VQAV2_ANSWERS = 3129  # ViLT's and METER's vocabulary: answers given 9+ times in train+val


def num_answers(cfg: RunConfig) -> int | None:
    """The size of the VQA answer head as training builds it (:func:`answer_head`)."""
    return answer_head(cfg)[0]


def answer_head(cfg: RunConfig) -> tuple[int | None, str]:
    """The size of the VQA answer head as training builds it, from the data's own vocabulary
    (:func:`task_answers`), and where that size came from; ``(None, "")`` without a VQA task. VQAv2
    data that cannot be read here (``ren validate`` on another machine) gives ViLT's 3,129, said so."""
    if cfg.task is None or cfg.task.name != "vqa":
        return None, ""
    try:
        answers = task_answers(cfg)
    except RenError as exc:
        if cfg.data.dataset != "vqav2":
            raise
        return VQAV2_ANSWERS, f"ViLT's VQAv2 vocabulary; the training data cannot be read here ({exc})"
    assert answers is not None  # a VQA task always has an answer list
    if cfg.data.dataset == "easy_vqa":
        return len(answers), "easy-VQA's answers"
    return len(answers), f"the answers of the {cfg.data.train_split!r} split's files"


def build_data(cfg: RunConfig, *, cache_dir: Path) -> DataBundle:
    tokenizer = build_tokenizer(cfg)
    size = image_size_of(cfg)
    max_len = cfg.data.max_text_len
    norm = resolve_normalization(cfg)
    if cfg.data.dataset == "vqav2":
        return _vqav2(cfg, tokenizer, size, norm)
    if cfg.data.dataset in ("snli_ve", "nlvr2"):
        return _classification(cfg, tokenizer, size, norm)
    if cfg.data.dataset == "captions":
        return _captions(cfg, tokenizer, size, norm)
    if cfg.data.dataset in ("refcoco", "refcoco+", "refcocog"):
        return _refcoco(cfg, tokenizer, size, norm)
    data = load_easy_vqa(cache_dir)
    if cfg.task is not None:
        train_ds, eval_ds = (_easy_vqa_set(cfg, data, name, tokenizer)
                             for name in (cfg.data.train_split, cfg.data.eval_split))
        test_ds = _easy_vqa_set(cfg, data, "test", tokenizer) if cfg.data.eval_split != "test" else None
        return DataBundle(train_ds, eval_ds, tokenizer, len(data.answers), list(data.answers), test_ds)
    train_ds, eval_ds = (
        CaptionDataset(split.images, corpus.image_index, corpus.texts, tokenizer, max_len, size, norm,
                       text_keys=corpus.meaning_keys())
        for split, corpus in (run_split_captions(data, name, hold_out_val=_holds_out_val(cfg))
                              for name in (cfg.data.train_split, cfg.data.eval_split))
    )
    return DataBundle(train_ds, eval_ds, tokenizer, None, None)


def _easy_vqa_set(cfg: RunConfig, data: EasyVQA, split: str, tokenizer: PreTrainedTokenizerBase) -> VQADataset:
    """easy-VQA's run split ``split`` (``train``, ``val`` or ``test``) as a VQA data set."""
    package, rows = run_split_rows(data, split, hold_out_val=_holds_out_val(cfg))
    s = data.split(package).subset(rows)
    names = [f"easy_vqa {package}/images/{row}.png" for row in rows.tolist()]  # the package's image ids are its rows
    return VQADataset(s.images, s.image_index, s.questions, s.answer_ids, len(data.answers), tokenizer,
                      cfg.data.max_text_len, image_size_of(cfg), resolve_normalization(cfg), image_names=names)


def _holds_out_val(cfg: RunConfig) -> bool:
    """Whether easy-VQA's train split gives up its validation images: not for a run that evaluates
    on test, as runs made before "val" existed do (so they resume on the data they started on)."""
    return cfg.data.eval_split != "test"


@dataclass
class EvalSplit:
    """One split of a task run's data set, read as training's evaluation reads its eval split."""

    dataset: Dataset
    answers: list[str] | None  # what the head's outputs mean (see :func:`task_answers`)
    labelled: bool  # False for a VQAv2 test split (no answers): predictions only, no score


def eval_dataset(cfg: RunConfig, split: str, *, tokenizer: PreTrainedTokenizerBase | None = None,
                 answers: list[str] | None = None, cache_dir: Path | None = None) -> EvalSplit:
    """Split ``split`` of ``cfg``'s task data set, with the evaluation transform and the run's tokenizer
    (built from ``cfg`` when not given): for file-backed data sets ``a+b`` joins splits; easy_vqa has
    ``train``, ``val`` and ``test`` (:meth:`EasyVQA.run_split`; decoded images cached in ``cache_dir``).
    VQA labels index the run's training vocabulary: ``answers`` when given (e.g. stored with the run),
    else :func:`task_answers`."""
    if cfg.task is None:
        raise ConfigError("eval_dataset reads a task's data; this config has no [task] (a pretraining run).")
    tokenizer = tokenizer or build_tokenizer(cfg)
    answers = answers if answers is not None else task_answers(cfg)
    if cfg.data.dataset == "easy_vqa":
        if split not in EASY_VQA_SPLITS:
            raise ConfigError(f"easy_vqa has the splits {', '.join(EASY_VQA_SPLITS)}; there is no split {split!r}.")
        if cache_dir is None:
            raise ValueError("eval_dataset needs cache_dir to read easy_vqa (where its decoded images are cached)")
        return EvalSplit(_easy_vqa_set(cfg, load_easy_vqa(cache_dir), split, tokenizer), answers, True)
    size, norm = image_size_of(cfg), resolve_normalization(cfg)
    dataset = _split_set(cfg, split, tokenizer, size, norm, train=False,
                         answers=answers if cfg.task.name == "vqa" else None)
    return EvalSplit(dataset, answers, cfg.data.dataset != "vqav2" or _has_answers(dataset.source))


def task_answers(cfg: RunConfig) -> list[str] | None:
    """What a task's head outputs mean, by index, as training builds it: easy-VQA's 13 answers, the
    VQAv2 answer vocabulary (read from the train split), SNLI-VE's and NLVR2's class names; None for
    RefCOCO (one output per candidate box)."""
    from engine.data import nlvr2, snli_ve

    if cfg.task is None or cfg.data.dataset not in ("easy_vqa", "vqav2", "snli_ve", "nlvr2"):
        return None
    if cfg.data.dataset == "easy_vqa":
        import easy_vqa

        return list(easy_vqa.get_answers())
    if cfg.data.dataset == "vqav2":
        from engine.data.vqav2 import answer_vocabulary

        return answer_vocabulary([open_source(cfg, "vqav2", cfg.data.train_split)])
    return list(snli_ve.LABELS if cfg.data.dataset == "snli_ve" else nlvr2.ANSWERS)


def _has_answers(source: ArrowSource | HFSource) -> bool:
    """Whether a VQAv2 split has answers (ViLT's test and test-dev files have none); a :class:`RenError`
    for files that mix answered and answerless rows."""
    import pyarrow as pa

    from engine.data.arrow import list_lengths

    mixed = (f"{', '.join(map(str, source.paths))} mix answered (train, val) and answerless (test, test-dev) "
             "VQAv2 rows; evaluate them separately.")
    asked = list_lengths(source.column("questions")) > 0
    try:
        answered = list_lengths(source.column("answer_labels")) > 0
    except pa.ArrowTypeError:  # a test file's answer columns are list<null>, a val file's list<list<int>>
        raise RenError(mixed) from None
    if bool((asked & answered).any()) and bool((asked & ~answered).any()):
        path, row = source.locate(int((asked & ~answered).nonzero()[0][0]))
        raise RenError(f"{path} row {row} has questions but no answers: {mixed}")
    return bool(answered.any())


def open_source(cfg: RunConfig, kind: str, split: str, *, answers: list[str] | None = None) -> ArrowSource | HFSource:
    """The rows of ``split`` (``a+b`` joins splits) of the data of arrow kind ``kind`` (``vqav2``,
    ``coco_caption``, ``refcoco+``, ...): from the Hugging Face data set of ``[data.hf]`` when there is
    one, else from the arrow files in ``data.root`` (a caption corpus's ``train``/``val``/``test`` are the
    files ViLT reads for them). ``answers``: the VQAv2 vocabulary an HF split is labelled with (default:
    its own, by ViLT's rule); arrow files carry their labels."""
    if cfg.data.hf is not None:
        from engine.data.hf_source import open_hf

        source = open_hf(cfg.data.hf, kind, split, answers=answers)
    else:
        from engine.data.arrow import find_arrow_files, open_arrow
        from engine.data.captions import CORPORA, open_corpus

        source = (open_corpus(cfg.data.root, kind, split) if kind in CORPORA
                  else open_arrow(find_arrow_files(cfg.data.root, kind, split), kind))
    if len(source) == 0:
        files = ", ".join(map(str, source.paths))
        raise RenError(f"The {split!r} split of the {kind} data has no rows: {files} "
                       f"{'holds' if len(source.paths) == 1 else 'hold'} none. Check that "
                       f"{'it was' if len(source.paths) == 1 else 'they were'} written completely "
                       "(`ren data prepare --force` rewrites them).")
    return source


def _split_set(cfg: RunConfig, split: str, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization, *,
               train: bool, answers: list[str] | None = None) -> Dataset:
    """Split ``split`` of ``cfg``'s file-backed task data set, with training's transform (``train``) or the
    evaluation one; ``answers``: the VQA vocabulary."""
    from engine.data import nlvr2, refcoco, snli_ve, vqav2
    from engine.data.images import image_transform, whole_image_transform

    dataset, max_len = cfg.data.dataset, cfg.data.max_text_len
    if dataset in refcoco.DATASETS:  # whole images, so every candidate box stays in view
        return refcoco.ArrowRefCOCODataset(open_source(cfg, dataset, split), tokenizer, max_len,
                                           whole_image_transform(size), norm)
    transform = image_transform(size, train=train, augment=cfg.data.augment)
    if dataset == "vqav2":
        return vqav2.ArrowVQADataset(open_source(cfg, dataset, split, answers=answers), tokenizer, max_len, transform,
                                     norm, len(answers or ()), None if train else answers)
    cls = snli_ve.ArrowSNLIVEDataset if dataset == "snli_ve" else nlvr2.ArrowNLVR2Dataset
    return cls(open_source(cfg, dataset, split), tokenizer, max_len, transform, norm)


def _vqav2(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization) -> DataBundle:
    answers = task_answers(cfg)
    train, evaluate = (_split_set(cfg, split, tokenizer, size, norm, train=train, answers=answers)
                       for split, train in ((cfg.data.train_split, True), (cfg.data.eval_split, False)))
    return DataBundle(train, evaluate, tokenizer, len(answers), answers)


def _classification(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int,
                    norm: Normalization) -> DataBundle:
    """SNLI-VE or NLVR2 from arrow files: class ids as labels, names as answers."""
    train, evaluate = (_split_set(cfg, split, tokenizer, size, norm, train=train)
                       for split, train in ((cfg.data.train_split, True), (cfg.data.eval_split, False)))
    return DataBundle(train, evaluate, tokenizer, None, task_answers(cfg))


def _captions(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization) -> DataBundle:
    """Pretraining corpora from arrow files; the eval set is the eval split of the
    corpora that have one (COCO's Karpathy val, Flickr30k's test, CC's val)."""
    from engine.data.arrow import arrow_kind
    from engine.data.captions import ArrowCaptionDataset
    from engine.data.images import image_transform

    corpora = cfg.data.corpora
    train = [open_source(cfg, corpus, cfg.data.train_split) for corpus in corpora]
    with_eval = [c for c in corpora if cfg.data.hf is not None or cfg.data.eval_split in arrow_kind(c).vilt_splits]
    if not with_eval:
        raise ConfigError(f"data.eval_split = {cfg.data.eval_split!r}: none of the corpora {', '.join(corpora)} has "
                          "such a split; add coco_caption, f30k_caption or cc, or choose another eval_split.")
    evaluate = [open_source(cfg, corpus, cfg.data.eval_split) for corpus in with_eval]
    train_tf = image_transform(size, train=True, augment=cfg.data.augment)
    max_len = cfg.data.max_text_len
    return DataBundle(ArrowCaptionDataset(train, tokenizer, max_len, train_tf, norm),
                      ArrowCaptionDataset(evaluate, tokenizer, max_len, image_transform(size, train=False), norm),
                      tokenizer, None, None)


def _refcoco(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization) -> DataBundle:
    """RefCOCO/RefCOCO+/RefCOCOg from arrow files; whole images, so every candidate box is in view."""
    train, evaluate = (_split_set(cfg, split, tokenizer, size, norm, train=train)
                       for split, train in ((cfg.data.train_split, True), (cfg.data.eval_split, False)))
    return DataBundle(train, evaluate, tokenizer, None, None)
