"""One-tower training-step throughput: ren's one-tower encoder against Hugging Face ``ViltForQuestionAnswering``.

    .venv/bin/python bench/one_tower_vs_vilt.py [--repeats 7] [--steps 1] [--threads 1] [--quick]
    python3 bench/one_tower_vs_vilt.py --device cuda [--dtype bf16] [--batch N] [--results FILE] [--json FILE]

Both sides are built at identical sizes with random weights: hidden size, layers, heads, MLP width,
patch size, image size, text length, vocabulary, number of answers, dropout and batch. ren's side
is built from a config as the trainer builds it (``config_from_dict`` + ``build_model``: kind
``one_tower``, a manual ViT-style backbone of modality ``vision`` — ViLT's own layout, a pre-norm
ViT stack with fresh BERT-style text embeddings — and the VQA task head at ``head_hidden_mult = 2``,
which is ViLT's classifier ``Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, answers)``).
HF's side is ``ViltForQuestionAnswering`` (``ViltModel`` with its pooler, plus that classifier).

One measurement is ``--steps`` full training steps of one side: forward, the VQA loss (binary
cross-entropy against soft targets, times the number of answers: ViLT's loss, and ren's
``task.loss = "bce"``), backward, ``AdamW.step`` and ``zero_grad``. Both sides get the same
inputs (text with padded rows, so both apply a key mask). The sides alternate
(``bench/_results.alternate``, rotating which goes first) for ``--repeats`` rounds after a warm-up
step each; the table gives median step times, samples/s and the ratio ``ren / HF`` of samples/s.

Image tokens: ViLT's embedding samples at most ``max_image_length`` patches per image; with
``max_image_length = -1`` (set explicitly here) it keeps all of them (it draws them in a random
order, which attention with per-patch position embeddings does not care about), so both sides
see ``1 + (image/patch)^2`` image tokens plus the text tokens. ViLT in transformers 5 has only
its eager attention (no SDPA); ren's backbone is HF's ViT with ``attn_implementation = "sdpa"``.
``--quick`` runs tiny sizes for a smoke check and prints only; otherwise the section
``one_tower_vs_vilt`` of ``bench/RESULTS.md`` is rewritten.

``--device cuda`` (``bench/gpu_check.sh``) runs both sides on the GPU under bf16 autocast at ViLT-B/32's
sizes (``GPU_SIZES``, batch 128), counts each side's FLOPs per step and reports achieved TFLOP/s and MFU
against the bf16 matmul peak measured in the same process; it writes the section ``one_tower_vs_vilt_gpu``
(of ``--results``, default ``bench/RESULTS.md``). On the GPU ViLT's eager attention still materialises the
attention matrix while ren's runs in SDPA's fused kernels, dropout included.
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
    throughput_main,
    throughput_table,
    time_steps,
    training_steps,
    vqa_inputs,
)


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    mlp_ratio: float
    patch: int
    image: int
    text_len: int
    vocab: int
    answers: int
    batch: int
    dropout: float = 0.0

    def label(self) -> str:
        return (f"D={self.hidden}, {self.layers} layers, {self.heads} heads, MLP {int(self.hidden * self.mlp_ratio)}, "
                f"{self.image}px/{self.patch} ({(self.image // self.patch) ** 2 + 1} image tokens), "
                f"text {self.text_len}, vocab {self.vocab}, {self.answers} answers, batch {self.batch}, "
                f"dropout {self.dropout}")


DEFAULT_SIZES = [
    Size(256, 4, 4, 4.0, 16, 224, 40, 30522, 3129, 16),
    Size(256, 4, 4, 4.0, 16, 224, 40, 30522, 3129, 16, dropout=0.1),
    Size(384, 6, 6, 4.0, 32, 384, 40, 30522, 3129, 16),
    Size(768, 12, 12, 4.0, 32, 384, 40, 30522, 3129, 16),  # ViLT-B/32's own sizes
]
QUICK_SIZES = [Size(64, 2, 2, 4.0, 16, 64, 16, 1000, 50, 4), Size(64, 2, 2, 4.0, 16, 64, 16, 1000, 50, 4, 0.1)]
# ViLT-B/32 at a per-GPU batch that fills an H100, at both dropouts (0.1 is what ViLT trained with)
GPU_SIZES = [Size(768, 12, 12, 4.0, 32, 384, 40, 30522, 3129, 128),
             Size(768, 12, 12, 4.0, 32, 384, 40, 30522, 3129, 128, dropout=0.1)]


def make_inputs(size: Size, seed: int = 0, rt: Runtime = Runtime()):
    tensors = vqa_inputs(batch=size.batch, text_len=size.text_len, vocab=size.vocab, image=size.image,
                         answers=size.answers, cls_id=101 if size.vocab > 101 else 1, seed=seed)
    return tuple(t.to(rt.torch_device) for t in tensors)


def build_ren(size: Size):
    from engine.config import config_from_dict
    from engine.models import build_model

    cfg = config_from_dict({
        "model": {"kind": "one_tower", "pooler": "single", "backbone": {
            "source": "manual", "modality": "vision", "hidden_size": size.hidden, "layers": size.layers,
            "heads": size.heads, "mlp_ratio": size.mlp_ratio, "dropout": size.dropout, "patch_size": size.patch,
            "image_size": size.image, "max_text_positions": size.text_len}},
        "task": {"name": "vqa", "loss": "bce", "head_hidden_mult": 2.0},
    })
    return build_model(cfg, vocab_size=size.vocab, num_answers=size.answers).train()


def build_vilt(size: Size):
    from transformers import ViltConfig, ViltForQuestionAnswering

    config = ViltConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, intermediate_size=int(size.hidden * size.mlp_ratio),
        hidden_dropout_prob=size.dropout, attention_probs_dropout_prob=size.dropout, image_size=size.image,
        patch_size=size.patch, max_position_embeddings=size.text_len, max_image_length=-1, num_labels=size.answers,
    )
    return ViltForQuestionAnswering(config).train()


def step_fns(size: Size, rt: Runtime = Runtime()):
    """(ren step, HF step, ren model, HF model): each step runs one full training step on the same inputs.
    Both models are built on ``rt``'s device (initialised there: fast on a GPU)."""

    from engine.tasks import task_loss

    ids, mask, pixels, targets = make_inputs(size, rt=rt)
    ren, vilt = seeded_pair(rt, lambda: build_ren(size), lambda: build_vilt(size))
    ren_step, vilt_step = training_steps(
        ren, lambda: task_loss("vqa", ren(ids, mask, pixels, task=True).logits["task"], targets, "bce"),
        vilt, lambda: vilt(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=targets).loss, rt)
    return ren_step, vilt_step, ren, vilt


