"""Pretraining objectives (MLM masking, ITM pairs, ITC loss) and the VQA task loss/metric."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine import objectives as O
from engine.tasks import vqa_loss, vqa_score

MASK_ID = 3
NUM_SPECIAL = 5
VOCAB = 1000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(rows: int, words: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``[CLS] w0 w0 w1 w1 w1 w2 ... [SEP] [PAD]...``: words span 1-3 tokens,
    word_ids is -1 at CLS/SEP/PAD, and rows have different lengths (padding)."""
    g = torch.Generator().manual_seed(seed)
    seqs, wids = [], []
    for r in range(rows):
        n_words = words - (r % 3)  # ragged rows
        ids, wid = [1], [-1]  # [CLS]
        for w in range(n_words):
            span = 1 + (w + r) % 3
            ids += torch.randint(NUM_SPECIAL, VOCAB, (span,), generator=g).tolist()
            wid += [w] * span
        ids.append(2)  # [SEP]
        wid.append(-1)
        seqs.append(ids)
        wids.append(wid)
    length = max(len(s) for s in seqs) + 2  # every row gets some padding
    input_ids = torch.zeros(rows, length, dtype=torch.long)
    word_ids = torch.full((rows, length), -1, dtype=torch.long)
    for r, (s, w) in enumerate(zip(seqs, wids)):
        input_ids[r, : len(s)] = torch.tensor(s)
        word_ids[r, : len(w)] = torch.tensor(w)
    return input_ids, word_ids


def _mask(input_ids, word_ids, *, mask_prob=0.15, whole_word=True, seed=0):
    return O.mask_tokens(
        input_ids, word_ids, mask_prob=mask_prob, whole_word=whole_word, mask_id=MASK_ID,
        vocab_size=VOCAB, num_special=NUM_SPECIAL, generator=_gen(seed),
    )


# ----------------------------------------------------------------------------
# mask_tokens
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("whole_word", [True, False])
def test_mask_never_touches_special_or_padding(whole_word):
    ids, wids = _batch(64, 10)
    masked, labels = _mask(ids, wids, mask_prob=0.9, whole_word=whole_word)
    special = wids == -1
    assert (labels[special] == O.IGNORE).all()
    assert torch.equal(masked[special], ids[special])
    # with a high rate, plenty of word tokens are chosen
    assert (labels[~special] != O.IGNORE).float().mean() > 0.8


@pytest.mark.parametrize("whole_word", [True, False])
def test_labels_are_ignore_exactly_where_not_chosen(whole_word):
    ids, wids = _batch(64, 10)
    masked, labels = _mask(ids, wids, mask_prob=0.3, whole_word=whole_word)
    chosen = labels != O.IGNORE
    # chosen positions carry the original token as label
    assert torch.equal(labels[chosen], ids[chosen])
    # positions not chosen are left untouched in the input
    assert torch.equal(masked[~chosen], ids[~chosen])
    # anything that changed in the input was chosen
    assert chosen[masked != ids].all()


def test_whole_word_masks_all_tokens_of_a_word_together():
    ids, wids = _batch(128, 8)
    _, labels = _mask(ids, wids, mask_prob=0.3, whole_word=True)
    chosen = labels != O.IGNORE
    n_checked = 0
    for r in range(ids.shape[0]):
        for w in wids[r].unique().tolist():
            if w < 0:
                continue
            tokens = chosen[r][wids[r] == w]
            assert tokens.all() or not tokens.any(), f"row {r} word {w} partially masked: {tokens}"
            n_checked += int(tokens.numel() > 1 and tokens.all())
    assert n_checked > 20  # multi-token words were actually masked


def test_token_level_masking_splits_words():
    """Control for the test above: without whole_word, multi-token words do get split."""
    ids, wids = _batch(128, 8)
    _, labels = _mask(ids, wids, mask_prob=0.3, whole_word=False)
    chosen = labels != O.IGNORE
    partial = 0
    for r in range(ids.shape[0]):
        for w in range(8):
            tokens = chosen[r][wids[r] == w]
            partial += int(tokens.any() and not tokens.all())
    assert partial > 0


