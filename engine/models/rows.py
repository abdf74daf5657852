"""The last encoder layer, computed only for the rows a loss reads.

Hugging Face's encoders compute every row of the last layer; :func:`layer_rows` runs a Hugging Face layer
on a subset of query rows with the layer's own weights and arithmetic, so the kept rows (and their
gradients) are those of the full layer. Unregistered layer families and layers with an FSDP unit inside
run whole and are sliced. Why and what it saves: docs/presets-guide.md, "The last layer computes only the
rows the heads read".
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Rows = slice | Tensor


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, head_dim: int, scale: float,
            dropout: float) -> Tensor:
    """Multi-head attention of ``(B, Lq, D)`` queries over ``(B, L, D)`` keys and values."""
    b, lq, d = q.shape
    q = q.view(b, lq, -1, head_dim).transpose(1, 2)
    k = k.view(b, k.shape[1], -1, head_dim).transpose(1, 2)
    v = v.view(b, v.shape[1], -1, head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return y.transpose(1, 2).reshape(b, lq, d)


def _pre_norm(layer: nn.Module, x: Tensor, mask: Tensor | None, rows: Rows) -> Tensor:
    """ViT-style (``ViTLayer``, ``DeiTLayer``): LayerNorm before attention and before the MLP."""
    attn = layer.attention
    h = layer.layernorm_before(x)
    y = _attend(attn.q_proj(h[:, rows]), attn.k_proj(h), attn.v_proj(h), mask, attn.head_dim, attn.scaling,
                attn.attention_dropout if attn.training else 0.0)
    y = layer.dropout(attn.o_proj(y)) + x[:, rows]
    return layer.dropout(layer.mlp(layer.layernorm_after(y))) + y


def _post_norm(layer: nn.Module, x: Tensor, mask: Tensor | None, rows: Rows) -> Tensor:
    """BERT-style (``BertLayer``, ``RobertaLayer``, ``ElectraLayer``): LayerNorm after each residual."""
    self_attn = layer.attention.self
    xq = x[:, rows]
    y = _attend(self_attn.query(xq), self_attn.key(x), self_attn.value(x), mask, self_attn.attention_head_size,
                self_attn.scaling, self_attn.dropout.p if self_attn.training else 0.0)
    y = layer.attention.output(y, xq)
    return layer.output(layer.intermediate(y), y)


LAYOUTS: dict[str, Callable[[nn.Module, Tensor, Tensor | None, Rows], Tensor]] = {
    "ViTLayer": _pre_norm,
    "DeiTLayer": _pre_norm,
    "BertLayer": _post_norm,
    "RobertaLayer": _post_norm,
    "ElectraLayer": _post_norm,
}


def _sharded(module: nn.Module) -> bool:
    """An FSDP unit (FSDP1's wrapper, FSDP2's ``FSDP<Class>``) gathers its parameters in its own forward,
    which calling its parts directly would skip."""
    return type(module).__name__.startswith(("FullyShardedDataParallel", "FSDP"))


def supports_rows(layer: nn.Module) -> bool:
    """Whether :func:`layer_rows` computes only the kept rows of this layer (rather than all, sliced):
    a registered family, not a decoder, with no FSDP unit inside it."""
    return (type(layer).__name__ in LAYOUTS and not getattr(layer, "is_decoder", False)
            and not any(_sharded(m) for m in layer.modules()))


def run_layer(layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """A Hugging Face encoder layer on every row (through ``__call__``: hooks and checkpointing apply)."""
    out = layer(x, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


def layer_rows(layer: nn.Module, x: Tensor, mask: Tensor | None, rows: Rows | None) -> Tensor:
    """The output rows ``rows`` (None: all) of a Hugging Face encoder layer on ``x`` ``(B, L, D)``, attending
    over all ``L`` rows with the additive key ``mask`` ``(B, 1, 1, L)`` (or None)."""
    if rows is None:
        return run_layer(layer, x, mask)
    if not supports_rows(layer):
        return run_layer(layer, x, mask)[:, rows]
    layout = LAYOUTS[type(layer).__name__]
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        # as the layer's own __call__ does when activation checkpointing is on
        return checkpoint(layout, layer, x, mask, rows, use_reentrant=False)
    return layout(layer, x, mask, rows)
