"""Two-tower training-step throughput: ren's two-tower (METER-style) model against the seed's wiring.

    .venv/bin/python bench/two_tower_vs_lxmert.py [--repeats 7] [--steps 1] [--threads 1] [--quick]
    python3 bench/two_tower_vs_lxmert.py --device cuda [--dtype bf16] [--batch N] [--results FILE] [--json FILE]

The seed (the Renaissance code, bsu-slim/renaissance, ``TwoTowerEncoder``) builds its two-tower
model from Hugging Face parts: a text tower and a vision tower from ``AutoModel.from_config``, a
linear projection of each to the fusion width, a 2-row token-type embedding added to the projected
streams, a stack of ``transformers.models.lxmert.modeling_lxmert.LxmertXLayer`` co-attention layers
(one cross-attention module shared by both directions, then self-attention and an FFN per stream,
post-LayerNorm, eager attention) configured by an ``LxmertConfig`` of the fusion width, heads and
MLP width, and a dense+tanh pooler on each stream's first token, concatenated. The reference here
is that wiring, rebuilt (not copied): ``BertModel`` and ``ViTModel`` towers of the same sizes as
ren's, the projections, the token types, N ``LxmertXLayer`` and the two poolers, with the same
classifier as ren's VQA head (``Linear(2D, 4D) -> LayerNorm -> GELU -> Linear(4D, answers)``).

ren's side is built as the trainer builds it (``config_from_dict`` + ``build_model``, kind
``two_tower`` with manual BERT/ViT towers and ``head_hidden_mult = 2``). One measurement is
``--steps`` full training steps of one side (forward, the VQA BCE loss on soft targets times the
number of answers, backward, ``AdamW.step``, ``zero_grad``) on the same inputs; the sides
alternate (``bench/_results.alternate``) for ``--repeats`` rounds after a warm-up step each. The
table gives median step times, samples/s and the ratio ``ren / reference`` of samples/s.
``--quick`` runs tiny sizes and prints only; otherwise the section ``two_tower_vs_lxmert`` of
``bench/RESULTS.md`` is rewritten.

``--device cuda`` (``bench/gpu_check.sh``) runs both sides on the GPU under bf16 autocast at ViLT-B/32's
sizes for each tower with METER's fusion (6 co-attention layers of width 768, 12 heads; ``GPU_SIZES``,
batch 128), counts each side's FLOPs per step and reports achieved TFLOP/s and MFU against the bf16 matmul
peak measured in the same process; it writes the section ``two_tower_vs_lxmert_gpu`` (of ``--results``,
default ``bench/RESULTS.md``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import (  # noqa: E402
    Runtime,
    compared,
    matmul_peak,
    params,
    seeded_pair,
    step_flops,
    step_result,
    table,
    throughput_main,
    throughput_table,
    time_steps,
    training_steps,
    vqa_inputs,
)


@dataclass(frozen=True)
class Size:
    tower_hidden: int
    tower_layers: int
    tower_heads: int
    fusion_hidden: int
    fusion_layers: int
    fusion_heads: int
    mlp_ratio: float
    patch: int
    image: int
    text_len: int
    vocab: int
    answers: int
    batch: int
    fusion_dropout: float
    tower_dropout: float = 0.0

    def label(self) -> str:
        return (f"towers D={self.tower_hidden} x {self.tower_layers} layers / {self.tower_heads} heads, "
                f"fusion D={self.fusion_hidden} x {self.fusion_layers} / {self.fusion_heads} heads, "
                f"MLP x{self.mlp_ratio:g}, {self.image}px/{self.patch} ({(self.image // self.patch) ** 2 + 1} "
                f"image tokens), text {self.text_len}, vocab {self.vocab}, {self.answers} answers, "
                f"batch {self.batch}, dropout towers {self.tower_dropout} / fusion {self.fusion_dropout}")


DEFAULT_SIZES = [
    Size(256, 4, 4, 256, 2, 4, 4.0, 16, 224, 40, 30522, 3129, 16, fusion_dropout=0.1),
    Size(256, 4, 4, 256, 2, 4, 4.0, 16, 224, 40, 30522, 3129, 16, fusion_dropout=0.0),
]
QUICK_SIZES = [Size(64, 2, 2, 64, 1, 2, 4.0, 16, 64, 16, 1000, 50, 4, fusion_dropout=0.1)]
# ViLT-B/32's sizes for each tower, METER's fusion (6 layers of 768, 12 heads), at a per-GPU batch of 128
GPU_SIZES = [Size(768, 12, 12, 768, 6, 12, 4.0, 32, 384, 40, 30522, 3129, 128, fusion_dropout=0.1)]


def make_inputs(size: Size, seed: int = 0, rt: Runtime = Runtime()):
    tensors = vqa_inputs(batch=size.batch, text_len=size.text_len, vocab=size.vocab, image=size.image,
                         answers=size.answers, seed=seed)
    return tuple(t.to(rt.torch_device) for t in tensors)


def build_ren(size: Size):
    from engine.config import config_from_dict
    from engine.models import build_model

    tower = {"source": "manual", "hidden_size": size.tower_hidden, "layers": size.tower_layers,
             "heads": size.tower_heads, "mlp_ratio": size.mlp_ratio, "dropout": size.tower_dropout}
    cfg = config_from_dict({
        "model": {"kind": "two_tower",
                  "text": {**tower, "max_positions": size.text_len},
                  "vision": {**tower, "patch_size": size.patch, "image_size": size.image},
                  "fusion": {"hidden_size": size.fusion_hidden, "layers": size.fusion_layers,
                             "heads": size.fusion_heads, "mlp_ratio": size.mlp_ratio,
                             "dropout": size.fusion_dropout}},
        "task": {"name": "vqa", "loss": "bce", "head_hidden_mult": 2.0},
    })
    return build_model(cfg, vocab_size=size.vocab, num_answers=size.answers).train()


def build_reference(size: Size):
    """The seed's two-tower wiring at ``size``: HF towers, projections, token types, LxmertXLayer fusion,
    poolers and the VQA classifier."""
    import torch
    from torch import nn
    from transformers import AutoModel, BertConfig, LxmertConfig, ViTConfig
    from transformers.models.lxmert.modeling_lxmert import LxmertXLayer

    tower = dict(hidden_size=size.tower_hidden, num_hidden_layers=size.tower_layers,
                 num_attention_heads=size.tower_heads, intermediate_size=int(size.tower_hidden * size.mlp_ratio),
                 hidden_dropout_prob=size.tower_dropout, attention_probs_dropout_prob=size.tower_dropout)
    fusion_config = LxmertConfig(
        vocab_size=size.vocab, hidden_size=size.fusion_hidden, num_attention_heads=size.fusion_heads,
        intermediate_size=int(size.fusion_hidden * size.mlp_ratio), max_position_embeddings=size.text_len,
        hidden_dropout_prob=size.fusion_dropout, attention_probs_dropout_prob=size.fusion_dropout,
    )
    d = size.fusion_hidden

    class Pooler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.dense(x[:, 0]))

    class SeedTwoTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = AutoModel.from_config(BertConfig(vocab_size=size.vocab, pad_token_id=0,
                                                         max_position_embeddings=size.text_len, **tower))
            self.vision = AutoModel.from_config(ViTConfig(image_size=size.image, patch_size=size.patch,
                                                          qkv_bias=True, **tower))
            self.text_proj = nn.Linear(size.tower_hidden, d)
            self.image_proj = nn.Linear(size.tower_hidden, d)
            self.token_type = nn.Embedding(2, d)
            self.fusion = nn.ModuleList(LxmertXLayer(fusion_config) for _ in range(size.fusion_layers))
            self.text_pooler, self.image_pooler = Pooler(), Pooler()
            self.classifier = nn.Sequential(nn.Linear(2 * d, 4 * d), nn.LayerNorm(4 * d), nn.GELU(),
                                            nn.Linear(4 * d, size.answers))

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
            t = self.text_proj(self.text(input_ids=ids, attention_mask=mask).last_hidden_state)
            v = self.image_proj(self.vision(pixel_values=pixels).last_hidden_state)
            t = t + self.token_type.weight[0]
            v = v + self.token_type.weight[1]
            t_mask = (1.0 - mask[:, None, None, :].to(t.dtype)) * torch.finfo(t.dtype).min
            v_mask = t.new_zeros(v.shape[0], 1, 1, v.shape[1])  # the seed's extended mask of an all-ones image mask
            for layer in self.fusion:
                t, v = layer(t, t_mask, v, v_mask)[:2]
            return self.classifier(torch.cat([self.text_pooler(t), self.image_pooler(v)], dim=-1))

    return SeedTwoTower().train()


def step_fns(size: Size, rt: Runtime = Runtime()):
    """(ren step, reference step, ren model, reference model), each one full training step on the same inputs.
    Both models are built on ``rt``'s device (initialised there: fast on a GPU)."""

    from engine.tasks import task_loss

    ids, mask, pixels, targets = make_inputs(size, rt=rt)
    ren, ref = seeded_pair(rt, lambda: build_ren(size), lambda: build_reference(size))
    ren_step, ref_step = training_steps(
        ren, lambda: task_loss("vqa", ren(ids, mask, pixels, task=True).logits["task"], targets, "bce"),
        ref, lambda: task_loss("vqa", ref(ids, mask, pixels), targets, "bce"), rt)
    return ren_step, ref_step, ren, ref


