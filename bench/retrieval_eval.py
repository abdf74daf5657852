"""Two-stage retrieval evaluation cost: fused pairs and wall time grow linearly in k.

    .venv/bin/python bench/retrieval_eval.py [--ks 4 16 64] [--repeats 3] [--threads 1]

A Flickr30k-sized test set (1,000 images x 5 captions) with synthetic
embeddings: each caption's embedding is its image's plus Gaussian noise, so the
cosine first stage is right often but not always. The ITM stand-in runs a real
2-layer transformer fusion module (width 48, 4 heads) on CPU over [CLS], 12
text tokens and 10 image tokens (3x3 patches + CLS) for every pair it scores,
in batches; its score is a sharper (less noisy) caption-image similarity plus
a small term from the fusion output, so reranking helps the way a fusion
model's ITM head does. Weights are random: the compute per pair is real, the
score is not learned.

For each k it runs :func:`engine.retrieval.evaluate_retrieval` ``--repeats``
times and prints the median wall times, the fused pairs (against the
k x (texts + images) bound and the 5,000,000 pairs of a full rerank), and
Recall@1/5/10 both ways. Ends with one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.retrieval import evaluate_retrieval  # noqa: E402

N_IMAGES, CAPTIONS, EMBED_DIM = 1000, 5, 256
TEXT_TOKENS, IMAGE_TOKENS, WIDTH = 12, 10, 48


class Fusion(nn.Module):
    """Tiny one-stream fusion encoder with an ITM head (random weights)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=4 * WIDTH, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.02)
        self.itm = nn.Linear(WIDTH, 2)

    def forward(self, text_tokens: Tensor, image_tokens: Tensor) -> Tensor:
        x = torch.cat([self.cls.expand(len(text_tokens), -1, -1), text_tokens, image_tokens], dim=1)
        return self.itm(self.encoder(x)[:, 0])[:, 1]


def make_data(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_to_image = torch.arange(N_IMAGES).repeat_interleave(CAPTIONS)[torch.randperm(N_IMAGES * CAPTIONS,
                                                                                      generator=g)]
    images = torch.randn(N_IMAGES, EMBED_DIM, generator=g)
    offsets = torch.randn(len(text_to_image), EMBED_DIM, generator=g)
    return {"text_to_image": text_to_image, "images": images,
            "texts": images[text_to_image] + 5.0 * offsets,  # what the unimodal encoders see
            "texts_sharp": images[text_to_image] + 3.5 * offsets,  # what the fusion model resolves
            "text_tokens": torch.randn(len(text_to_image), TEXT_TOKENS, WIDTH, generator=g),
            "image_tokens": torch.randn(N_IMAGES, IMAGE_TOKENS, WIDTH, generator=g)}


def itm_oracle(data: dict[str, Tensor], fusion: Fusion):
    sharp = nn.functional.normalize(data["texts_sharp"], dim=1)
    images = nn.functional.normalize(data["images"], dim=1)

    def score(text_idx: Tensor, image_idx: Tensor) -> Tensor:
        fused = fusion(data["text_tokens"][text_idx], data["image_tokens"][image_idx])
        return 10.0 * (sharp[text_idx] * images[image_idx]).sum(1) + 0.01 * torch.tanh(fused)

    return score


def run(data: dict[str, Tensor], fusion: Fusion, k: int | None, batch_size: int) -> dict:
    return evaluate_retrieval(lambda s: data["texts"][s.start:s.stop], lambda s: data["images"][s.start:s.stop],
                              None if k is None else itm_oracle(data, fusion), data["text_to_image"].tolist(),
                              k=k or 1, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = make_data(args.seed)
    fusion = Fusion().eval()
    n_texts = len(data["text_to_image"])
    with torch.no_grad():  # warm-up, and the fusion cost per pair on its own
        pairs = torch.arange(args.batch_size) % N_IMAGES
        fusion(data["text_tokens"][pairs], data["image_tokens"][pairs])
        t0 = time.perf_counter()
        for _ in range(5):
            fusion(data["text_tokens"][pairs], data["image_tokens"][pairs])
        fusion_us = (time.perf_counter() - t0) / (5 * args.batch_size) * 1e6
    print(f"{n_texts} texts x {N_IMAGES} images, fusion {fusion_us:.1f} us/pair in batches of {args.batch_size}, "
          f"{args.threads} threads, median of {args.repeats}")
    header = (f"{'k':>6} {'fused pairs':>12} {'k(nt+ni)':>10} {'pairs/k':>8} {'rerank s':>9} {'us/pair':>8} "
              f"{'total s':>8}  {'IR@1':>5} {'IR@5':>5} {'IR@10':>5} {'TR@1':>5} {'TR@5':>5} {'TR@10':>5} {'rmean':>5}")
    print(header)
    rows = []
    for k in [None, *args.ks]:
        results = [run(data, fusion, k, args.batch_size) for _ in range(args.repeats)]
        med = {key: statistics.median(r[key] for r in results)
               for key in ("rerank_s", "total_s", "embed_s", "first_stage_s", "recall_s")}
        last = results[-1]
        fused = last["fused_pairs"]
        row = {"k": k, "fused_pairs": fused, "bound": 0 if k is None else k * (n_texts + N_IMAGES), **med,
               **{key: last[key] for key in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean")}}
        rows.append(row)
        per_pair = med["rerank_s"] / fused * 1e6 if fused else 0.0
        print(f"{'ITC' if k is None else k:>6} {fused:>12,} {row['bound']:>10,} {fused / (k or 1):>8.0f} "
              f"{med['rerank_s']:>9.2f} {per_pair:>8.1f} {med['total_s']:>8.2f}  {row['ir_r1']:>5.1f} "
              f"{row['ir_r5']:>5.1f} {row['ir_r10']:>5.1f} {row['tr_r1']:>5.1f} {row['tr_r5']:>5.1f} "
              f"{row['tr_r10']:>5.1f} {row['r_mean']:>5.1f}")
    full = n_texts * N_IMAGES
    reranked = [r for r in rows if r["k"] is not None]
    rate = max(r["rerank_s"] / r["fused_pairs"] for r in reranked) if reranked else fusion_us * 1e-6
    print(f"a full (quadratic) rerank would fuse {full:,} pairs: about {full * rate:.0f} s at the slowest "
          "measured rate per pair")
    print(json.dumps({"n_texts": n_texts, "n_images": N_IMAGES, "fusion_us_per_pair": fusion_us,
                      "threads": args.threads, "repeats": args.repeats, "rows": rows,
                      "full_rerank_pairs": full, "full_rerank_est_s": full * rate}))


if __name__ == "__main__":
    main()
