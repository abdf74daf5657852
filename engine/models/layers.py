"""Building blocks shared by the architectures: masks, fresh embeddings,
co-attention fusion layers and poolers. Attention runs through PyTorch SDPA."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, L) 1/0 key mask -> (B, 1, 1, L) additive mask, or None when nothing is padded.

    Returning None for unpadded batches lets SDPA pick its fastest kernel.
    """
    if mask is None or bool(mask.all()):
        return None
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out.masked_fill_(mask == 0, torch.finfo(dtype).min)
    return out[:, None, None, :]


class TextEmbeddings(nn.Module):
    """Word + position embeddings with a LayerNorm (fresh text input for vision backbones)."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, dropout: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position = nn.Embedding(max_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.norm(self.word(input_ids) + self.position(positions)[None]))


class PatchEmbeddings(nn.Module):
    """ViT-style patches + [CLS] + learned positions (fresh image input for text backbones).

    Position embeddings are interpolated when the input size differs from
    ``image_size``.
    """

    def __init__(self, image_size: int, patch_size: int, hidden_size: int, dropout: float):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.position = nn.Parameter(torch.randn(1, 1 + self.grid**2, hidden_size) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.proj(pixel_values)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self._positions(grid_h, grid_w))

    def _positions(self, h: int, w: int) -> Tensor:
        if h == w == self.grid:
            return self.position
        cls_pos, grid_pos = self.position[:, :1], self.position[:, 1:]
        dim = grid_pos.shape[-1]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)


class ConvStemEmbeddings(PatchEmbeddings):
    """Patch embedding through a small convolution stem (Xiao et al. 2021, "Early
    convolutions help transformers see better"): stride-2 3x3 convolutions with
    BatchNorm and GELU until the image is downsampled by ``patch_size``, then a
    1x1 projection to ``hidden_size``. Same token layout as :class:`PatchEmbeddings`.
    """

    def __init__(self, image_size: int, patch_size: int, hidden_size: int, dropout: float):
        super().__init__(image_size, patch_size, hidden_size, dropout)
        steps = int(math.log2(patch_size))
        if 2**steps != patch_size:
            raise ValueError(f"a convolution stem needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        channels = 3
        for i in range(steps):
            out = max(16, hidden_size >> (steps - 1 - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, hidden_size, kernel_size=1))
        self.proj = nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head attention (self or cross) on SDPA."""

    def __init__(self, hidden_size: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        b, lq, d = x.shape
        q = self.q(x).view(b, lq, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, lq, d))


class MLP(nn.Sequential):
    """Linear -> GELU -> Linear. No dropout inside: the layer drops the MLP's output before the residual,
    as BERT's and METER's layers (and HF's ViT) do.

    The parts are named ``0``, ``1`` and ``3``: until 2026-11-28 a dropout sat at ``2``, and keeping the
    names keeps the state-dict keys, so checkpoints and ``init_from`` weights from then still load whole."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        inner = int(hidden_size * mlp_ratio)
        super().__init__(OrderedDict(
            [("0", nn.Linear(hidden_size, inner)), ("1", nn.GELU()), ("3", nn.Linear(inner, hidden_size))]))


class CoAttentionLayer(nn.Module):
    """One METER-style fusion layer for one stream: self-attention, cross-attention
    to the other stream, MLP; pre-LayerNorm residual blocks."""

    def __init__(self, hidden_size: int, heads: int, mlp_ratio: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(hidden_size)
        self.self_attn = Attention(hidden_size, heads, attention_dropout)
        self.norm_cross = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.cross_attn = Attention(hidden_size, heads, attention_dropout)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size, mlp_ratio)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, x_mask: Tensor | None, ctx: Tensor, ctx_mask: Tensor | None,
                rows: slice | None = None) -> Tensor:
        """``rows``: compute only these output rows (every row still serves as a key and value)."""
        h = self.norm_self(x)
        if rows is not None:
            x = x[:, rows]
        x = x + self.drop(self.self_attn(h if rows is None else h[:, rows], h, x_mask))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), self.norm_context(ctx), ctx_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class FusionLayer(nn.Module):
    """A pair of co-attention layers, text attending to image and image to text."""

    def __init__(self, hidden_size: int, heads: int, mlp_ratio: float, dropout: float, attention_dropout: float):
        super().__init__()
        self.text = CoAttentionLayer(hidden_size, heads, mlp_ratio, dropout, attention_dropout)
        self.image = CoAttentionLayer(hidden_size, heads, mlp_ratio, dropout, attention_dropout)

    def forward(self, t: Tensor, t_mask: Tensor | None, v: Tensor, v_mask: Tensor | None,
                text_rows: slice | None = None, image_rows: slice | None = None) -> tuple[Tensor, Tensor]:
        return self.text(t, t_mask, v, v_mask, text_rows), self.image(v, v_mask, t, t_mask, image_rows)


class ModalityTypes(nn.Embedding):
    """Token-type rows added to the inputs: 0 text, 1 image and, with ``pair_images`` (NLVR2), 2 for the
    second image. ViLT (vilt/modules/vilt_module.py), METER (meter/modules/meter_module.py) and Renaissance
    (one_tower_encoder.py ``adjust_type_embeds_for_nlvr2``) build the NLVR2 table after loading the
    pretrained weights, the new row a copy of the image row; so here, a 2-row table loaded into a 3-row
    one (a pretraining, or a checkpoint of an older NLVR2 run) fills the third row with its image row."""

    def __init__(self, hidden_size: int, pair_images: bool = False):
        super().__init__(3 if pair_images else 2, hidden_size)
        nn.init.normal_(self.weight, std=0.02)
        with torch.no_grad():
            self.weight[2:] = self.weight[1]

    def image(self, image_types: Tensor | None) -> Tensor:
        """The row(s) to add to image tokens: the image row, or per sample ``image_types`` ``(B,)`` -> ``(B, 1, D)``."""
        return self.weight[1] if image_types is None else self(image_types)[:, None]

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = grow_type_table(state_dict[key], self.num_embeddings)
        super()._load_from_state_dict(state_dict, prefix, *args)


def grow_type_table(table: Tensor, rows: int) -> Tensor:
    """A (2, D) text/image type table grown to ``rows`` = 3 with the image row copied (see
    :class:`ModalityTypes`); any other table as it is."""
    if table.ndim == 2 and table.shape[0] == 2 and rows == 3:
        return torch.cat([table, table[1:]])
    return table


class Pooler(nn.Module):
    """Dense + tanh on one token (BERT/ViLT pooler)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, token: Tensor) -> Tensor:
        return torch.tanh(self.dense(token))


def init_weights(module: nn.Module) -> None:
    """BERT-style init for fresh layers (truncated normal 0.02, zero bias, unit norms)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            fan_in = m.in_channels * math.prod(m.kernel_size)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
