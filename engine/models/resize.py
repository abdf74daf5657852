"""Resizing learned tables when a run starts from weights trained for another shape: image position
tables trained at another image size, and the 2-row text/image type table of a pretraining grown to the
3 rows of an NLVR2 model (:class:`engine.models.layers.ModalityTypes`).

Each position table is resampled as its own library does at run time (HF: plain bicubic, timm: antialiased
bicubic), prefix tokens kept: docs/PROTOCOLS.md, "Position tables at another image size".
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.errors import RenError
from engine.models.layers import grow_type_table

MAX_PREFIX_TOKENS = 8
"""Most non-grid tokens a table may carry (timm: [CLS] + up to 4 registers; DeiT: 2)."""

PLAIN_KEYS = re.compile(
    r"(?:^|\.)(?:"
    r"image_embeddings\.position"  # fresh patch embedding of a one-tower text backbone
    r"|embeddings\.position_embeddings"  # HF ViT / DeiT / DINOv2 (a parameter; text models end in .weight)
    r")$"
)
"""State-dict names of image position tables resampled with plain bicubic; text tables never match."""

ANTIALIASED_KEYS = re.compile(r"(?:^|\.)pos_embed$")
"""timm vision transformers' position tables, resampled with antialiased bicubic."""

TYPE_KEYS = re.compile(r"(?:^|\.)modality_type\.weight$")
"""Text/image type tables, grown by a row for the second image of NLVR2."""


def _side(n: int) -> int | None:
    """``g`` when ``n == g * g`` (``g >= 1``), else None."""
    g = math.isqrt(n) if n > 0 else 0
    return g if g and g * g == n else None


def resize_position_table(table: Tensor, new_len: int, *, prefix_tokens: int, antialias: bool = False) -> Tensor:
    """``table`` ((1, N, D) or (N, D): ``prefix_tokens`` tokens, then a g x g grid) resized to
    ``new_len`` = prefix + G * G positions; the prefix rows are kept exactly. ``antialias``
    selects timm's antialiased bicubic instead of HF's plain bicubic."""
    if table.ndim not in (2, 3) or (table.ndim == 3 and table.shape[0] != 1):
        raise RenError(f"A position table must have shape (1, N, D) or (N, D); got {tuple(table.shape)}.")
    n, dim = table.shape[-2], table.shape[-1]
    if not 0 <= prefix_tokens < n:
        raise RenError(f"A position table of {n} positions cannot have {prefix_tokens} prefix tokens.")
    old_g, new_g = _side(n - prefix_tokens), _side(new_len - prefix_tokens)
    if old_g is None or new_g is None:
        bad = n if old_g is None else new_len
        raise RenError(
            f"Cannot resize a position table from {n} to {new_len} positions with {prefix_tokens} prefix "
            f"token(s): {bad} - {prefix_tokens} = {bad - prefix_tokens} is not a square grid of patches."
        )
    rows = table.reshape(n, dim)
    prefix, grid = rows[:prefix_tokens], rows[prefix_tokens:]
    if new_g != old_g:
        grid = grid.float().reshape(1, old_g, old_g, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_g, new_g), mode="bicubic", align_corners=False, antialias=antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(new_g * new_g, dim).to(table.dtype)
    out = torch.cat([prefix, grid])
    return out[None] if table.ndim == 3 else out


def prefix_tokens_of(key: str, old_len: int, new_len: int) -> int:
    """The number of leading non-grid tokens shared by a stored table of ``old_len`` positions
    and the model's table of ``new_len``: the one count (at most ``MAX_PREFIX_TOKENS``) that
    leaves a square grid in both."""
    fits = [p for p in range(min(MAX_PREFIX_TOKENS, old_len - 1, new_len - 1) + 1)
            if _side(old_len - p) and _side(new_len - p)]
    if len(fits) == 1:
        return fits[0]
    why = ("no count of leading [CLS]/distillation tokens" if not fits
           else f"several counts of leading [CLS]/distillation tokens ({', '.join(map(str, fits))})")
    raise RenError(
        f"Cannot resize the position table {key!r} from {old_len} to {new_len} positions: {why} "
        f"(0 to {MAX_PREFIX_TOKENS}) leaves a square grid of patches in both. The stored weights and "
        "this model must share their prefix tokens and use square images; check the image_size and "
        "patch_size of both presets."
    )


def adapt_state_dict(state: dict[str, Tensor], model_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` with every image position table whose length differs from the model's
    (``model_state``) resized to it, and a 2-row type table grown to the model's 3 rows. Returns
    (adapted state, resized keys); other tensors, text position tables included, are passed through
    untouched."""
    out = dict(state)
    resized: list[str] = []
    for key, table in state.items():
        own = model_state.get(key)
        if own is not None and TYPE_KEYS.search(key) and own.shape != table.shape:
            out[key] = grow_type_table(table, own.shape[0])
            resized += [key] if out[key].shape == own.shape else []
            continue
        antialias = bool(ANTIALIASED_KEYS.search(key))
        if own is None or own.shape == table.shape or not (antialias or PLAIN_KEYS.search(key)):
            continue
        if table.ndim != own.ndim or table.ndim not in (2, 3) or table.shape[:-2] != own.shape[:-2] \
                or table.shape[-1] != own.shape[-1]:
            continue  # another width or layout: not a resolution change, left for the caller to skip
        old_len, new_len = table.shape[-2], own.shape[-2]
        prefix = prefix_tokens_of(key, old_len, new_len)
        out[key] = resize_position_table(table, new_len, prefix_tokens=prefix, antialias=antialias)
        resized.append(key)
    return out, resized