def image_tokens(size: Size, ren, vilt, rt: Runtime = Runtime()) -> tuple[int, int]:
    """How many image tokens each side actually puts through its encoder (checked, not assumed)."""
    import torch

    ids, mask, pixels, _ = make_inputs(size, rt=rt)
    with torch.no_grad():
        ren_tokens = ren.encoder.embed_image(pixels).shape[1]
        vilt_tokens = vilt.vilt(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state.shape[1]
    return ren_tokens, vilt_tokens - size.text_len


def measure(size: Size, repeats: int, steps: int, rt: Runtime = Runtime()) -> dict:
    ren_step, vilt_step, ren, vilt = step_fns(size, rt)
    ren_tokens, vilt_tokens = image_tokens(size, ren, vilt, rt)
    if ren_tokens != vilt_tokens:
        raise SystemExit(f"image token counts differ: ren {ren_tokens}, ViLT {vilt_tokens}")
    flops = {"ren": step_flops(ren_step), "ref": step_flops(vilt_step)} if rt.accounted else None
    wall, cpu = time_steps({"ren": ren_step, "ref": vilt_step}, repeats, steps, rt.sync())
    peak = matmul_peak(rt) if rt.accounted else None
    return {**step_result(size, ren, vilt, wall, cpu, flops, peak), "hf_pooler": params(vilt.vilt.pooler),
            "hf_token_type": params(vilt.vilt.embeddings.text_embeddings.token_type_embeddings), "tokens": ren_tokens}


def report(results: list[dict], threads: int, repeats: int, steps: int, rt: Runtime = Runtime()) -> str:
    body = throughput_table(results, "ren one_tower", "HF ViltForQuestionAnswering", "HF")
    if rt.accounted and results[0].get("peak_flops"):
        body += f"\n\nMeasured {rt.dtype} matmul peak: {results[0]['peak_flops'] / 1e12:.1f} TFLOP/s."
    diffs = ", ".join(sorted({f"D={r['size'].hidden}: HF {r['ref_params'] - r['ren_params']:+,}, token-type table "
                              f"{r['hf_token_type']:,}" for r in results}))
    r0_tokens = results[0]["tokens"] + results[0]["size"].text_len - 1
    r_layers_all = " / ".join(str(r["size"].layers) for r in results)
    return body + f"""

{compared(threads, repeats, steps, "HF", rt)}
ren: `build_model` on a `one_tower` config with a manual
`modality = "vision"` backbone (HF `ViTModel` layers with SDPA attention, ren's fresh text embeddings,
modality-type embedding and pooler, task head with `head_hidden_mult = 2`). HF:
`ViltForQuestionAnswering` (eager attention: ViLT has no SDPA path in transformers 5) with
`max_image_length = -1`, so ViLT keeps every patch; both encoders were checked to take the same
number of image tokens ({", ".join(str(r["tokens"]) for r in results)}) after the text tokens.

Where ren's time goes differently: the encoder layers are the same matmuls on both sides, but
(1) the VQA head reads only the pooler's [CLS] row of the last layer, so ren's last layer computes
only that row (`engine/models/rows.py`: every token still serves as a key and value, but the queries,
attention output, residuals, norms and MLP of the other {r0_tokens} rows at the first row's sizes are never
computed), which removes most of the last of the encoder's {r_layers_all} layers (by row above) while ViLT
computes and discards them; and (2) at dropout 0.0 PyTorch runs ren's attention in its fused CPU flash kernel while ViLT
materialises the attention matrix (matmul, softmax, matmul). With attention dropout > 0 PyTorch's
CPU SDPA has no fused kernel and falls back to the same materialised softmax-dropout-matmul that ViLT
runs, so at 0.1 only (1) is left, plus small differences both ways: ViLT's per-image Python patch
selection (`visual_embed`: per-row `nonzero`, `multinomial`, interpolated position tables) on one
side and the extra masking ops of SDPA's math fallback (`_safe_softmax`) on the other. Dropout 0.0
is the default of both (`ViltConfig` and ren's backbone `dropout`); the original ViLT training used
0.1, hence the 0.1 row. The more layers, the smaller (1) is: it saves about 1/layers of the encoder.

Parameters: ViLT's pooler ({results[0]["hf_pooler"]:,} parameters at D={results[0]["size"].hidden})
is matched by ren's pooler; both have the same encoder layers, final LayerNorm, classifier, patch
projection, [CLS] and position tables, word and position embeddings and a 2-row modality-type
table. The only difference ({diffs}) is ViLT's BERT-style 2-row token-type table inside its text
embedding, which ren's text embedding does not have.
"""


def main() -> None:
    throughput_main(__doc__, "one_tower_vs_vilt", "1. One-tower step throughput: ren vs HF ViltForQuestionAnswering",
                    DEFAULT_SIZES, QUICK_SIZES, measure, report, "HF", GPU_SIZES)

if __name__ == "__main__":
    main()
