"""Building Hugging Face and timm backbones from their configs (:mod:`engine.backbones`), offline-friendly.

Every tower is a real HF model (or a timm model): ``pretrained`` loads weights from a hub id or a local
directory, ``random`` builds the same architecture with fresh weights, and ``manual`` builds a BERT- or
ViT-style encoder of the requested size, so manual models run exactly the code pretrained ones do.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from engine.backbones import load_error
from engine.errors import ModelLoadError
from engine.hub import ATTENTION_DROPOUT_FIELDS, HIDDEN_DROPOUT_FIELDS, hub_kwargs
from engine.hub import looks_like_path as _looks_like_path
from engine.recipes import is_ren_model


def build_hf_model(config: Any, *, name: str | None, pretrained: bool, key: str) -> nn.Module:
    """An ``AutoModel`` (no pooling layer where the class allows) from a config. Pretrained weights of a
    model ren builds (``ren:...``) are built on first use."""
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    model_cls = _model_class(config)
    if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    if pretrained and is_ren_model(name):
        from engine.models import unimodal

        name = str(unimodal.ensure_built(name, key=key))  # from here on, a local directory
    try:
        if pretrained:
            assert name is not None
            path = str(Path(name).expanduser()) if _looks_like_path(name) else name
            return AutoModel.from_pretrained(path, config=config, **kwargs, **hub_kwargs(name))
        return AutoModel.from_config(config, **kwargs)
    except (OSError, ValueError) as exc:
        if pretrained and name is not None:
            raise load_error(name, key, exc) from None
        if "attn_implementation" in str(exc) or "sdpa" in str(exc).lower():
            kwargs.pop("attn_implementation")
            return AutoModel.from_config(config, **kwargs)
        raise


def _model_class(config: Any) -> type | None:
    from transformers import AutoModel

    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        return None


def set_dropout(config: Any, dropout: float | None, attention_dropout: float | None) -> None:
    """Apply the preset's hidden and attention dropout to a loaded config (the common HF field names);
    None keeps the config's own."""
    for fields, value in ((HIDDEN_DROPOUT_FIELDS, dropout), (ATTENTION_DROPOUT_FIELDS, attention_dropout)):
        for field in fields:
            if value is not None and isinstance(getattr(config, field, None), float):
                setattr(config, field, value)


def encoder_layers(model: nn.Module, key: str) -> nn.ModuleList:
    """The list of transformer layers of an HF encoder."""
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "blocks"):
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ModelLoadError(
        f"{key}: {type(model).__name__} has no recognisable list of encoder layers "
        "(looked for encoder.layer, encoder.layers, layers, transformer.layer); "
        "this family cannot be used here."
    )


def keep_encoder_only(model: nn.Module, key: str) -> None:
    """Drop every top-level part of an HF model but the one holding its layers: its embeddings (and
    their projection), a final norm outside the encoder, a pooler. Renaissance's one-tower takes
    ``model.encoder`` alone (renaissance/modules/one_tower_encoder.py)."""
    layers = encoder_layers(model, key)
    for name, child in list(model.named_children()):
        if not any(m is layers for m in child.modules()):
            setattr(model, name, None)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The encoder's final normalisation layer, if it has one (ViT-style)."""
    for name in ("layernorm", "post_layernorm", "final_layer_norm", "norm", "ln_f"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    encoder = getattr(model, "encoder", None)
    for name in ("layer_norm", "layernorm", "norm"):
        module = getattr(encoder, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing on an HF model, under either API name
    (transformers 5 renamed ``gradient_checkpointing_enable``)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def accepts_kwarg(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def build_timm_model(name: str, *, pretrained: bool, image_size: int, key: str) -> nn.Module:
    """A timm model returning features, with no classifier head.

    ``name`` is a timm architecture (``resnet18``, ``vit_tiny_patch16_224``) or,
    for pretrained weights, ``"arch@/path/to/model.safetensors"``.
    """
    import timm

    arch, _, weights = name.partition("@")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if pretrained and weights:
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(weights).expanduser())}
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            near = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
            raise ModelLoadError(
                f"{key} = {arch!r} is not a timm model. Similar names: {', '.join(near) or 'none'}."
            ) from None
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{key} = {name!r}: timm could not load pretrained weights ({type(exc).__name__}: "
            f"{exc}). Without network access, give a local weights file as "
            f"\"{arch}@/path/to/model.safetensors\"."
        ) from None
    if hasattr(model, "set_input_size") and getattr(model, "patch_embed", None) is not None:
        model.set_input_size(img_size=image_size)
    return model
