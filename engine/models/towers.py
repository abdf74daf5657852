"""Unimodal towers for the two-tower and dual-encoder architectures.

A tower wraps one HF model (or timm model) and exposes its output tokens and
its named layer groups (``embeddings``, ``layers[i]``, ``final``) for freezing.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from engine import backbones
from engine import config as C
from engine.models import hf

Groups = dict[str, list[nn.Module]]


def _hf_groups(prefix: str, model: nn.Module, layers: nn.ModuleList, embeddings: list[nn.Module]) -> Groups:
    groups: Groups = {f"{prefix}.embeddings": embeddings}
    for i, layer in enumerate(layers):
        groups[f"{prefix}.layers[{i}]"] = [layer]
    covered = {id(m) for m in embeddings} | {id(layers)}
    rest: list[nn.Module] = []
    for _, child in model.named_children():
        if id(child) in covered:
            continue
        if any(sub is layers for sub in child.children()):
            rest.extend(m for m in child.children() if m is not layers)
        else:
            rest.append(child)
    groups[f"{prefix}.final"] = [m for m in rest if any(True for _ in m.parameters())]
    return groups


def _sizes(cfg: C.TextTower | C.VisionTower) -> dict[str, Any]:
    return {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "heads": cfg.heads,
            "mlp_ratio": cfg.mlp_ratio, "dropout": cfg.dropout, "attention_dropout": cfg.attention_p}


def _build(cfg: C.TextTower | C.VisionTower, key: str, manual: Callable[[], Any],
           part: Callable[[Any], Any]) -> tuple[Any, nn.Module]:
    """(config, HF model) of a tower: ``manual()`` sizes a fresh config, otherwise
    ``part`` picks the tower's part of the named checkpoint's config."""
    if cfg.source == "manual":
        config = manual()
    else:
        config = part(backbones.load_hf_config(cfg.name, f"{key}.name"))
        hf.set_dropout(config, cfg.dropout, cfg.attention_p)
    model = hf.build_hf_model(config, name=cfg.name, pretrained=cfg.source == "pretrained", key=f"{key}.name")
    hf.encoder_layers(model, key)  # fail early for unsupported families
    if cfg.gradient_checkpointing:
        hf.enable_checkpointing(model)
    return config, model


class TextTower(nn.Module):
    """A text encoder: an HF model (pretrained, random, or a manual BERT)."""

    def __init__(self, cfg: C.TextTower, vocab_size: int, key: str = "model.text"):
        super().__init__()
        config, self.model = _build(
            cfg, key,
            lambda: backbones.manual_text_config(vocab_size=vocab_size, max_positions=cfg.max_positions, **_sizes(cfg)),
            backbones.text_config_of,
        )
        self.hidden_size = backbones.hidden_size_of(config)
        self.vocab_size = getattr(config, "vocab_size", vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def groups(self, prefix: str = "text") -> Groups:
        emb = [self.model.embeddings]
        if getattr(self.model, "embeddings_project", None) is not None:
            emb.append(self.model.embeddings_project)
        return _hf_groups(prefix, self.model, hf.encoder_layers(self.model, prefix), emb)


class VisionTower(nn.Module):
    """A vision encoder returning a token sequence whose first token summarises the image.

    HF vision models return their tokens ([CLS] first). timm CNNs return a
    feature map, flattened into tokens with a mean-pooled token prepended.
    """

    def __init__(self, cfg: C.VisionTower, key: str = "model.vision"):
        super().__init__()
        self.library = cfg.library
        self.image_size = cfg.image_size
        if cfg.library == "timm":
            assert cfg.name is not None
            self.model = hf.build_timm_model(cfg.name, pretrained=cfg.source == "pretrained",
                                             image_size=cfg.image_size, key=f"{key}.name")
            self.hidden_size = int(self.model.num_features)
            if cfg.gradient_checkpointing:
                self.model.set_grad_checkpointing(True)
            self._interpolate = False
            return
        config, self.model = _build(
            cfg, key,
            lambda: backbones.manual_vision_config(patch_size=cfg.patch_size, image_size=cfg.image_size, **_sizes(cfg)),
            backbones.vision_config_of,
        )
        self.hidden_size = backbones.hidden_size_of(config)
        self._interpolate = hf.accepts_kwarg(self.model, "interpolate_pos_encoding")

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.library == "timm":
            feats = self.model.forward_features(pixel_values)
            if feats.ndim == 4:  # CNN feature map (B, C, H, W) -> tokens
                tokens = feats.flatten(2).transpose(1, 2)
                return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
            return feats
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=pixel_values, **kwargs).last_hidden_state

    def groups(self, prefix: str = "vision") -> Groups:
        if self.library == "timm":
            return _timm_groups(prefix, self.model)
        return _hf_groups(prefix, self.model, hf.encoder_layers(self.model, prefix), [self.model.embeddings])


def _timm_groups(prefix: str, model: nn.Module) -> Groups:
    """timm's own group matcher: ``stem`` -> embeddings, each block -> a layer."""
    from timm.models import group_modules

    grouped = group_modules(model, model.group_matcher(coarse=True))
    modules = dict(model.named_modules())
    groups: Groups = {}
    layer_ids = sorted(k for k in grouped if k != 0 and k < 1e5)
    for gid, names in sorted(grouped.items()):
        mods = [modules[n] for n in names if n in modules]
        if gid == 0:
            groups[f"{prefix}.embeddings"] = mods
        elif gid in layer_ids:
            groups[f"{prefix}.layers[{layer_ids.index(gid)}]"] = mods
        else:
            groups.setdefault(f"{prefix}.final", []).extend(mods)
    groups.setdefault(f"{prefix}.final", [])
    return groups
