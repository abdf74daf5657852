"""Evaluating a stored run: image-text retrieval on an arrow caption split, and a finetuned
run's task on any split of its data set.

:func:`retrieval_scores` feeds a Karpathy caption split to :func:`engine.retrieval.evaluate_retrieval`,
caching tower outputs so a two-tower reranks by fusion alone (as METER's evaluation does); a model with no
first stage of its own reranks another run's (``first_stage``). :func:`task_scores` scores a finetuned run
with training's own per-batch scoring (:func:`engine.train.score_batch`). What ``ren eval`` does and costs:
docs/tasks-and-data.md, "Image–text retrieval" and "Task scores on any split".
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engine.config import RunConfig, config_from_dict
from engine.data.arrow import ArrowSource, list_lengths
from engine.data.images import ImageTransform, image_transform
from engine.data.pipeline import EvalSplit
from engine.data.transforms import Normalization
from engine.errors import ConfigError, RenError
from engine.models import VLModel
from engine.models.two_tower import TwoTower
from engine.predictions import SplitPredictions
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


def _decode(source: ArrowSource, transform: ImageTransform, i: int) -> Tensor:
    image = source.image(i)
    if image is None:
        path, row = source.locate(i)
        raise RenError(f"{path}: the image of row {row} cannot be decoded; a retrieval benchmark needs every "
                       "image (re-create the file with `ren data prepare`).")
    return transform(image)


@dataclass(frozen=True)
class RunModel:
    """A model with its run's preprocessing: tokenizer, text length, image size and normalisation."""

    model: VLModel
    tokenizer: PreTrainedTokenizerBase
    image_size: int
    norm: Normalization
    max_text_len: int = 40

    @classmethod
    def of(cls, cfg: RunConfig, model: VLModel, tokenizer: PreTrainedTokenizerBase) -> RunModel:
        """``model`` preprocessed as ``cfg`` says."""
        from engine.data.pipeline import image_size_of
        from engine.data.transforms import resolve_normalization

        return cls(model, tokenizer, image_size_of(cfg), resolve_normalization(cfg), cfg.data.max_text_len)


class RetrievalInputs:
    """A caption split and a model as the callables :func:`~engine.retrieval.evaluate_retrieval` takes.

    ``texts``/``text_to_image``: every caption of the first ``max_images`` images
    (:func:`caption_split`). Texts are tokenized as training does (``max_text_len``,
    each batch padded to its longest); images decoded (``decode_workers`` threads),
    resized and centre-cropped to ``image_size`` and normalised with ``norm``.
    Tensors go to the model's device. With an ITM head (``rerank``),
    :meth:`embed_texts` and :meth:`embed_images` keep the tower outputs, and
    :meth:`itm_score` runs only the fusion on them (``rerank=False``: keep nothing,
    for a first stage only). Call under ``torch.no_grad()`` with the model in eval
    mode (as :func:`retrieval_scores` does).
    """

    def __init__(self, model: VLModel, tokenizer: PreTrainedTokenizerBase, source: ArrowSource, *, image_size: int,
                 norm: Normalization, max_text_len: int = 40, max_images: int | None = None,
                 decode_workers: int = 4, rerank: bool = True) -> None:
        self.model, self.source, self.norm = model, source, norm
        self.texts, self.text_to_image = caption_split(source, max_images)
        self.n_texts, self.n_images = len(self.texts), self.text_to_image[-1] + 1
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rerank = rerank and "itm" in model.heads
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
        return _decode(self.source, self.transform, i)

    def embed_texts(self, span: range) -> Tensor:
        """ITC embeddings of texts ``span``."""
        return self.model.project_texts(self._text_tokens(span))

    def embed_images(self, span: range) -> Tensor:
        """ITC embeddings of images ``span``."""
        return self.model.project_images(self._image_tokens(span))

    def encode_towers(self, batch_size: int) -> None:
        """Run every text and image through its tower once and keep the outputs, for :meth:`itm_score`
        when another model's first stage picks the candidates."""
        for n, encode in ((self.n_texts, self._text_tokens), (self.n_images, self._image_tokens)):
            for start in range(0, n, batch_size):
                encode(range(start, min(n, start + batch_size)))

    def _text_tokens(self, span: range) -> Tensor:
        mask = self.attention_mask[span.start:span.stop]
        columns = mask.any(0)  # drop the columns that are padding in every row of this batch
        tokens = self.model.text_tokens(self.input_ids[span.start:span.stop, columns].to(self.device),
                                        mask[:, columns].to(self.device))
        if self.rerank:
            if self._text_cache is None:
                self._text_cache = tokens.new_zeros((self.n_texts, self.input_ids.shape[1], tokens.shape[2]))
            self._text_cache[span.start:span.stop, columns.to(self.device)] = tokens
        return tokens

    def _image_tokens(self, span: range) -> Tensor:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(self.decode_workers, len(span))) as pool:
            pixels = self.norm.apply(torch.stack(list(pool.map(self._load, span))))
        self.decode_s += time.perf_counter() - t0
        tokens = self.model.image_tokens(pixels.to(device=self.device, dtype=self.dtype))
        if self.rerank:
            if self._image_cache is None:
                self._image_cache = tokens.new_empty((self.n_images, *tokens.shape[1:]))
            self._image_cache[span.start:span.stop] = tokens
        return tokens

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