def param_breakdown(ren, ref) -> dict[str, tuple[int, int]]:
    """(ren, reference) parameters per part."""
    enc = ren.encoder
    return {
        "text tower": (params(enc.text), params(ref.text)),
        "vision tower": (params(enc.vision), params(ref.vision)),
        "projections + token types": (params(enc.text_proj) + params(enc.image_proj) + params(enc.modality_type),
                                      params(ref.text_proj) + params(ref.image_proj) + params(ref.token_type)),
        "fusion layers": (params(enc.fusion), params(ref.fusion)),
        "final norms": (params(enc.text_norm) + params(enc.image_norm), 0),
        "poolers": (params(enc.text_pooler) + params(enc.image_pooler),
                    params(ref.text_pooler) + params(ref.image_pooler)),
        "classifier": (params(ren.heads), params(ref.classifier)),
    }


def measure(size: Size, repeats: int, steps: int, rt: Runtime = Runtime()) -> dict:
    ren_step, ref_step, ren, ref = step_fns(size, rt)
    flops = {"ren": step_flops(ren_step), "ref": step_flops(ref_step)} if rt.accounted else None
    wall, cpu = time_steps({"ren": ren_step, "ref": ref_step}, repeats, steps, rt.sync())
    peak = matmul_peak(rt) if rt.accounted else None
    return {**step_result(size, ren, ref, wall, cpu, flops, peak), "breakdown": param_breakdown(ren, ref)}


