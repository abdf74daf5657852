"""From a run config to datasets and a tokenizer.

``build_tokenizer`` is cheap (it reads only text) so ``ren validate`` can use it;
``build_data`` also decodes (or loads the cached) images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from engine.config import RunConfig
from engine.data.datasets import CaptionDataset, VQADataset
from engine.data.easyvqa import easy_vqa_captions, load_easy_vqa
from engine.data.tokenizer import build_word_tokenizer, load_tokenizer
from engine.data.transforms import Normalization, resolve_normalization
from engine.errors import ConfigError


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset
    tokenizer: PreTrainedTokenizerBase
    num_answers: int | None
    answers: list[str] | None

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
    from engine.models.hf import load_hf_config, modality_of

    return name is not None and modality_of(load_hf_config(name, "model.backbone.name")) == "text"


def build_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    if cfg.data.tokenizer != "auto":
        return load_tokenizer(cfg.data.tokenizer)
    source = pretrained_text_source(cfg)
    if source is not None:
        return load_tokenizer(source)
    if cfg.data.dataset != "easy_vqa":
        raise ConfigError(
            f"data.tokenizer = \"auto\" needs a pretrained text backbone to take the tokenizer from; with "
            f"a manual or random text side on {cfg.data.dataset}, set data.tokenizer to a hub id or directory "
            "(e.g. \"bert-base-uncased\")."
        )
    return _easy_vqa_word_tokenizer()


@lru_cache(maxsize=1)
def _easy_vqa_word_tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer over all easy-VQA questions and derived captions.

    Built from the package's text only (deterministic, no images needed)."""
    import easy_vqa

    from engine.data.easyvqa import CAPTION_TEMPLATES, PALETTE, SHAPES

    texts = list(easy_vqa.get_train_questions()[0]) + list(easy_vqa.get_test_questions()[0])
    texts += [t.format(colour=c, shape=s) for t in CAPTION_TEMPLATES for c in PALETTE for s in SHAPES]
    return build_word_tokenizer(texts)


VQAV2_ANSWERS = 3129  # ViLT's and METER's vocabulary: answers given 9+ times in train+val


def num_answers(cfg: RunConfig) -> int | None:
    """The size of the answer head (for reports built without the data; training
    takes it from the data's own vocabulary)."""
    if cfg.task is None or cfg.task.name != "vqa":
        return None
    if cfg.data.dataset == "vqav2":
        return VQAV2_ANSWERS
    import easy_vqa

    return len(easy_vqa.get_answers())


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
        splits = [data.train, data.split(cfg.data.eval_split)]
        train_ds, eval_ds = (
            VQADataset(s.images, s.image_index, s.questions, s.answer_ids, len(data.answers), tokenizer, max_len, size,
                       norm)
            for s in splits
        )
        return DataBundle(train_ds, eval_ds, tokenizer, len(data.answers), list(data.answers))
    corpora = [("train", data.train), (cfg.data.eval_split, data.split(cfg.data.eval_split))]
    train_ds, eval_ds = (
        CaptionDataset(split.images, corpus.image_index, corpus.texts, tokenizer, max_len, size, norm)
        for name, split in corpora
        for corpus in [easy_vqa_captions(data, name)]
    )
    return DataBundle(train_ds, eval_ds, tokenizer, None, None)


def _vqav2(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization) -> DataBundle:
    from engine.data.images import image_transform
    from engine.data.vqav2 import ArrowVQADataset, answer_vocabulary, open_split

    train, evaluate = open_split(cfg.data.root, cfg.data.train_split), open_split(cfg.data.root, cfg.data.eval_split)
    answers = answer_vocabulary([train])
    train_tf = image_transform(size, train=True, randaugment=cfg.data.augment == "randaugment")
    eval_tf = image_transform(size, train=False)
    max_len = cfg.data.max_text_len
    return DataBundle(ArrowVQADataset(train, tokenizer, max_len, train_tf, norm, len(answers)),
                      ArrowVQADataset(evaluate, tokenizer, max_len, eval_tf, norm, len(answers)),
                      tokenizer, len(answers), answers)


def _classification(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int,
                    norm: Normalization) -> DataBundle:
    """SNLI-VE or NLVR2 from arrow files: class ids as labels, names as answers."""
    from engine.data import nlvr2, snli_ve
    from engine.data.images import image_transform

    module, dataset = ((snli_ve, snli_ve.ArrowSNLIVEDataset) if cfg.data.dataset == "snli_ve"
                       else (nlvr2, nlvr2.ArrowNLVR2Dataset))
    names = list(snli_ve.LABELS if cfg.data.dataset == "snli_ve" else nlvr2.ANSWERS)
    train_tf = image_transform(size, train=True, randaugment=cfg.data.augment == "randaugment")
    eval_tf = image_transform(size, train=False)
    max_len = cfg.data.max_text_len
    train = dataset(module.open_split(cfg.data.root, cfg.data.train_split), tokenizer, max_len, train_tf, norm)
    evaluate = dataset(module.open_split(cfg.data.root, cfg.data.eval_split), tokenizer, max_len, eval_tf, norm)
    return DataBundle(train, evaluate, tokenizer, None, names)


def _captions(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization) -> DataBundle:
    """Pretraining corpora from arrow files; the eval set is the eval split of the
    corpora that have one (COCO's Karpathy val, Flickr30k's test, CC's val)."""
    from engine.data.arrow import arrow_kind
    from engine.data.captions import ArrowCaptionDataset, open_corpus
    from engine.data.images import image_transform

    root, corpora = cfg.data.root, cfg.data.corpora
    train = [open_corpus(root, corpus, cfg.data.train_split) for corpus in corpora]
    with_eval = [c for c in corpora if cfg.data.eval_split in arrow_kind(c).vilt_splits]
    if not with_eval:
        raise ConfigError(f"data.eval_split = {cfg.data.eval_split!r}: none of the corpora {', '.join(corpora)} has "
                          "such a split; add coco_caption, f30k_caption or cc, or choose another eval_split.")
    evaluate = [open_corpus(root, corpus, cfg.data.eval_split) for corpus in with_eval]
    train_tf = image_transform(size, train=True, randaugment=cfg.data.augment == "randaugment")
    max_len = cfg.data.max_text_len
    return DataBundle(ArrowCaptionDataset(train, tokenizer, max_len, train_tf, norm),
                      ArrowCaptionDataset(evaluate, tokenizer, max_len, image_transform(size, train=False), norm),
                      tokenizer, None, None)


def _refcoco(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, size: int, norm: Normalization) -> DataBundle:
    """RefCOCO/RefCOCO+/RefCOCOg from arrow files; whole images, so every candidate box is in view."""
    from engine.data.images import whole_image_transform
    from engine.data.refcoco import ArrowRefCOCODataset, open_split

    transform, max_len = whole_image_transform(size), cfg.data.max_text_len
    train, evaluate = (ArrowRefCOCODataset(open_split(cfg.data.root, split, cfg.data.dataset), tokenizer, max_len,
                                           transform, norm)
                       for split in (cfg.data.train_split, cfg.data.eval_split))
    return DataBundle(train, evaluate, tokenizer, None, None)
