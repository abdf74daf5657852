"""Image-text retrieval evaluation: Recall@K both ways and the two-stage rerank.

Flickr30k / COCO Karpathy test conventions as ViLT, METER and ALBEF report them (percentages, ties broken
by index), and ALBEF's and BLIP's ITM rerank of the first stage's top k. The conventions, and where the
rerank differs from ALBEF's: docs/PROTOCOLS.md, "Image-text retrieval".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.errors import RenError

ScorePairs = Callable[[Tensor, Tensor], Tensor]
Embed = Callable[[range], Tensor]

_CHUNK_ELEMENTS = 1 << 24  # rows x columns handled at once when ranking or sorting


def _positive_int(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RenError(f"{where}: {name} must be a positive integer, got {value!r}.")
    return value


def _check_matrix(sim: object, name: str, where: str, *, finite: bool = False) -> Tensor:
    """``sim`` if it is a non-empty 2-D float tensor without NaN (and, with ``finite``, without infinities)."""
    if not isinstance(sim, Tensor) or sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        shape = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise RenError(f"{where}: {name} must be a non-empty 2-D tensor, got {shape}.")
    if not sim.is_floating_point():
        raise RenError(f"{where}: {name} must hold floating-point scores, got dtype {sim.dtype}.")
    bad = ~torch.isfinite(sim) if finite else torch.isnan(sim)
    if bool(bad.any()):
        row, col = (int(v) for v in torch.nonzero(bad)[0])
        raise RenError(f"{where}: {name} holds {float(sim[row, col])} at row {row}, column {col}; scores must be "
                       + ("finite to shift the non-candidates below the reranked ones." if finite
                          else "comparable (not NaN) to rank them."))
    return sim


def _check_text_to_image(text_to_image: Sequence[int] | Tensor, n_texts: int, n_images: int | None,
                         where: str) -> Tensor:
    """``text_to_image`` as a long tensor, checked against the matrix sizes; every
    image must have a caption. ``n_images`` None means ``max + 1``."""
    try:
        t2i = torch.as_tensor(text_to_image)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RenError(f"{where}: text_to_image must be a sequence of image indices, one per text ({exc}).") from exc
    if t2i.dim() != 1:
        raise RenError(f"{where}: text_to_image must be a flat sequence of image indices, got shape "
                       f"{tuple(t2i.shape)}.")
    if t2i.numel() != n_texts:
        raise RenError(f"{where}: text_to_image has {t2i.numel()} entries but there are {n_texts} texts; "
                       "it needs exactly one image index per text.")
    if t2i.is_floating_point() or t2i.dtype == torch.bool or t2i.is_complex():
        raise RenError(f"{where}: text_to_image must hold integer image indices, got dtype {t2i.dtype}.")
    t2i = t2i.long().cpu()
    if n_images is None:
        n_images = int(t2i.max()) + 1 if n_texts else 0
    bad = torch.nonzero((t2i < 0) | (t2i >= n_images)).flatten()
    if bad.numel():
        t = int(bad[0])
        raise RenError(f"{where}: text_to_image[{t}] = {int(t2i[t])} is out of range; there are {n_images} "
                       f"images (valid indices 0..{n_images - 1}); {bad.numel()} text(s) are out of range.")
    captions = torch.bincount(t2i, minlength=n_images)
    lonely = torch.nonzero(captions == 0).flatten()
    if lonely.numel():
        shown = ", ".join(str(int(i)) for i in lonely[:5])
        raise RenError(f"{where}: {lonely.numel()} of {n_images} images have no caption in text_to_image "
                       f"(first: {shown}); text retrieval needs at least one positive caption per image.")
    return t2i


def _check_ks(ks: Sequence[int], where: str) -> None:
    if isinstance(ks, (int, str)) or len(ks) == 0:
        raise RenError(f"{where}: ks must be a non-empty sequence of positive integers, got {ks!r}.")
    for k in ks:
        _positive_int(k, "every K in ks", where)
    if len(set(ks)) != len(ks):
        raise RenError(f"{where}: ks {list(ks)} repeats a value.")


def _ranks(scores: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """0-based rank of ``cols[j]`` within row ``rows[j]`` of ``scores`` (stable descending order)."""
    n_cols = scores.shape[1]
    rows, cols = rows.to(scores.device), cols.to(scores.device)
    arange = torch.arange(n_cols, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    out = []
    for start in range(0, rows.numel(), step):
        r, c = rows[start:start + step], cols[start:start + step]
        block = scores[r]
        target = block.gather(1, c[:, None])
        higher = (block > target).sum(1)
        tied_before = ((block == target) & (arange[None, :] < c[:, None])).sum(1)
        out.append(higher + tied_before)
    return torch.cat(out).cpu()


def recall_at_k(sim: Tensor, text_to_image: Sequence[int] | Tensor, ks: Sequence[int] = (1, 5, 10), *,
                sim_i2t: Tensor | None = None) -> dict[str, float]:
    """Recall@K (percent) for text->image (``ir_rK``) and image->text (``tr_rK``), and ``r_mean``.

    ``sim`` is ``n_texts x n_images`` and ranks images for each text. Image
    queries rank texts by ``sim_i2t`` (``n_images x n_texts``) when given (the
    reranked image->text matrix of :func:`rerank`), else by ``sim.T``. Ties: the
    lower index ranks first (a stable descending sort).
    """
    where = "recall_at_k"
    sim = _check_matrix(sim, "sim (n_texts x n_images)", where)
    n_texts, n_images = sim.shape
    t2i = _check_text_to_image(text_to_image, n_texts, n_images, where)
    if sim_i2t is None:
        sim_i2t = sim.t()
    else:
        sim_i2t = _check_matrix(sim_i2t, "sim_i2t (n_images x n_texts)", where)
        if tuple(sim_i2t.shape) != (n_images, n_texts):
            raise RenError(f"{where}: sim_i2t has shape {tuple(sim_i2t.shape)} but sim is {n_texts} texts x "
                           f"{n_images} images, so sim_i2t must be ({n_images}, {n_texts}).")
    _check_ks(ks, where)
    texts = torch.arange(n_texts)
    ir_rank = _ranks(sim, texts, t2i)
    caption_rank = _ranks(sim_i2t, t2i, texts)
    tr_rank = torch.full((n_images,), n_texts, dtype=torch.long).scatter_reduce(0, t2i, caption_rank, "amin")
    out: dict[str, float] = {}
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * float((ir_rank < k).double().mean())
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * float((tr_rank < k).double().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def _top_k(scores: Tensor, k: int) -> Tensor:
    """Column indices of each row's k best scores, best first, ties to the lower index."""
    step = max(1, _CHUNK_ELEMENTS // scores.shape[1])
    return torch.cat([torch.sort(scores[s:s + step], dim=1, descending=True, stable=True).indices[:, :k]
                      for s in range(0, scores.shape[0], step)])


@torch.no_grad()
def rerank(first_stage: Tensor, k: int, score_pairs: ScorePairs, batch_size: int, *,
           add_first_stage: bool = False) -> tuple[Tensor, Tensor, int]:
    """Rescore each text's top-k images and each image's top-k texts with ``score_pairs``.

    ``first_stage`` is ``n_texts x n_images``. ``score_pairs(text_idx, image_idx)``
    gets two equal-length long tensors (at most ``batch_size`` pairs, on
    ``first_stage``'s device) and returns one finite score per pair (the ITM
    logit). The union of both directions' candidates is fused once per pair,
    so at most ``k * (n_texts + n_images)`` pairs (all pairs when k covers
    both sides). With ``add_first_stage`` a candidate's score is ITM +
    first-stage score (BLIP).

    Returns ``(t2i, i2t, fused)``: float64 matrices ``n_texts x n_images`` and
    ``n_images x n_texts`` holding the reranked score for each query's own
    top-k candidates (as in ALBEF, a pair fused only for the other direction
    stays a non-candidate in this one), and for every other pair its
    first-stage score shifted by one constant so it lies below every reranked
    score (first-stage order kept); and the number of pairs fused.
    """
    where = "rerank"
    first_stage = _check_matrix(first_stage, "first_stage (n_texts x n_images)", where, finite=True)
    k = _positive_int(k, "k", where)
    batch_size = _positive_int(batch_size, "batch_size", where)
    n_texts, n_images = first_stage.shape
    device = first_stage.device
    k_img, k_txt = min(k, n_images), min(k, n_texts)
    top_images = _top_k(first_stage, k_img)  # n_texts x k_img
    top_texts = _top_k(first_stage.t(), k_txt)  # n_images x k_txt
    codes_t2i = torch.arange(n_texts, device=device)[:, None] * n_images + top_images
    codes_i2t = top_texts * n_images + torch.arange(n_images, device=device)[:, None]
    pairs, inverse = torch.unique(torch.cat([codes_t2i.flatten(), codes_i2t.flatten()]), return_inverse=True)
    scores = torch.empty(pairs.numel(), dtype=torch.float64, device=device)
    for start in range(0, pairs.numel(), batch_size):
        chunk = pairs[start:start + batch_size]
        text_idx, image_idx = chunk // n_images, chunk % n_images
        got = score_pairs(text_idx, image_idx)
        if not isinstance(got, Tensor) or got.shape != (chunk.numel(),):
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise RenError(f"{where}: score_pairs returned {shape} for a batch of {chunk.numel()} pairs (pairs "
                           f"{start}..{start + chunk.numel() - 1}); it must return a 1-D tensor of one score per pair.")
        got = got.detach().to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(got).all()):
            j = int(torch.nonzero(~torch.isfinite(got))[0])
            raise RenError(f"{where}: score_pairs returned {float(got[j])} for text {int(text_idx[j])} and image "
                           f"{int(image_idx[j])}; scores must be finite to rank them.")
        scores[start:start + chunk.numel()] = got
        if add_first_stage:
            scores[start:start + chunk.numel()] += first_stage[text_idx, image_idx].double()
    floor = float(scores.min()) - 1.0
    t2i = first_stage.to(torch.float64, copy=True)
    t2i -= float(t2i.max()) - floor
    i2t = t2i.t().contiguous()
    t2i.scatter_(1, top_images, scores[inverse[:codes_t2i.numel()]].view(n_texts, k_img))
    i2t.scatter_(1, top_texts, scores[inverse[codes_t2i.numel():]].view(n_images, k_txt))
    return t2i, i2t, pairs.numel()