class PairwiseITM:
    """ITM log-odds of (text, image) pairs of a caption split, each pair run through the whole model
    (:meth:`VLModel.itm_scores`): the reranker of a one_tower model, which has no separate tower
    outputs to keep. Texts are tokenized and images transformed as ``scorer``'s run does; each image
    is decoded once and kept as uint8 pixels (``n_images x 3 x S x S`` bytes, e.g. 0.4 GB for
    Flickr30k's 1,000 test images at 384 px). ``passes`` counts the pairs run."""

    def __init__(self, scorer: RunModel, texts: list[str], source: ArrowSource, n_images: int, *,
                 decode_workers: int = 4) -> None:
        self.model, self.source, self.norm = scorer.model, source, scorer.norm
        param = next(scorer.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        t0 = time.perf_counter()
        encoding = scorer.tokenizer(texts, padding="longest", truncation=True, max_length=scorer.max_text_len,
                                    return_tensors="pt")
        self.input_ids, self.attention_mask = encoding["input_ids"], encoding["attention_mask"]
        self.tokenize_s, self.decode_s, self.passes = time.perf_counter() - t0, 0.0, 0
        self.transform = image_transform(scorer.image_size, train=False)
        self.decode_workers = max(1, decode_workers)
        self.pixels = torch.empty((n_images, 3, scorer.image_size, scorer.image_size), dtype=torch.uint8)
        self.decoded = torch.zeros(n_images, dtype=torch.bool)

    def __call__(self, text_idx: Tensor, image_idx: Tensor) -> Tensor:
        text_idx, image_idx = text_idx.cpu(), image_idx.cpu()
        needed = image_idx.unique()
        needed = needed[~self.decoded[needed]]
        if needed.numel():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(min(self.decode_workers, needed.numel())) as pool:
                self.pixels[needed] = torch.stack(list(pool.map(lambda i: _decode(self.source, self.transform, i),
                                                                needed.tolist())))
            self.decoded[needed] = True
            self.decode_s += time.perf_counter() - t0
        mask = self.attention_mask[text_idx]
        columns = mask.any(0)
        pixels = self.norm.apply(self.pixels[image_idx]).to(device=self.device, dtype=self.dtype)
        self.passes += text_idx.numel()
        return self.model.itm_scores(self.input_ids[text_idx][:, columns].to(self.device),
                                     mask[:, columns].to(self.device), pixels)


def retrieval_scores(model: VLModel, tokenizer: PreTrainedTokenizerBase, source: ArrowSource, *, image_size: int,
                     norm: Normalization, k: int = 16, batch_size: int = 64, max_text_len: int = 40,
                     max_images: int | None = None, decode_workers: int = 4,
                     first_stage: RunModel | None = None) -> dict[str, float]:
    """Recall@1/5/10 both ways of ``model`` on the caption split ``source`` (see :class:`RetrievalInputs`).

    The first stage ranks by ITC cosine; with an ITM head, each text's and each
    image's top ``k`` are reranked by the ITM log-odds (:meth:`VLModel.fused_itm_scores`).
    With ``first_stage``, that model (with its own preprocessing) ranks and
    ``model`` (which needs an ITM head) reranks: a two_tower fuses its kept tower
    outputs, any other runs each pair through the whole model (:class:`PairwiseITM`).
    Runs in eval mode without gradients on the models' device; their train/eval
    modes are restored afterwards.

    Returns :func:`~engine.retrieval.evaluate_retrieval`'s dict (recalls in
    percent, ``fused_pairs``, ``k``, ``n_texts``, ``n_images``, timings) plus
    ``tokenize_s``, ``decode_s`` (image decoding and resizing) and ``full_passes``
    (pairs run through the whole model: :class:`PairwiseITM`'s, else 0).
    ``rerank_s`` and ``total_s`` include a reranking two_tower's tower passes.
    """
    scorer = RunModel(model, tokenizer, image_size, norm, max_text_len)
    stage = first_stage or scorer
    inputs = RetrievalInputs(stage.model, stage.tokenizer, source, image_size=stage.image_size, norm=stage.norm,
                             max_text_len=stage.max_text_len, max_images=max_images, decode_workers=decode_workers,
                             rerank=first_stage is None)
    parts: list[RetrievalInputs | PairwiseITM] = [inputs]
    fused: RetrievalInputs | None = None  # a reranking two_tower's kept tower outputs
    itm_score = inputs.itm_score if inputs.rerank else None
    if first_stage is not None:
        if "itm" not in model.heads:
            raise RenError("retrieval_scores: the reranking model has no ITM head to score the first stage's "
                           "candidates with (train it with [objectives.itm]).")
        if isinstance(model.encoder, TwoTower):
            fused = RetrievalInputs(model, tokenizer, source, image_size=image_size, norm=norm,
                                    max_text_len=max_text_len, max_images=max_images, decode_workers=decode_workers)
            itm_score = fused.itm_score
            parts.append(fused)
        else:
            itm_score = PairwiseITM(scorer, inputs.texts, source, inputs.n_images, decode_workers=decode_workers)
            parts.append(itm_score)
    models = [stage.model] + ([model] if first_stage is not None else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            if fused is not None:
                fused.encode_towers(batch_size)
            prepare_s = time.perf_counter() - t0
            scores = evaluate_retrieval(inputs.embed_texts, inputs.embed_images, itm_score, inputs.text_to_image, k,
                                        batch_size)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return {**scores, "rerank_s": scores["rerank_s"] + prepare_s, "total_s": scores["total_s"] + prepare_s,
            "tokenize_s": sum(p.tokenize_s for p in parts), "decode_s": sum(p.decode_s for p in parts),
            "full_passes": itm_score.passes if isinstance(itm_score, PairwiseITM) else 0}


def check_retrieval_config(cfg: RunConfig, where: str) -> None:
    """A :class:`RenError` unless ``cfg`` builds a model with a retrieval first stage (an ITC head on
    separate towers)."""
    itm = cfg.objectives is not None and cfg.objectives.itm is not None
    if cfg.model.kind == "one_tower":
        rerank = ("give --first-stage RUN2 (a two_tower run pretrained with [objectives.itc], or a dual_encoder "
                  "run) to pick the candidates, and this run's ITM head reranks them" if itm else
                  "this run has no ITM head either, so it cannot rerank another run's candidates")
        raise RenError(f"{where} is a one_tower model: it encodes text and image together, so it has no separate "
                       "text and image embeddings to rank candidates with (a first stage), and scoring every "
                       f"image-text pair with ITM is not supported; {rerank}. Or evaluate a two_tower run "
                       "pretrained with [objectives.itc], or a dual_encoder run.")
    if cfg.objectives is None or cfg.objectives.itc is None:
        trained = (f"finetuned on the {cfg.task.name} task" if cfg.task is not None
                   else "pretrained without [objectives.itc]")
        other = (" Or give --first-stage RUN2 (a run with a first stage) and this run's ITM head reranks its "
                 "candidates." if itm else "")
        raise RenError(f"{where} was {trained}, so its model has no ITC head and no projected text and image "
                       "embeddings for a retrieval first stage. Pretrain (or finetune on captions with "
                       "data.dataset = \"captions\") with [objectives.itc] to get a first stage, and evaluate "
                       f"that run.{other}")


def check_rerank_config(cfg: RunConfig, where: str) -> None:
    """A :class:`RenError` unless ``cfg`` builds a model with an ITM head to rerank another run's
    first-stage candidates with (a one_tower or two_tower trained with [objectives.itm])."""
    if cfg.model.kind == "dual_encoder":
        raise RenError(f"{where} is a dual_encoder: it has no fusion layers and no ITM head to rerank another "
                       "run's candidates with. Evaluate it without --first-stage (it is a first stage itself), or "
                       "give it as the --first-stage of a one_tower or two_tower run trained with [objectives.itm].")
    if cfg.objectives is None or cfg.objectives.itm is None:
        trained = (f"finetuned on the {cfg.task.name} task" if cfg.task is not None
                   else "pretrained without [objectives.itm]")
        raise RenError(f"{where} was {trained}, so its model has no ITM head to rerank the first stage's "
                       "candidates with. Evaluate a run pretrained with [objectives.itm].")


def check_task_config(cfg: RunConfig, where: str) -> None:
    """A :class:`RenError` unless ``cfg`` finetunes on a task."""
    if cfg.task is None:
        raise RenError(f"{where} is a pretraining run (no [task]), so it has no task head to evaluate. Evaluate a "
                       "run that finetuned on the task (a preset with [task]); a pretraining run with "
                       "[objectives.itc] is scored with `ren eval retrieval`.")


def _stored_config(store: Store, run_id: str, role: str, root: Path | None = None
                   ) -> tuple[RunRecord, RunConfig, str]:
    """A run's record and config (``data.root`` replaced by ``root`` when given), and ``"{role} {id}"``."""
    record = store.get_run(run_id)
    where = f"{role} {record.id}"
    cfg = config_from_dict(record.config, source=where)
    if root is not None:
        if cfg.data.dataset == "easy_vqa" or cfg.data.hf is not None:
            source = "the embedded easy_vqa data" if cfg.data.hf is None else "a Hugging Face data set ([data.hf])"
            raise RenError(f"--root: {where} reads {source}, not arrow files in a directory; drop --root.")
        raw = dict(record.config)
        raw["data"] = {**raw.get("data", {}), "root": str(Path(root).expanduser())}
        cfg = config_from_dict(raw, source=f"{where} with --root {root}")
    return record, cfg, where


def _final_weights(store: Store, record: RunRecord, where: str) -> Path:
    """The path of a finished run's final weights; a :class:`RenError` saying what to do otherwise."""
    from engine.runs import FINAL_WEIGHTS

    path = Path(store.run_dir(record.id)) / FINAL_WEIGHTS
    if record.status in ("queued", "running"):
        raise RenError(f"{where} is {record.status}: its final weights ({path}) are written when training "
                       "finishes. Evaluate it once it has finished.")
    if record.status != "finished":
        raise RenError(f"{where} has no final weights: it is {record.status}, not finished ({FINAL_WEIGHTS} is "
                       f"written when training finishes, so {path} is not a final model). Evaluate a finished run, "
                       f"or finish this one with `ren run --resume {record.id}`.")
    if not path.is_file():
        raise RenError(f"{where} finished, but its final weights are gone: {path} does not exist (moved or "
                       "deleted). Put the file back, or train the run's preset again.")
    return path


def _load_model(cfg: RunConfig, path: Path, where: str, vocab_size: int, num_answers: int | None,
                device: torch.device | str, vocabulary: str = "") -> VLModel:
    """The model ``cfg`` builds with the weights in ``path`` (eval mode, on ``device``); ``vocabulary``
    says where a VQA answer vocabulary of ``num_answers`` came from, for the error when it does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.models import build_model

    model = build_model(cfg, vocab_size=vocab_size, num_answers=num_answers)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RenError(f"{where}: cannot read its final weights {path}: {exc}.") from exc
    own = model.state_dict()
    head = [name for name, tensor in state.items()
            if name.startswith("heads.task.") and name in own and own[name].shape != tensor.shape]
    if head and num_answers is not None:
        raise RenError(f"{where}: the answer vocabulary ({num_answers} answers, {vocabulary}) does not fit the "
                       f"answer head in {path} ({head[0]}: {tuple(state[head[0]].shape)} in the file, "
                       f"{tuple(own[head[0]].shape)} for {num_answers} answers); it must be the vocabulary the run "
                       "trained with.")
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
    return model.to(device).eval()


def load_run_model(store: Store, run_id: str, device: torch.device | str = "cpu", *,
                   check: Callable[[RunConfig, str], None] = check_retrieval_config, role: str = "run"
                   ) -> tuple[RunRecord, RunConfig, VLModel, PreTrainedTokenizerBase]:
    """A finished run's record, config, model (final weights loaded, eval mode, on ``device``) and
    tokenizer, after ``check(cfg, "{role} {id}")`` (default: a retrieval first stage,
    :func:`check_retrieval_config`; :func:`check_rerank_config` for a reranker)."""
    from engine.data.pipeline import build_tokenizer, num_answers

    record, cfg, where = _stored_config(store, run_id, role)
    check(cfg, where)
    path = _final_weights(store, record, where)
    tokenizer = build_tokenizer(cfg)
    return record, cfg, _load_model(cfg, path, where, len(tokenizer), num_answers(cfg), device), tokenizer


# ----------------------------------------------------------------------------
# a finetuned run's task on one split of its data set
# ----------------------------------------------------------------------------


@dataclass
class TaskEval:
    """A finished task run loaded for evaluation on one split (:func:`load_task_eval`)."""

    record: RunRecord
    cfg: RunConfig
    where: str  # "run ID", for messages
    split: str
    model: VLModel
    data: EvalSplit  # the split's dataset, the head's answers, whether it has labels

    def score_key(self, metric: str) -> str:
        """The key of this split's ``metric`` among the run's final scores: ``{dataset}/{split}/{metric}``."""
        return f"{self.cfg.data.dataset}/{self.split}/{metric}"


def run_answers(store: Store, record: RunRecord, cfg: RunConfig, where: str) -> tuple[list[str] | None, str]:
    """What the run's task head outputs mean, by index, and where that came from: the list training
    stored with the run (``answers.json``), else (runs trained before it was stored) rebuilt from the
    data as training builds it (VQAv2: the train split's answers under ``cfg.data.root``)."""
    from engine.data.pipeline import task_answers
    from engine.train import ANSWERS

    path = Path(store.run_dir(record.id)) / ANSWERS
    if path.is_file():
        try:
            answers = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RenError(f"{where}: cannot read its answer list {path}: {exc}.") from exc
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise RenError(f"{where}: {path} must hold a JSON list of answer strings (the task head's outputs by "
                           "index), as training writes it.")
        return answers, f"stored with the run in {path}"
    data = "the easy_vqa package" if cfg.data.dataset == "easy_vqa" else cfg.data.root or cfg.data.hf.path
    origin = f"rebuilt from the train split {cfg.data.train_split!r} of {data}"
    try:
        return task_answers(cfg), origin
    except RenError as exc:
        raise RenError(f"{where} has no stored answer vocabulary ({path} is missing: the run predates it), so it "
                       f"is rebuilt from the run's train split {cfg.data.train_split!r} as training built it, and "
                       f"that failed: {exc} If the data moved, give --root DIR.") from None


def load_task_eval(store: Store, run_id: str, split: str | None = None, *, root: Path | None = None,
                   device: torch.device | str = "cpu") -> TaskEval:
    """A finished finetuning run's model (final weights, eval mode, on ``device``) and split ``split``
    (default: the run's ``data.eval_split``) of its data set, read from ``root`` (default: the run's
    ``data.root``) as training's evaluation reads its eval split."""
    from engine.data.arrow import find_arrow_files
    from engine.data.pipeline import build_tokenizer, eval_dataset

    record, cfg, where = _stored_config(store, run_id, "run", root)
    check_task_config(cfg, where)
    path = _final_weights(store, record, where)
    split = split or cfg.data.eval_split
    if cfg.data.hf is None and cfg.data.dataset != "easy_vqa":
        try:
            find_arrow_files(cfg.data.root, cfg.data.dataset, split)
        except RenError as exc:
            raise RenError(f"{where} ({cfg.task.name} on {cfg.data.dataset}): {exc} If the data moved, point "
                           "--root at the directory that holds it now.") from None
    answers, origin = run_answers(store, record, cfg, where)
    tokenizer = build_tokenizer(cfg)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else store.root / "cache"  # as training reads easy_vqa
    try:
        data = eval_dataset(cfg, split, tokenizer=tokenizer, answers=answers, cache_dir=cache)
    except ConfigError as exc:
        raise RenError(f"{where} ({cfg.task.name} on {cfg.data.dataset}): {exc}") from None
    num_answers = len(answers) if cfg.task.name == "vqa" and answers is not None else None
    model = _load_model(cfg, path, where, len(tokenizer), num_answers, device, origin)
    return TaskEval(record, cfg, where, split, model, data)


@dataclass
class TaskResult:
    """What :func:`task_scores` measured."""

    metric: str
    score: float  # the mean per-sample score (meaningless when the split has no labels)
    samples: int  # items scored (items whose image could not be decoded are left out, as in training)
    items: int  # items in the split
    seconds: float
    predictions: list[int] = field(default_factory=list)  # argmax output index per scored item (when kept)
    question_ids: list[int] = field(default_factory=list)  # VQA: the question id of each prediction
    scored: ScoredItems | None = None  # with keep_items


@dataclass
class ScoredItems:
    """Each scored item's index in the split, its predicted output, the model's probability of it, its score
    and its right output (-1 where no output of the head is right: a VQA answer outside the vocabulary)."""

    index: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    truth: list[int] = field(default_factory=list)

    def add(self, batch: dict[str, Tensor], logits: Tensor, scores: Tensor, sigmoid: bool) -> None:
        """One batch's items; ``sigmoid``: the head's outputs are independent (VQA trained with BCE) rather than
        one softmax."""
        logits = logits.float()
        top, predicted = logits.max(dim=1)
        confidence = top.sigmoid() if sigmoid else logits.softmax(dim=1).max(dim=1).values
        targets = batch.get("official_scores", batch["labels"])
        if targets.dim() == 2:  # soft targets: the most-agreed answer
            best, truth = targets.max(dim=1)
            truth = torch.where(best > 0, truth, -1)
        else:
            truth = targets
        self.index += batch["items"].tolist()
        self.predicted += predicted.tolist()
        self.confidence += confidence.tolist()
        self.score += scores.float().tolist()
        self.truth += truth.tolist()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast as training's ``train.mixed_precision`` does it (through accelerate)."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def task_scores(model: VLModel, dataset: torch.utils.data.Dataset, task: str, *, batch_size: int = 64,
                num_workers: int = 0, mixed_precision: str = "no", keep_predictions: bool = False,
                keep_items: bool = False, vqa_loss: str = "bce") -> TaskResult:
    """Score ``model`` on ``dataset`` (a task dataset whose ``__getitems__`` returns a batch) on the
    model's device, batch by batch with the training loop's :func:`engine.train.score_batch`; the
    mean is what training's evaluation reports for the same split. ``keep_predictions`` keeps each
    item's argmax output (and, for VQA batches, its question id); ``keep_items`` each item's
    :class:`ScoredItems` (the confidence of a VQA head trained with ``vqa_loss = "bce"`` is the sigmoid of
    its top output, else the softmax probability). The model's mode is restored."""
    from torch.utils.data import DataLoader

    from engine.data.datasets import identity_collate
    from engine.tasks import METRICS, metric_name
    from engine.train import score_batch

    param = next(model.parameters())
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=identity_collate, num_workers=num_workers)
    result = TaskResult(METRICS[task], 0.0, 0, len(dataset), 0.0, scored=ScoredItems() if keep_items else None)
    total, t0 = 0.0, time.perf_counter()
    was_training = model.training
    official = True
    model.eval()
    try:
        for batch in loader:
            official = official and "official_scores" in batch
            batch = {key: value.to(param.device) if isinstance(value, Tensor) else value
                     for key, value in batch.items()}
            with _autocast(param.device, mixed_precision):
                logits, scores = score_batch(model, batch, task)
            total += float(scores.sum())
            result.samples += scores.numel()
            if result.scored is not None:
                result.scored.add(batch, logits, scores, sigmoid=task == "vqa" and vqa_loss == "bce")
            if keep_predictions:
                result.predictions += logits.argmax(dim=1).tolist()
                if "question_ids" in batch:
                    result.question_ids += batch["question_ids"].tolist()
    finally:
        model.train(was_training)
    result.score = total / max(result.samples, 1)
    result.metric = metric_name(task, official and result.samples > 0)
    result.seconds = time.perf_counter() - t0
    return result


THUMBNAIL_SIDE = 256  # the longer side of a kept picture, at most


def _thumbnail(pictures: tuple, side: int = THUMBNAIL_SIDE) -> bytes:
    """The item's picture(s) as one PNG, no side longer than ``side`` (NLVR2's two images side by side)."""
    import io

    from PIL import Image

    images = [p.convert("RGB") for p in pictures]
    for image in images:
        image.thumbnail((side // len(images), side))
    sheet = Image.new("RGB", (sum(i.width for i in images) + 4 * (len(images) - 1), max(i.height for i in images)),
                      "white")
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width + 4
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def split_predictions(run: TaskEval, result: TaskResult, examples: int) -> tuple[SplitPredictions, dict[str, bytes]]:
    """What ``ren eval task --examples`` keeps of ``result`` (scored with ``keep_items``): the score per
    category of ``run``'s data set over every scored item, and ``examples`` items
    (:func:`~engine.predictions.pick_examples`) with their pictures as PNG thumbnails by file name."""
    from engine.predictions import CATEGORY_KINDS, Example, SplitPredictions, breakdown, category_of, pick_examples

    items, dataset = result.scored, run.cfg.data.dataset
    if items is None:
        raise ValueError("split_predictions needs a TaskResult scored with keep_items=True")
    answers = run.data.answers

    def name(output: int) -> str:
        if output < 0:
            return ""
        return answers[output] if answers is not None else f"box {output}"

    truths = [name(t) for t in items.truth]
    categories = [category_of(dataset, truth) for truth in truths]
    kept: list[Example] = []
    thumbnails: dict[str, bytes] = {}
    for position, why in pick_examples(items.score, items.confidence, examples):
        index = items.index[position]
        view = run.data.dataset.describe(index)
        thumbnail = f"{index}.png" if view.pictures else None
        if thumbnail is not None:
            thumbnails[thumbnail] = _thumbnail(view.pictures)
        kept.append(Example(index, view.text, view.image, thumbnail, name(items.predicted[position]),
                            truths[position] or "(no answer in the vocabulary)", items.score[position],
                            items.confidence[position], categories[position], why))
    has_categories = any(c is not None for c in categories)
    return SplitPredictions(
        run.record.id, run.cfg.task.name, dataset, run.split, result.metric, result.score, result.samples,
        CATEGORY_KINDS.get(dataset) if has_categories else None, breakdown(categories, items.score), tuple(kept),
        time.time()), thumbnails