@pytest.mark.parametrize("whole_word", [True, False])
def test_at_least_one_prediction_per_row(whole_word):
    ids, wids = _batch(200, 6)
    # mask_prob so low that most rows would get nothing without the guarantee
    _, labels = _mask(ids, wids, mask_prob=0.01, whole_word=whole_word)
    chosen = labels != O.IGNORE
    assert chosen.any(dim=1).all()
    assert (labels[wids == -1] == O.IGNORE).all()
    if whole_word:  # the guaranteed prediction is a whole word too
        for r in range(ids.shape[0]):
            for w in wids[r][chosen[r]].unique().tolist():
                assert chosen[r][wids[r] == w].all(), f"row {r}: word {w} partially masked"


def test_row_without_words_gets_no_prediction():
    ids, wids = _batch(4, 5)
    wids[1] = -1  # e.g. an empty caption: only special tokens
    _, labels = _mask(ids, wids, mask_prob=0.5)
    assert (labels[1] == O.IGNORE).all()
    assert (labels[0] != O.IGNORE).any()


def test_80_10_10_split():
    ids, wids = _batch(400, 12)
    masked, labels = _mask(ids, wids, mask_prob=0.5, whole_word=False)
    chosen = labels != O.IGNORE
    n = int(chosen.sum())
    assert n > 4000
    to_mask = (masked[chosen] == MASK_ID).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    swapped = ((masked[chosen] != MASK_ID) & (masked[chosen] != ids[chosen])).float().mean().item()
    assert to_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1, abs=0.03)
    assert swapped == pytest.approx(0.1, abs=0.03)
    # random replacements are never special tokens
    replaced = masked[chosen & (masked != MASK_ID) & (masked != ids)]
    assert (replaced >= NUM_SPECIAL).all() and (replaced < VOCAB).all()
    # overall rate close to mask_prob (the at-least-one rule adds a little)
    rate = chosen.sum() / (wids >= 0).sum()
    assert rate.item() == pytest.approx(0.5, abs=0.03)


def test_whole_word_rate_is_per_word():
    ids, wids = _batch(400, 12)
    _, labels = _mask(ids, wids, mask_prob=0.25, whole_word=True)
    chosen = labels != O.IGNORE
    words = chosen_words = 0
    for r in range(ids.shape[0]):
        for w in wids[r][wids[r] >= 0].unique().tolist():
            words += 1
            chosen_words += int(chosen[r][wids[r] == w].all())
    assert chosen_words / words == pytest.approx(0.25, abs=0.03)