def report(results: list[dict], threads: int, repeats: int, steps: int, rt: Runtime = Runtime()) -> str:
    body = throughput_table(results, "ren two_tower", "seed wiring (HF towers + LxmertXLayer)", "seed")
    if rt.accounted and results[0].get("peak_flops"):
        body += f"\n\nMeasured {rt.dtype} matmul peak: {results[0]['peak_flops'] / 1e12:.1f} TFLOP/s."
    parts = table(["part", "ren", "seed wiring", "difference"],
                  [[name, f"{a:,}", f"{b:,}", f"{a - b:+,}"] for name, (a, b) in results[0]["breakdown"].items()])
    return body + f"""

{compared(threads, repeats, steps, "seed", rt)}
Both sides run the same towers: HF `BertModel` and `ViTModel` built from configs of the same
sizes with SDPA attention (ren builds them itself; the seed's `AutoModel.from_config` picks SDPA too,
and keeps the unused BERT/ViT poolers), so the difference is in the fusion: ren's `FusionLayer`s
(pre-LayerNorm; per stream self-attention, cross-attention and MLP on SDPA, fused key/value
projection) against `LxmertXLayer` (post-LayerNorm; eager attention; one cross-attention module
shared by both directions). Two deliberate departures from the seed's code, both to keep the work
equal: the reference text tower gets the attention mask (the seed calls it without one) and runs its
embedding once (the seed embeds the ids, then passes the result as `inputs_embeds`, which embeds
positions a second time).

Parameters at the first row's sizes, per part:

{parts}

ren's fusion has more parameters because each stream has its own cross-attention (LXMERT shares one
between the two directions) and its pre-norm blocks have 4 LayerNorms per stream (self, cross query,
cross context, MLP) plus final norms, against LXMERT's 2 per stream plus the shared cross-attention
one; the matmul FLOPs per step are the same, since LXMERT runs its shared cross-attention in both
directions too. The seed's towers carry their HF poolers (and BERT's 2-row token-type table), unused.

Where ren's time goes differently (the towers are the same HF code on both sides, so only the fusion
can differ):
- The classifier reads only the two [CLS] rows of the last fusion layer (the poolers' inputs), so
  ren's last fusion layer computes only those rows (`TwoTower.fuse(tokens=())`, see
  `engine/models/rows.py`): every row still serves as a key and value, but the queries, attention
  outputs, residuals, norms and MLPs of the other rows are never computed. LXMERT computes and
  discards them; with 2 fusion layers that is about a quarter of the fusion's matmul work.
- At fusion dropout 0.0 ren's fusion attention runs in PyTorch's fused CPU flash kernel; LXMERT's eager
  attention materialises the attention matrix. At 0.1 CPU SDPA has no fused kernel and both sides
  materialise it.
- ren's fusion MLP has no dropout inside (Linear, GELU, Linear; the block's output is dropped before
  the residual), as in METER's and the seed's BERT-style layers. Until 2026-11-28 it also dropped the
  4x-wide hidden activation, a regularisation METER does not have and the most expensive elementwise
  op of the step on CPU (drawing the masks); it was removed as a departure from METER, and both
  dropout rows above are measured without it.
- One more LayerNorm per stream remains on ren's side (the context norm of its pre-norm cross-attention).
"""


def main() -> None:
    throughput_main(__doc__, "two_tower_vs_lxmert",
                    "2. Two-tower step throughput: ren vs the seed's LxmertXLayer wiring", DEFAULT_SIZES, QUICK_SIZES,
                    measure, report, "seed", GPU_SIZES)

if __name__ == "__main__":
    main()