def _embed_all(embed: Embed, n: int, batch_size: int, what: str, where: str) -> Tensor:
    parts = []
    for start in range(0, n, batch_size):
        span = range(start, min(n, start + batch_size))
        got = embed(span)
        if not isinstance(got, Tensor) or got.dim() != 2 or got.shape[0] != len(span):
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise RenError(f"{where}: embed_{what} returned {shape} for {what} {span.start}..{span.stop - 1}; "
                           f"it must return a 2-D tensor with one row per {what[:-1]} ({len(span)} rows).")
        if parts and got.shape[1] != parts[0].shape[1]:
            raise RenError(f"{where}: embed_{what} returned width {got.shape[1]} for {what} {span.start}.."
                           f"{span.stop - 1} but {parts[0].shape[1]} before; every batch needs the same width.")
        parts.append(got.detach().float())
    return torch.cat(parts)


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def evaluate_retrieval(embed_texts: Embed, embed_images: Embed, itm_score: ScorePairs | None,
                       text_to_image: Sequence[int] | Tensor, k: int, batch_size: int, *,
                       ks: Sequence[int] = (1, 5, 10), add_first_stage: bool = False) -> dict[str, float]:
    """Embed every text and image, rank by cosine similarity, optionally rerank, and score.

    ``embed_texts(range)`` / ``embed_images(range)`` return one embedding row per
    index (batches of ``batch_size``); the first stage is the cosine of the
    L2-normalised embeddings. ``itm_score(text_idx, image_idx)`` is the fusion
    model's ITM score for pairs (see :func:`rerank`); None keeps the first
    stage (a dual encoder, zero-shot ITC). Images are ``0..max(text_to_image)``.

    Returns the recalls of :func:`recall_at_k`, ``fused_pairs``, ``k``,
    ``n_texts``, ``n_images`` and wall times ``embed_s``, ``first_stage_s``,
    ``rerank_s``, ``recall_s``, ``total_s``.
    """
    where = "evaluate_retrieval"
    k = _positive_int(k, "k", where)
    batch_size = _positive_int(batch_size, "batch_size", where)
    _check_ks(ks, where)
    try:
        n_texts = len(text_to_image)
    except TypeError as exc:
        raise RenError(f"{where}: text_to_image must be a sequence of image indices, one per text.") from exc
    if n_texts == 0:
        raise RenError(f"{where}: text_to_image is empty; there is nothing to evaluate.")
    t2i = _check_text_to_image(text_to_image, n_texts, None, where)
    n_images = int(t2i.max()) + 1
    t0 = time.perf_counter()
    texts = _embed_all(embed_texts, n_texts, batch_size, "texts", where)
    images = _embed_all(embed_images, n_images, batch_size, "images", where).to(texts.device)
    if texts.shape[1] != images.shape[1]:
        raise RenError(f"{where}: text embeddings are {texts.shape[1]} wide but image embeddings are "
                       f"{images.shape[1]}; the first stage needs both in one space (project them first).")
    t1 = _clock(texts.device)
    sim = F.normalize(texts, dim=1) @ F.normalize(images, dim=1).t()
    t2 = _clock(texts.device)
    fused, sim_i2t = 0, None
    if itm_score is not None:
        sim, sim_i2t, fused = rerank(sim, k, itm_score, batch_size, add_first_stage=add_first_stage)
    t3 = _clock(texts.device)
    recalls = recall_at_k(sim, t2i, ks, sim_i2t=sim_i2t)
    t4 = _clock(texts.device)
    return {**recalls, "fused_pairs": fused, "k": k, "n_texts": n_texts, "n_images": n_images,
            "embed_s": t1 - t0, "first_stage_s": t2 - t1, "rerank_s": t3 - t2, "recall_s": t4 - t3,
            "total_s": t4 - t0}