def _rows_of(lengths: list[int], max_span: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per entry of ``lengths`` (its number of words), each word 1 to ``max_span``
    tokens, laid out as in :func:`_batch`."""
    g = torch.Generator().manual_seed(seed)
    spans = [torch.randint(1, max_span + 1, (n,), generator=g) for n in lengths]
    width = 2 + max(int(s.sum()) for s in spans)
    word_ids = torch.full((len(lengths), width), -1, dtype=torch.long)
    for r, s in enumerate(spans):
        word_ids[r, 1:1 + int(s.sum())] = torch.repeat_interleave(torch.arange(len(s)), s)
    input_ids = torch.where(word_ids >= 0, torch.randint(NUM_SPECIAL, VOCAB, word_ids.shape, generator=g), 0)
    input_ids[:, 0] = 1
    return input_ids, word_ids


def _unit_hits(labels: torch.Tensor, word_ids: torch.Tensor, whole_word: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(which units were chosen, which units exist) per row: words, or word tokens in order."""
    chosen, eligible = labels != O.IGNORE, word_ids >= 0
    if whole_word:
        units = int(word_ids.max()) + 1
        index = torch.where(eligible, word_ids, units)  # special tokens go to a spare column
        hit = torch.zeros(len(labels), units + 1, dtype=torch.bool).scatter_(1, index, chosen)
        exists = torch.zeros(len(labels), units + 1, dtype=torch.bool).scatter_(1, index, True)
        return hit[:, :units], exists[:, :units]
    order = (~eligible).long().argsort(dim=1, stable=True)  # word tokens first, in order
    return chosen.gather(1, order), eligible.gather(1, order)


@pytest.mark.parametrize("whole_word", [True, False])
def test_masked_units_are_uniform_over_positions_and_their_count_is_round_n_p(whole_word):
    """Every word (token) position of a row is equally likely to be a target, and a row of
    n units gets max(1, round(n * p)) of them (the old first-word fallback put about half of
    the targets of 5-word captions on the first word). Words span 1-3 tokens."""
    p = 0.15
    for lengths in ([5] * 8000, [n for n in (2, 3, 7, 12) for _ in range(5000)]):
        ids, wids = _rows_of(lengths, max_span=3 if whole_word else 1)  # token level: n tokens
        _, labels = _mask(ids, wids, mask_prob=p, whole_word=whole_word)
        hit, exists = _unit_hits(labels, wids, whole_word)
        n = exists.sum(dim=1)
        expected = torch.round(n.double() * p).long().clamp(min=1)
        assert torch.equal(hit.sum(dim=1), expected)
        for length in n.unique().tolist():
            rows = n == length
            share = hit[rows][:, :length].float().mean(dim=0)  # P(unit at this position is a target)
            print(f"whole_word={whole_word} {length}-unit rows: per-position target rate "
                  f"{[round(x, 3) for x in share.tolist()]}, max/min {(share.max() / share.min()).item():.3f}")
            assert share.max() <= 1.25 * share.min()


def test_mask_tokens_is_deterministic_given_the_seed():
    ids, wids = _batch(32, 8)
    a = _mask(ids, wids, seed=7)
    b = _mask(ids, wids, seed=7)
    c = _mask(ids, wids, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # the input is not modified in place
    assert torch.equal(ids, _batch(32, 8)[0])


# ----------------------------------------------------------------------------
# itm_pairs
# ----------------------------------------------------------------------------


def _distinct(image_ids: torch.Tensor) -> torch.Tensor:
    """Text keys of a batch whose captions all differ."""
    return torch.arange(len(image_ids))


def _images(image_ids: torch.Tensor) -> torch.Tensor:
    """One distinct constant image per image id (pixels identify the image)."""
    return image_ids.float()[:, None, None, None].expand(-1, 3, 4, 4).clone()


def test_itm_negatives_never_show_the_true_image():
    # a batch with repeated images: 5 images, each several times
    image_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 4])
    pix = _images(image_ids)
    negatives = 0
    for seed in range(50):
        out, labels, _ = O.itm_pairs(pix, image_ids, _distinct(image_ids), negative_ratio=0.5, generator=_gen(seed))
        shown = out[:, 0, 0, 0].long()
        assert torch.equal(shown[labels == 1], image_ids[labels == 1])  # positives keep their pixels
        assert (shown[labels == 0] != image_ids[labels == 0]).all()  # negatives: another image
        assert set(shown.tolist()) <= set(image_ids.tolist())  # taken from the batch
        negatives += int((labels == 0).sum())
    assert negatives > 0


def test_itm_positive_rows_keep_their_own_pixels():
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(16, 3, 8, 8, generator=g)
    image_ids = torch.arange(16)
    out, labels, _ = O.itm_pairs(pix, image_ids, _distinct(image_ids), negative_ratio=0.5, generator=_gen(1))
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
    assert torch.equal(out[labels == 1], pix[labels == 1])
    for r in (labels == 0).nonzero().flatten().tolist():
        assert not torch.equal(out[r], pix[r])
        assert any(torch.equal(out[r], pix[j]) for j in range(16) if j != r)


def test_itm_ratio_roughly_right():
    image_ids = torch.arange(4000)
    pix = torch.zeros(4000, 1, 1, 1)
    for ratio in (0.25, 0.5):
        _, labels, _ = O.itm_pairs(pix, image_ids, _distinct(image_ids), negative_ratio=ratio, generator=_gen(0))
        assert (labels == 0).float().mean().item() == pytest.approx(ratio, abs=0.03)


def test_itm_batch_of_one_image_has_no_negatives():
    image_ids = torch.tensor([5, 5, 5, 5])
    pix = torch.randn(4, 3, 4, 4)
    out, labels, unpaired = O.itm_pairs(pix, image_ids, _distinct(image_ids), negative_ratio=0.9,
                                        generator=_gen(0))
    assert (labels == 1).all()
    assert torch.equal(out, pix)
    assert unpaired > 0  # the rows that drew a negative and found none are counted, not faked


# ----------------------------------------------------------------------------
# itc_loss
# ----------------------------------------------------------------------------


