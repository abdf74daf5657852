"""Retrieval evaluation: Recall@K both ways with index tie-breaks, and the two-stage ITM rerank."""

from __future__ import annotations

import pytest
import torch

from engine.errors import RenError
from engine.retrieval import evaluate_retrieval, recall_at_k, rerank

# 4 texts x 2 images; texts 0, 1 show image 0 and texts 2, 3 show image 1.
HAND = torch.tensor([[0.9, 0.1],
                     [0.5, 0.3],
                     [0.3, 0.3],   # tie between the images: image 0 (lower index) ranks first
                     [0.9, 0.2]])
HAND_T2I = [0, 0, 1, 1]

# 6 texts x 3 images, two captions per image. Every text's own image is its
# second-best first-stage image except text 3 (third); see test_rerank_oracle_fixes_wrong_first_stage_order.
SIX = torch.tensor([[0.5, 0.9, 0.1],
                    [0.5, 0.1, 0.9],
                    [0.9, 0.5, 0.1],
                    [0.8, 0.1, 0.9],
                    [0.9, 0.1, 0.5],
                    [0.1, 0.9, 0.5]])
SIX_T2I = [0, 0, 1, 1, 2, 2]


class Oracle:
    """ITM stand-in: ``table[t, i]`` per pair; records every pair and batch it was asked for."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.pairs: list[tuple[int, int]] = []
        self.batches: list[int] = []

    def __call__(self, text_idx: torch.Tensor, image_idx: torch.Tensor) -> torch.Tensor:
        self.batches.append(text_idx.numel())
        self.pairs.extend(zip(text_idx.tolist(), image_idx.tolist()))
        return self.table[text_idx, image_idx]


def matching_oracle(t2i: list[int], n_images: int) -> Oracle:
    return Oracle(torch.tensor([[1.0 if t2i[t] == i else -1.0 for i in range(n_images)] for t in range(len(t2i))]))


def stable_order(row: torch.Tensor) -> list[int]:
    """Indices best first, ties to the lower index (written independently of the module)."""
    values = row.tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))


def reference_recall(t2i_scores: torch.Tensor, i2t_scores: torch.Tensor, t2i: list[int], ks) -> dict[str, float]:
    n_texts, n_images = t2i_scores.shape
    ir = [stable_order(t2i_scores[t]).index(t2i[t]) for t in range(n_texts)]
    tr = []
    for i in range(n_images):
        order = stable_order(i2t_scores[i])
        tr.append(min(order.index(t) for t in range(n_texts) if t2i[t] == i))
    out = {f"ir_r{k}": 100.0 * sum(r < k for r in ir) / n_texts for k in ks}
    out.update({f"tr_r{k}": 100.0 * sum(r < k for r in tr) / n_images for k in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def candidate_union(first_stage: torch.Tensor, k: int) -> set[tuple[int, int]]:
    n_texts, n_images = first_stage.shape
    pairs = {(t, i) for t in range(n_texts) for i in stable_order(first_stage[t])[:k]}
    return pairs | {(t, i) for i in range(n_images) for t in stable_order(first_stage[:, i])[:k]}


def captioned(n_images: int, per_image: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_images * per_image, generator=g)
    return torch.arange(n_images).repeat_interleave(per_image)[order].tolist()


# --- recall_at_k ----------------------------------------------------------------------------------------------


def test_recall_hand_matrix_both_directions():
    # Text ranks of the own image: 0, 0, 1 (tie, image 0 first), 1 -> IR@1 2/4, IR@2 4/4.
    # Image 0 ranks texts [0 (0.9, ties 3 and wins), 3, 1, 2]: caption 0 first -> hit at 1.
    # Image 1 ranks texts [1 (0.3, ties 2 and wins), 2, 3, 0]: best caption at rank 1 -> miss at 1, hit at 2.
    got = recall_at_k(HAND, HAND_T2I, ks=(1, 2))
    assert got == {"ir_r1": 50.0, "ir_r2": 100.0, "tr_r1": 50.0, "tr_r2": 100.0, "r_mean": 75.0}


def test_recall_tie_goes_to_the_lower_index():
    # Swap the image columns (and labels): text 2's tie now favours its own image (index 0), so IR@1 is 3/4;
    # text 3 now ranks its image second. Image-side rankings are unchanged.
    got = recall_at_k(HAND[:, [1, 0]], [1, 1, 0, 0], ks=(1, 2))
    assert got == {"ir_r1": 75.0, "ir_r2": 100.0, "tr_r1": 50.0, "tr_r2": 100.0, "r_mean": 81.25}


def test_recall_default_ks_and_r_mean_is_the_mean_of_six():
    got = recall_at_k(HAND, HAND_T2I)
    assert list(got) == ["ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean"]
    assert got["ir_r1"] == 50.0 and got["tr_r1"] == 50.0 and got["ir_r5"] == got["tr_r10"] == 100.0
    assert got["r_mean"] == pytest.approx((50 + 100 + 100 + 50 + 100 + 100) / 6)


def test_recall_image_queries_use_sim_i2t_when_given():
    i2t = torch.tensor([[0.9, 0.5, 0.3, 0.9],
                        [0.1, 0.3, 0.8, 0.2]])  # image 1 now ranks its caption 2 first
    got = recall_at_k(HAND, HAND_T2I, ks=(1,), sim_i2t=i2t)
    assert got == {"ir_r1": 50.0, "tr_r1": 100.0, "r_mean": 75.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_a_reference_on_tied_random_scores(seed):
    g = torch.Generator().manual_seed(seed)
    t2i = captioned(9, 5, seed)
    sim = torch.randint(0, 4, (45, 9), generator=g).float()  # few distinct values: many ties
    i2t = torch.randint(0, 4, (9, 45), generator=g).float()
    ks = (1, 2, 5, 10)
    assert recall_at_k(sim, t2i, ks) == pytest.approx(reference_recall(sim, sim.t(), t2i, ks))
    assert recall_at_k(sim, t2i, ks, sim_i2t=i2t) == pytest.approx(reference_recall(sim, i2t, t2i, ks))


# --- rerank -----------------------------------------------------------------------------------------------------


def test_rerank_oracle_fixes_wrong_first_stage_order():
    ks = (1, 2, 3, 4)
    first = recall_at_k(SIX, SIX_T2I, ks)
    assert first["ir_r1"] == 0.0 and first["ir_r2"] == pytest.approx(500 / 6)
    # Images rank their captions at best 3rd (image 0) and 2nd (images 1, 2).
    assert (first["tr_r1"], first["tr_r2"], first["tr_r3"]) == (0.0, 0.0, pytest.approx(200 / 3))

    oracle = matching_oracle(SIX_T2I, 3)
    t2i, i2t, fused = rerank(SIX, 2, oracle, batch_size=4)
    got = recall_at_k(t2i, SIX_T2I, ks, sim_i2t=i2t)
    # Five texts have their image among their top 2 and the oracle lifts it to rank 0; text 3's image is
    # outside, so it follows the two (tied, index order) candidates. No image's top-2 texts holds a caption.
    assert got["ir_r1"] == pytest.approx(500 / 6) and got["ir_r2"] == pytest.approx(500 / 6) and got["ir_r3"] == 100
    assert (got["tr_r1"], got["tr_r2"], got["tr_r3"], got["tr_r4"]) == (0.0, 0.0, pytest.approx(200 / 3), 100.0)
    assert stable_order(t2i[3]) == [0, 2, 1]
    # Image 0: candidates 2, 4 (both -1, index order), then the rest in first-stage order 3 (0.8), 0, 1 (0.5), 5.
    assert stable_order(i2t[0]) == [2, 4, 3, 0, 1, 5]
    # Every image's top-2 pair is also some text's top-2 pair: 12 distinct pairs, not 2 * (6 + 3).
    assert fused == 12 == len(set(oracle.pairs)) == len(oracle.pairs)

    t2i, i2t, fused = rerank(SIX, 3, matching_oracle(SIX_T2I, 3), batch_size=4)
    got = recall_at_k(t2i, SIX_T2I, ks, sim_i2t=i2t)
    # k = 3 covers every image for each text; images 1 and 2 now find a caption in their top 3 texts.
    assert got["ir_r1"] == 100.0 and got["tr_r1"] == pytest.approx(200 / 3) and got["tr_r4"] == 100.0
    assert fused == 18


@pytest.mark.parametrize(("n_texts", "n_images", "k", "batch_size"),
                         [(15, 3, 2, 4), (40, 8, 3, 7), (50, 10, 9, 64), (6, 20, 4, 5), (30, 6, 1, 1)])
def test_fused_pairs_are_the_deduplicated_union_of_candidates(n_texts, n_images, k, batch_size):
    g = torch.Generator().manual_seed(n_texts * 100 + k)
    first = torch.randint(0, 5, (n_texts, n_images), generator=g).float()  # ties in the candidate choice
    oracle = Oracle(torch.randn(n_texts, n_images, generator=g))
    _, _, fused = rerank(first, k, oracle, batch_size)
    union = candidate_union(first, k)
    assert len(oracle.pairs) == len(set(oracle.pairs)) == fused  # no pair fused twice
    assert set(oracle.pairs) == union
    assert fused <= k * (n_texts + n_images) and fused <= n_texts * n_images
    assert max(oracle.batches) <= batch_size


def test_shared_candidates_are_fused_once():
    # Captions near their image: an image's top texts are largely the texts whose top image it is.
    g = torch.Generator().manual_seed(0)
    t2i = captioned(40, 5, 0)
    images = torch.randn(40, 16, generator=g)
    texts = images[t2i] + 0.3 * torch.randn(200, 16, generator=g)
    k = 5
    oracle = Oracle(torch.zeros(200, 40))
    _, _, fused = rerank(texts @ images.t(), k, oracle, batch_size=128)
    assert fused == len(candidate_union(texts @ images.t(), k)) < k * (200 + 40)


def test_full_rerank_when_k_covers_both_sides():
    g = torch.Generator().manual_seed(3)
    t2i = captioned(4, 3, 3)
    first = torch.randn(12, 4, generator=g)
    table = torch.randn(12, 4, generator=g)
    for k in (12, 100):
        oracle = Oracle(table)
        got_t2i, got_i2t, fused = rerank(first, k, oracle, batch_size=5)
        assert fused == 12 * 4 == len(set(oracle.pairs))
        assert all(stable_order(got_t2i[t]) == stable_order(table[t]) for t in range(12))
        assert all(stable_order(got_i2t[i]) == stable_order(table[:, i]) for i in range(4))
        assert recall_at_k(got_t2i, t2i, (1, 2), sim_i2t=got_i2t) == recall_at_k(table, t2i, (1, 2))


def test_non_candidates_keep_first_stage_order_below_every_reranked_score():
    g = torch.Generator().manual_seed(5)
    first = torch.randn(30, 10, generator=g, dtype=torch.float64)
    before = first.clone()
    table = 50.0 + torch.randn(30, 10, generator=g)  # ITM scores far above the first stage
    k = 3
    t2i, i2t, _ = rerank(first, k, Oracle(table), batch_size=16)
    assert torch.equal(first, before)  # the caller's matrix is not shifted in place
    floor = min(float(table[t, i]) for t, i in candidate_union(first, k))
    for t in range(30):
        order = stable_order(first[t])
        head, rest = order[:k], order[k:]
        assert t2i[t, head].tolist() == table[t, head].double().tolist()
        assert float(t2i[t, rest].max()) < floor
        assert stable_order(t2i[t])[k:] == rest
    for i in range(10):
        rest = stable_order(first[:, i])[k:]
        assert float(i2t[i, rest].max()) < floor
        assert stable_order(i2t[i])[k:] == rest


def test_add_first_stage_adds_the_first_stage_score_to_candidates():
    g = torch.Generator().manual_seed(6)
    first = torch.randn(8, 4, generator=g)
    table = torch.randn(8, 4, generator=g)
    plain, _, _ = rerank(first, 2, Oracle(table), batch_size=3)
    summed, _, _ = rerank(first, 2, Oracle(table), batch_size=3, add_first_stage=True)
    for t in range(8):
        head = stable_order(first[t])[:2]
        assert plain[t, head].tolist() == pytest.approx(table[t, head].tolist())
        assert summed[t, head].tolist() == pytest.approx((table[t, head] + first[t, head]).tolist())


def test_batching_does_not_change_results():
    g = torch.Generator().manual_seed(7)
    first = torch.randint(0, 6, (60, 12), generator=g).float()
    table = torch.randn(60, 12, generator=g)
    results = [rerank(first, 4, Oracle(table), batch_size=b) for b in (1, 7, 64, 10_000)]
    for t2i, i2t, fused in results[1:]:
        assert torch.equal(t2i, results[0][0]) and torch.equal(i2t, results[0][1]) and fused == results[0][2]


# --- evaluate_retrieval -------------------------------------------------------------------------------------------


def structured_embeddings(n_images: int, per_image: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    t2i = captioned(n_images, per_image, seed)
    images = torch.randn(n_images, 32, generator=g)
    texts = images[t2i] + noise * torch.randn(len(t2i), 32, generator=g)
    return t2i, texts, images


def test_evaluate_retrieval_first_stage_only_is_cosine_recall():
    t2i, texts, images = structured_embeddings(20, 5, 1.0, 0)
    seen: list[range] = []

    def embed_texts(span: range) -> torch.Tensor:
        seen.append(span)
        return 3.0 * texts[span.start:span.stop]  # scale must not matter: cosine

    got = evaluate_retrieval(embed_texts, lambda s: images[s.start:s.stop], None, t2i, k=4, batch_size=32)
    cosine = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).t()
    assert {key: got[key] for key in reference_recall(cosine, cosine.t(), t2i, (1, 5, 10))} == pytest.approx(
        reference_recall(cosine, cosine.t(), t2i, (1, 5, 10)))
    assert seen == [range(0, 32), range(32, 64), range(64, 96), range(96, 100)]
    assert got["fused_pairs"] == 0 and got["n_texts"] == 100 and got["n_images"] == 20
    assert all(got[key] >= 0 for key in ("embed_s", "first_stage_s", "rerank_s", "recall_s", "total_s"))


def test_evaluate_retrieval_rerank_improves_recall_with_linear_cost():
    t2i, texts, images = structured_embeddings(30, 5, 3.0, 1)
    oracle = matching_oracle(t2i, 30)
    embed_t, embed_i = (lambda s: texts[s.start:s.stop]), (lambda s: images[s.start:s.stop])
    first = evaluate_retrieval(embed_t, embed_i, None, t2i, k=8, batch_size=50)
    got = evaluate_retrieval(embed_t, embed_i, oracle, t2i, k=8, batch_size=50)
    cosine = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).t()
    # A perfect ITM puts the true match first whenever the first stage had it in the top 8.
    assert got["ir_r1"] == pytest.approx(recall_at_k(cosine, t2i, ks=(8,))["ir_r8"])
    assert got["tr_r1"] == pytest.approx(recall_at_k(cosine, t2i, ks=(8,))["tr_r8"])
    assert got["ir_r1"] > first["ir_r1"] and got["tr_r1"] > first["tr_r1"]
    assert got["fused_pairs"] == len(oracle.pairs) == len(candidate_union(cosine, 8)) <= 8 * (150 + 30)


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "message"), [
    (lambda: rerank(SIX, 0, matching_oracle(SIX_T2I, 3), 4), "k must be a positive integer, got 0"),
    (lambda: rerank(SIX, 2, matching_oracle(SIX_T2I, 3), 0), "batch_size must be a positive integer"),
    (lambda: rerank(SIX[0], 2, matching_oracle(SIX_T2I, 3), 4), "must be a non-empty 2-D tensor, got (3,)"),
    (lambda: rerank(SIX.clone().index_put_((torch.tensor(2), torch.tensor(1)), torch.tensor(float("inf"))), 2,
                    matching_oracle(SIX_T2I, 3), 4), "holds inf at row 2, column 1"),
    (lambda: rerank(SIX, 2, lambda t, i: torch.zeros(len(t), 2), 4), "score_pairs returned (4, 2) for a batch of 4"),
    (lambda: rerank(SIX, 2, lambda t, i: torch.full((len(t),), float("nan")), 4), "scores must be finite"),
    (lambda: recall_at_k(HAND, [0, 0, 1]), "text_to_image has 3 entries but there are 4 texts"),
    (lambda: recall_at_k(HAND, [0, 0, 1, 2]), "text_to_image[3] = 2 is out of range; there are 2 images"),
    (lambda: recall_at_k(HAND, [0, -1, 1, 1]), "text_to_image[1] = -1 is out of range"),
    (lambda: recall_at_k(HAND, [0, 0, 0, 0]), "1 of 2 images have no caption in text_to_image (first: 1)"),
    (lambda: recall_at_k(HAND, [0.0, 0.0, 1.0, 1.0]), "must hold integer image indices"),
    (lambda: recall_at_k(HAND, HAND_T2I, ks=(1, 0)), "every K in ks must be a positive integer, got 0"),
    (lambda: recall_at_k(HAND, HAND_T2I, sim_i2t=HAND), "sim_i2t has shape (4, 2)"),
    (lambda: recall_at_k(torch.tensor([[1.0, float("nan")]] * 4), HAND_T2I), "not NaN"),
    (lambda: evaluate_retrieval(lambda s: torch.zeros(len(s), 4), lambda s: torch.zeros(len(s), 4), None,
                                HAND_T2I, k=0, batch_size=2), "evaluate_retrieval: k must be a positive integer"),
    (lambda: evaluate_retrieval(lambda s: torch.zeros(len(s) + 1, 4), lambda s: torch.zeros(len(s), 4), None,
                                HAND_T2I, k=2, batch_size=2), "embed_texts returned (3, 4) for texts 0..1"),
    (lambda: evaluate_retrieval(lambda s: torch.zeros(len(s), 4), lambda s: torch.zeros(len(s), 5), None,
                                HAND_T2I, k=2, batch_size=2), "text embeddings are 4 wide but image embeddings are 5"),
    (lambda: evaluate_retrieval(lambda s: torch.zeros(len(s), 4), lambda s: torch.zeros(len(s), 4), None,
                                [0, 0, 2, 2], k=2, batch_size=2), "images have no caption"),
])
def test_bad_input_raises_ren_error_naming_the_problem(call, message):
    with pytest.raises(RenError) as info:
        call()
    assert message in str(info.value)
