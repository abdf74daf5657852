"""Evaluating a stored run: image-text retrieval on an arrow caption split.

:func:`retrieval_scores` turns a caption split (ViLT's ``f30k_caption`` /
``coco_caption`` Karpathy files: one row per image, all its captions in a list)
into the texts and ``text_to_image`` of :func:`engine.retrieval.evaluate_retrieval`
and feeds it the model through :class:`RetrievalInputs`: texts and images are each run through their tower once
(ITC embeddings for the first stage); for a two_tower model with an ITM head
the tower outputs are kept (on the model's device) and only the fusion layers
run for each reranked pair, as METER's evaluation does. That cache costs
``n_texts x text_len x D_t + n_images x image_tokens x D_v`` floats, e.g.
about 3 GB of texts and 9 GB of images for COCO 5k at 384 px with ViT-B/16.
A dual encoder (no ITM head) is scored by its first stage alone.

:func:`load_run_model` builds a run's model from its stored config and final
weights, after checking that the config has what retrieval needs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engine.config import RunConfig, config_from_dict
from engine.data.arrow import ArrowSource, list_lengths
from engine.data.images import image_transform
from engine.data.transforms import Normalization
from engine.errors import RenError
from engine.models import VLModel
from engine.retrieval import evaluate_retrieval
from engine.store import RunRecord, Store

RECALL_KEYS = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean")


def caption_split(source: ArrowSource, max_images: int | None = None) -> tuple[list[str], list[int]]:
    """Every caption of the first ``max_images`` images (all when None), row by row in
    stored order, and the image (row) index of each caption."""
    where = f"{source.kind.name} arrow data ({', '.join(str(p) for p in source.paths)})"
    if source.kind.text_column != "caption":
        raise RenError(f"{where}: retrieval reads caption corpora (coco_caption, f30k_caption), whose rows hold an "
                       f"image and its list of captions; {source.kind.name} is not one.")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise RenError(f"{where}: max_images must be a positive integer, got {max_images!r}.")
    n = len(source) if max_images is None else min(max_images, len(source))
    if n == 0:
        raise RenError(f"{where}: the split holds no images.")
    captions = source.column("caption").slice(0, n)
    counts = list_lengths(captions)
    empty = [int(i) for i in (counts == 0).nonzero()[0]]
    if empty:
        path, row = source.locate(empty[0])
        raise RenError(f"{path}: row {row} has no captions ({len(empty)} of the first {n} images have none); "
                       "text retrieval needs at least one caption per image.")
    texts = [text for row in captions.to_pylist() for text in row]
    text_to_image = [i for i, count in enumerate(counts.tolist()) for _ in range(count)]
    return texts, text_to_image


class RetrievalInputs:
    """A caption split and a model as the callables :func:`~engine.retrieval.evaluate_retrieval` takes.

    ``texts``/``text_to_image``: every caption of the first ``max_images`` images
    (:func:`caption_split`). Texts are tokenized as training does (``max_text_len``,
    each batch padded to its longest); images decoded (``decode_workers`` threads),
    resized and centre-cropped to ``image_size`` and normalised with ``norm``.
    Tensors go to the model's device. With an ITM head (``rerank``),
    :meth:`embed_texts` and :meth:`embed_images` keep the tower outputs, and
    :meth:`itm_score` runs only the fusion on them. Call under ``torch.no_grad()``
    with the model in eval mode (as :func:`retrieval_scores` does).
    """

    def __init__(self, model: VLModel, tokenizer: PreTrainedTokenizerBase, source: ArrowSource, *, image_size: int,
                 norm: Normalization, max_text_len: int = 40, max_images: int | None = None,
                 decode_workers: int = 4) -> None:
        self.model, self.source, self.norm = model, source, norm
        self.texts, self.text_to_image = caption_split(source, max_images)
        self.n_texts, self.n_images = len(self.texts), self.text_to_image[-1] + 1
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rerank = "itm" in model.heads
        self.decode_workers = max(1, decode_workers)
        t0 = time.perf_counter()
        encoding = tokenizer(self.texts, padding="longest", truncation=True, max_length=max_text_len,
                             return_tensors="pt")
        self.input_ids, self.attention_mask = encoding["input_ids"], encoding["attention_mask"]
        self.tokenize_s = time.perf_counter() - t0
        self.decode_s = 0.0
        self.transform = image_transform(image_size, train=False)
        self._masks = self.attention_mask.to(self.device)
        self._text_cache: Tensor | None = None  # (n_texts, text_len, D_t), zero at padding
        self._image_cache: Tensor | None = None  # (n_images, image_tokens, D_v)

    def _load(self, i: int) -> Tensor:
        image = self.source.image(i)
        if image is None:
            path, row = self.source.locate(i)
            raise RenError(f"{path}: the image of row {row} cannot be decoded; a retrieval benchmark needs every "
                           "image (re-create the file with `ren data prepare`).")
        return self.transform(image)

    def embed_texts(self, span: range) -> Tensor:
        """ITC embeddings of texts ``span``."""
        mask = self.attention_mask[span.start:span.stop]
        columns = mask.any(0)  # drop the columns that are padding in every row of this batch
        tokens = self.model.text_tokens(self.input_ids[span.start:span.stop, columns].to(self.device),
                                        mask[:, columns].to(self.device))
        if self.rerank:
            if self._text_cache is None:
                self._text_cache = tokens.new_zeros((self.n_texts, self.input_ids.shape[1], tokens.shape[2]))
            self._text_cache[span.start:span.stop, columns.to(self.device)] = tokens
        return self.model.project_texts(tokens)

    def embed_images(self, span: range) -> Tensor:
        """ITC embeddings of images ``span``."""
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(self.decode_workers, len(span))) as pool:
            pixels = self.norm.apply(torch.stack(list(pool.map(self._load, span))))
        self.decode_s += time.perf_counter() - t0
        tokens = self.model.image_tokens(pixels.to(device=self.device, dtype=self.dtype))
        if self.rerank:
            if self._image_cache is None:
                self._image_cache = tokens.new_empty((self.n_images, *tokens.shape[1:]))
            self._image_cache[span.start:span.stop] = tokens
        return self.model.project_images(tokens)

    def itm_score(self, text_idx: Tensor, image_idx: Tensor) -> Tensor:
        """ITM log-odds of the pairs (``text_idx[j]``, ``image_idx[j]``), from the kept tower outputs
        (every text and image must have been embedded first)."""
        if self._text_cache is None or self._image_cache is None:
            raise RenError("RetrievalInputs.itm_score: embed every text and image first (the fusion reads the "
                           "kept tower outputs), and only for a model with an ITM head.")
        mask = self._masks[text_idx]
        columns = mask.any(0)
        return self.model.fused_itm_scores(self._text_cache[text_idx][:, columns], mask[:, columns],
                                           self._image_cache[image_idx])


def retrieval_scores(model: VLModel, tokenizer: PreTrainedTokenizerBase, source: ArrowSource, *, image_size: int,
                     norm: Normalization, k: int = 16, batch_size: int = 64, max_text_len: int = 40,
                     max_images: int | None = None, decode_workers: int = 4) -> dict[str, float]:
    """Recall@1/5/10 both ways of ``model`` on the caption split ``source`` (see :class:`RetrievalInputs`).

    The first stage ranks by ITC cosine; with an ITM head, each text's and each
    image's top ``k`` are reranked by the ITM log-odds (:meth:`VLModel.fused_itm_scores`).
    Runs in eval mode without gradients on the model's device; the model's
    train/eval mode is restored afterwards.

    Returns :func:`~engine.retrieval.evaluate_retrieval`'s dict (recalls in
    percent, ``fused_pairs``, ``k``, ``n_texts``, ``n_images``, timings) plus
    ``tokenize_s`` and ``decode_s`` (image decoding and resizing, part of ``embed_s``).
    """
    inputs = RetrievalInputs(model, tokenizer, source, image_size=image_size, norm=norm, max_text_len=max_text_len,
                             max_images=max_images, decode_workers=decode_workers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = evaluate_retrieval(inputs.embed_texts, inputs.embed_images,
                                        inputs.itm_score if inputs.rerank else None, inputs.text_to_image, k,
                                        batch_size)
    finally:
        model.train(was_training)
    return {**scores, "tokenize_s": inputs.tokenize_s, "decode_s": inputs.decode_s}


def check_retrieval_config(cfg: RunConfig, where: str) -> None:
    """A :class:`RenError` unless ``cfg`` builds a model with a retrieval first stage (an ITC head on
    separate towers)."""
    if cfg.model.kind == "one_tower":
        raise RenError(f"{where} is a one_tower model: it encodes text and image together, so it has no separate "
                       "text and image embeddings to rank candidates with (a first stage), and scoring every "
                       "image-text pair with ITM is not supported. Evaluate a two_tower run pretrained with "
                       "[objectives.itc], or a dual_encoder run.")
    if cfg.objectives is None or cfg.objectives.itc is None:
        trained = (f"finetuned on the {cfg.task.name} task" if cfg.task is not None
                   else "pretrained without [objectives.itc]")
        raise RenError(f"{where} was {trained}, so its model has no ITC head and no projected text and image "
                       "embeddings for a retrieval first stage. Pretrain (or finetune on captions with "
                       "data.dataset = \"captions\") with [objectives.itc] to get a first stage, and evaluate "
                       "that run.")


def load_run_model(store: Store, run_id: str, device: torch.device | str = "cpu"
                   ) -> tuple[RunRecord, RunConfig, VLModel, PreTrainedTokenizerBase]:
    """A run's record, config, model (final weights loaded, eval mode, on ``device``) and tokenizer,
    for a retrieval evaluation (see :func:`check_retrieval_config`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.data.pipeline import build_tokenizer, num_answers
    from engine.models import build_model
    from engine.train import FINAL_WEIGHTS

    record = store.get_run(run_id)
    where = f"run {record.id}"
    cfg = config_from_dict(record.config, source=where)
    check_retrieval_config(cfg, where)
    path = Path(store.run_dir(record.id)) / FINAL_WEIGHTS
    if not path.is_file():
        raise RenError(f"{where} has no final weights: {path} does not exist (the run is {record.status}; "
                       f"{FINAL_WEIGHTS} is written when training finishes). Evaluate a finished run, or finish "
                       f"this one with `ren run --resume {record.id}`.")
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, vocab_size=len(tokenizer), num_answers=num_answers(cfg))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RenError(f"{where}: cannot read its final weights {path}: {exc}.") from exc
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of another shape
        detail = " ".join(str(exc).split())
        raise RenError(f"{where}: {path} does not fit the model its stored config builds: {detail}") from exc
    problems = [f"{len(names)} {what} (first: {names[0]})"
                for names, what in ((result.missing_keys, "tensors missing from the file"),
                                    (result.unexpected_keys, "tensors the model does not have")) if names]
    if problems:
        raise RenError(f"{where}: {path} does not fit the model its stored config builds: "
                       f"{'; '.join(problems)}.")
    return record, cfg, model.to(device).eval(), tokenizer