def _positives(image_ids: torch.Tensor) -> torch.Tensor:
    """ITC positives of pairs with distinct captions: the pairs showing the same image."""
    keys = _distinct(image_ids)
    return O.describes(image_ids, keys, image_ids, keys)


def _logits(text: torch.Tensor, image: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    return scale * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T


def test_itc_lower_for_aligned_than_shuffled():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 16, generator=g)
    text = image + 0.1 * torch.randn(8, 16, generator=g)
    ids = torch.arange(8)
    aligned = O.itc_loss(_logits(text, image), _positives(ids))
    shuffled = O.itc_loss(_logits(text[torch.roll(torch.arange(8), 1)], image), _positives(ids))
    assert aligned < 0.1 < shuffled
    assert torch.isfinite(aligned) and aligned >= 0


def test_itc_matches_clip_loss_without_duplicates():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 6, generator=g)
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert torch.allclose(O.itc_loss(logits, _positives(torch.arange(6))), expected, atol=1e-6)


def test_itc_duplicate_images_are_all_positives():
    # texts 0 and 1 caption the same image, which the batch holds twice
    ids = torch.tensor([7, 7, 8, 9])
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 4, generator=g)
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    expected = 0.5 * (
        -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        - (targets * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    )
    assert torch.allclose(O.itc_loss(logits, _positives(ids)), expected, atol=1e-6)

    # a perfect model scores both copies of the image equally for both captions:
    # with duplicates as positives that is the optimum (no gradient); treating the
    # copy as a negative would keep pushing the identical embeddings apart
    base = torch.randn(3, 16, generator=g)
    image = base[[0, 0, 1, 2]]
    perfect = _logits(image.clone(), image, scale=30.0).requires_grad_(True)
    loss = O.itc_loss(perfect, _positives(ids))
    (grad,) = torch.autograd.grad(loss, perfect)
    assert torch.isfinite(loss)
    assert grad.abs().max() < 1e-3
    assert loss.item() == pytest.approx(0.5 * math.log(2), abs=1e-3)  # entropy of the soft targets
    (grad_unique,) = torch.autograd.grad(O.itc_loss(perfect, _positives(torch.arange(4))), perfect)
    assert grad_unique.abs().max() > 0.05
    # symmetric in texts and images
    assert torch.allclose(O.itc_loss(perfect.detach().T, _positives(ids)), loss.detach(), atol=1e-6)


def test_itc_gradient_flows():
    logits = torch.randn(4, 4, requires_grad=True)
    O.itc_loss(logits, _positives(torch.tensor([0, 0, 1, 2]))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------


def test_vqa_score_is_soft_target_of_argmax():
    targets = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.3, 1.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.0]])
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [2.0, -1.0, 0.0], [3.0, 2.0, 1.0]])
    assert torch.allclose(vqa_score(logits, targets), torch.tensor([0.3, 1.0, 1.0, 0.0]))


def test_vqa_loss_is_scaled_bce_and_prefers_the_right_answer():
    targets = torch.tensor([[0.0, 0.3, 1.0]])
    logits = torch.tensor([[-1.0, 0.5, 2.0]])
    expected = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).sum()
    assert torch.allclose(vqa_loss(logits, targets), expected, atol=1e-6)
    good = torch.tensor([[-6.0, -0.85, 6.0]])
    bad = torch.tensor([[6.0, -0.85, -6.0]])
    assert vqa_loss(good, targets) < vqa_loss(bad, targets)
    # the minimum is at sigmoid(logit) == soft target
    best = torch.logit(targets.clamp(1e-4, 1 - 1e-4))
    assert vqa_loss(best, targets) <= vqa_loss(good, targets) + 1e-4


def test_vqa_ce_loss_uses_the_normalised_soft_targets():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.3, 0.9], [0.0, 0.0, 0.0]])  # the second question has no scored answer
    log_p = torch.log_softmax(logits[0], dim=0)
    expected = -(0.25 * log_p[1] + 0.75 * log_p[2])
    assert torch.allclose(vqa_loss(logits, targets, "ce"), expected, atol=1e-6)
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    expected_ce = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2]))
    assert torch.allclose(vqa_loss(logits[:1], one_hot, "ce"), expected_ce)
    with pytest.raises(ValueError, match="unknown VQA loss"):
        vqa_loss(logits, targets, "hinge")
