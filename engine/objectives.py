"""Pretraining objectives: MLM, ITM and ITC.

Each function takes explicit tensors and hyper-parameters (never the config)
and is deterministic given its ``generator``.
"""

from __future__ import annotations

import hashlib

import torch
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


def itm_pairs(
    pixel_values: Tensor, image_ids: Tensor, *, negative_ratio: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Replace the image of about ``negative_ratio`` of the pairs by another image of
    the batch that is never the true image. Returns (pixels, labels: 1 = match)."""
    b = pixel_values.shape[0]
    device = pixel_values.device
    want_negative = (torch.rand(b, generator=generator) < negative_ratio).to(device)
    # for each row, a random other row showing a different image
    different = image_ids[None, :] != image_ids[:, None]
    scores = torch.rand((b, b), generator=generator).to(device).masked_fill(~different, -1.0)
    partner = scores.argmax(dim=1)
    negative = want_negative & different.any(dim=1)
    pixels = torch.where(negative[:, None, None, None], pixel_values[partner], pixel_values)
    return pixels, (~negative).long()


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels)


def itc_loss(logits: Tensor, image_ids: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (texts x images) similarity matrix. Pairs showing the
    same image are all positives (a batch can hold several captions of one image)."""
    positives = (image_ids[:, None] == image_ids[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits = logits.float()
    return 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
        + torch.sum(-targets.T * F.log_softmax(logits.T, dim=1), dim=1).mean()
    )
