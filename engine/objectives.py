"""Pretraining objectives: MLM, ITM and ITC.

Each function takes explicit tensors and hyper-parameters (never the config)
and is deterministic given its ``generator``. ITM and ITC see the batch gathered
over every process (:func:`gather`), so a run's negatives and contrastive loss
depend on its global batch, not on how it is split over processes.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def mask_tokens(
    input_ids: Tensor,
    word_ids: Tensor,
    *,
    mask_prob: float,
    whole_word: bool,
    mask_id: int,
    vocab_size: int,
    num_special: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT masking: choose ``max(1, round(n * mask_prob))`` of a row's ``n`` words (or
    tokens), uniformly at random, as Hugging Face's ``DataCollatorForWholeWordMask`` does;
    of the chosen tokens 80% become [MASK], 10% a random token, 10% stay. Returns (masked
    ids, labels) with labels ``-100`` where nothing is predicted. ``word_ids`` is -1 at
    special and padding tokens, which are never chosen; a row without words gets nothing.
    """
    device = input_ids.device
    eligible = word_ids >= 0
    if whole_word:  # units are the words present in the row
        n_units = int(word_ids.max().item()) + 1 if eligible.any() else 1
        present = torch.zeros(input_ids.shape[0], n_units + 1, dtype=torch.bool, device=device)
        # special tokens write to a spare last column, which is dropped
        present = present.scatter_(1, torch.where(eligible, word_ids, n_units), True)[:, :n_units]
    else:
        present = eligible
    picked = _choose_uniformly(present, mask_prob, generator)
    chosen = eligible & (picked.gather(1, word_ids.clamp(min=0)) if whole_word else picked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator).to(device)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    random_tokens = torch.randint(num_special, vocab_size, input_ids.shape, generator=generator).to(device)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels


