"""Tokenizers: a word-level one built from a corpus, and pretrained ones loaded offline."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from engine.errors import ModelLoadError
from engine.hub import hub_kwargs
from engine.recipes import built_dir, is_ren_model, recipe_of

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)


def build_word_tokenizer(texts: Iterable[str], *, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer whose vocabulary is every word in ``texts``.

    Text is (optionally) lowercased and split on whitespace and punctuation;
    each word or punctuation mark is one token. Ids: [PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3, [MASK]=4, then the words in sorted order. Encoding adds
    ``[CLS] ... [SEP]`` (``[CLS] a [SEP] b [SEP]`` for pairs), like BERT.
    """
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    normalizer = normalizers.Lowercase() if lowercase else None
    words: set[str] = set()
    for text in texts:
        normalized = normalizer.normalize_str(text) if normalizer else text
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalized))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)

    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    if normalizer:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        padding_side="right",
        clean_up_tokenization_spaces=True,
    )


def load_tokenizer(name_or_path: str, key: str = "model.text.name") -> PreTrainedTokenizerBase:
    """Load a fast tokenizer from a Hugging Face Hub id, a local directory or a text model ren builds
    (``ren:easyvqa-bert``: its tokenizer needs no training, so this never builds the model). ``key`` is
    the preset key that named it, for the error message.

    Raises:
        ModelLoadError: The tokenizer cannot be loaded (hub unreachable or no
            such model, directory missing or incomplete) or has no fast version.
    """
    if is_ren_model(name_or_path):
        return _ren_tokenizer(name_or_path)
    local = Path(name_or_path).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(local) if local.is_dir() else name_or_path, use_fast=True, **hub_kwargs(name_or_path)
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_failure(name_or_path, local, error, key)) from error
    if not tokenizer.is_fast:
        raise ModelLoadError(
            f"The tokenizer {name_or_path!r} has no fast (Rust) version, which whole-word masking "
            "needs (word_ids()); choose a model whose tokenizer ships a tokenizer.json."
        )
    return tokenizer


def _ren_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a text model ren builds: the built one's, else the recipe's (the easy-VQA word tokenizer)."""
    if recipe_of(name) != "easyvqa-bert":
        raise ModelLoadError(
            f"{name!r} is a vision model and has no tokenizer; name a text model (ren:easyvqa-bert) or leave "
            "data.tokenizer = \"auto\"."
        )
    path = built_dir(name)
    if path is None:
        return easy_vqa_word_tokenizer()
    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def _load_failure(name_or_path: str, local: Path, error: Exception, key: str) -> str:
    """The one-paragraph message for a tokenizer that could not be loaded; ``key`` is the preset key that named it."""
    cause = " ".join(str(error).split())
    fix = f'point the preset at a local directory holding it, e.g. {key} = "/path/to/dir"'
    if local.is_dir():
        return (
            f"Could not load the tokenizer {name_or_path!r} ({key}): the directory {local} exists but holds no "
            f"loadable tokenizer ({cause}). It needs the files save_pretrained() writes "
            f"(tokenizer.json, tokenizer_config.json); {fix}."
        )
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        return (
            f"Could not load the tokenizer {name_or_path!r} ({key}): the directory {local} does not exist. "
            f"Check the path, or {fix}."
        )
    return (
        f"Could not load the tokenizer {name_or_path!r} ({key}): it is not a local directory, and the "
        f"Hugging Face Hub could not be reached or has no such model ({cause}). To work offline, "
        f"download it once where the network is available (e.g. `hf download {name_or_path} "
        f"--local-dir /path/to/dir`) and {fix}."
    )


@lru_cache(maxsize=1)
def easy_vqa_word_tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer over all easy-VQA questions and derived captions.

    Built from the package's text only (deterministic, no images needed)."""
    import easy_vqa

    from engine.data.easyvqa import CAPTION_TEMPLATES, PALETTE, SHAPES

    texts = list(easy_vqa.get_train_questions()[0]) + list(easy_vqa.get_test_questions()[0])
    texts += [t.format(colour=c, shape=s) for t in CAPTION_TEMPLATES for c in PALETTE for s in SHAPES]
    return build_word_tokenizer(texts)