def _choose_uniformly(present: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """Per row, a uniformly random subset of the ``present`` units of size
    ``max(1, round(n * share))`` (none in a row without units)."""
    n = present.sum(dim=1)
    k = torch.where(n > 0, torch.round(n.double() * share).long().clamp(min=1), 0)
    scores = torch.rand(present.shape, generator=generator).to(present.device).masked_fill(~present, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # 0 for the lowest score: a random order of the units
    return present & (rank < k[:, None])


def micro_batch_seed(seed: int, step: int, micro_batch: int, process: int) -> int:
    """The seed of one micro-batch's masking and negative sampling: a pure function of the
    run seed, the optimizer step, the micro-batch's index within that step and the process, so
    a resumed run draws what an uninterrupted one drew, and no two micro-batches share draws."""
    key = f"{seed}/{step}/{micro_batch}/{process}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the masked positions (``logits`` already gathered there)."""
    return F.cross_entropy(logits.float(), labels)


def gather(x: Tensor, *, grad: bool = False) -> Tensor:
    """``x`` of every process concatenated along dim 0 in rank order (``x`` itself in a single
    process). With ``grad``, gradients flow back to each process's own rows, as open_clip's
    ``gather_features(gather_with_grad=True)``; without, the other processes' rows are constants.
    Every process must call it, with the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if grad:
        return torch.cat(dist_nn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


_HASHES = ((2_147_483_647, 1_000_003), (2_147_483_629, 999_983))  # (prime modulus < 2^31, base)


def text_keys(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One int64 per row, equal for rows holding the same tokens: two polynomial hashes of the
    ids under the attention mask (collisions about n^2 / 2^62 for n rows). It tells duplicate
    captions apart from distinct ones without a data-format change, also across processes
    whose batches are padded to different lengths (padding adds nothing to the hash)."""
    codes = torch.where(attention_mask.bool(), input_ids.long() + 1, 0)
    key = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
    for modulus, base in _HASHES:  # every product stays below 2^62: no int64 overflow
        powers = torch.tensor([pow(base, k, modulus) for k in range(codes.shape[1])], device=codes.device)
        key = key * modulus + ((codes % modulus) * powers % modulus).sum(dim=1) % modulus
    return key


def describes(image_ids: Tensor, keys: Tensor, all_image_ids: Tensor, all_keys: Tensor) -> Tensor:
    """``(b, n)`` bool: text i (of a pair with ``image_ids[i]`` and caption ``keys[i]``, see
    :func:`text_keys`) describes image j of the batch ``all_image_ids``/``all_keys``: j is
    i's image, or some pair of that batch carries i's caption with j's image (a duplicate
    caption, e.g. easy-VQA's repeated colour x shape captions). Not symmetric: a text
    describes the images of every pair with its caption, not their other captions' images."""
    images, column = torch.unique(all_image_ids, return_inverse=True)
    same_text = (keys[:, None] == all_keys[None, :]).float()
    # has[i, u]: some pair with i's caption shows unique image u
    has = torch.zeros(len(keys), len(images), device=keys.device).index_add_(1, column, same_text) > 0
    return has[:, column] | (image_ids[:, None] == all_image_ids[None, :])


def itm_pairs(
    pixel_values: Tensor,
    image_ids: Tensor,
    keys: Tensor,
    *,
    negative_ratio: float,
    generator: torch.Generator,
    hard_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Replace the image of about ``negative_ratio`` of the pairs by an image of the batch
    gathered over every process that is a true negative: one the row's text does not describe
    (:func:`describes`: neither its own image nor one shown with the same caption, a false
    negative: easy-VQA repeats captions over colour x shape, COCO has duplicate captions).

    The negative is uniform over the valid ones or, given ``hard_logits`` (this process's
    texts x the gathered images: scaled ITC similarities), drawn from their softmax over the
    valid ones, as ALBEF samples hard negative images (``models/model_pretrain.py``). ALBEF
    draws within the process's batch, masks only the diagonal, and adds a hard negative text
    for every image (3B ITM rows); here a row keeps its text and ITM stays B rows. A row that
    wants a negative but has no valid one stays a positive (labelled as such, never a fake
    negative). Returns (pixels, labels: 1 = match, the number of rows left without the
    negative they drew)."""
    all_pixels, all_ids, all_keys = gather(pixel_values), gather(image_ids), gather(keys)
    b, n, device = pixel_values.shape[0], all_pixels.shape[0], pixel_values.device
    want_negative = (torch.rand(b, generator=generator) < negative_ratio).to(device)
    valid = ~describes(image_ids, keys, all_ids, all_keys)
    noise = torch.rand((b, n), generator=generator).to(device)
    if hard_logits is None:
        scores = noise
    else:  # Gumbel-max: argmax of logits + Gumbel noise is a draw from softmax(logits)
        scores = hard_logits.float() - torch.log(-torch.log(noise))
    partner = scores.masked_fill(~valid, -math.inf).argmax(dim=1)
    has_negative = valid.any(dim=1)
    negative = want_negative & has_negative
    pixels = torch.where(negative[:, None, None, None], all_pixels[partner], pixel_values)
    return pixels, (~negative).long(), (want_negative & ~has_negative).sum()


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels)


def itc_loss(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (texts x images) similarity matrix with multi-positive
    targets: each text spreads its target over its ``positives`` (bool, same shape), and
    each image over the texts it is positive for."""
    logits, positives = logits.float(), positives.float()
    t2i = positives / positives.sum(dim=1, keepdim=True)
    i2t = positives.T / positives.T.sum(dim=1, keepdim=True)
    return 0.5 * (
        torch.sum(-t2i * F.log_softmax(logits, dim=1), dim=1).mean()
        + torch.sum(-i2t * F.log_softmax(logits.T, dim=1), dim=1).mean()
    )


def gathered_itc_loss(
    text: Tensor, image: Tensor, scale: Tensor, image_ids: Tensor, keys: Tensor, valid: Tensor | None = None
) -> Tensor:
    """ITC over the global batch. The normalised embeddings of every process are gathered
    with gradients and each process computes the loss of the whole global batch (open_clip's
    ``ClipLoss`` with ``gather_with_grad=True, local_loss=False``, ``src/open_clip/loss.py``):
    once DDP averages the gradients, N processes train as one process with the same batch.
    A text's positives are the images it describes (:func:`describes`: its own, and those of
    pairs with the same caption); ``valid`` (bool per row) keeps only some pairs, as texts and
    as images."""
    text, image = gather(text, grad=True), gather(image, grad=True)
    logits = scale * text @ image.T
    all_ids, all_keys = gather(image_ids), gather(keys)
    positives = describes(all_ids, all_keys, all_ids, all_keys)
    if valid is not None:
        keep = gather(valid.long()).bool()
        logits, positives = logits[keep][:, keep], positives[keep][:, keep]
    return itc_loss(logits, positives)
