"""Loading Hugging Face and timm backbones, offline-friendly.

Every tower is a real HF model (or a timm model): ``pretrained`` loads weights
from a hub id or a local directory, ``random`` builds the same architecture
from its config with fresh weights, and ``manual`` builds a BERT-style text
encoder or a ViT-style vision encoder of the requested size. Manual models
therefore run exactly the same code path as pretrained ones.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from engine.errors import ModelLoadError
from engine.hub import ATTENTION_DROPOUT_FIELDS, HIDDEN_DROPOUT_FIELDS, hub_kwargs, hub_reachable, is_ren_model
from engine.hub import looks_like_path as _looks_like_path

_LOCAL_HINT = (
    "To use a model without network access, download it once elsewhere "
    "(e.g. `huggingface-cli download {name} --local-dir /models/{short}`), copy "
    "the directory here and point the preset at it: {key} = \"/models/{short}\"."
)


def _load_error(name: str, key: str, exc: Exception) -> ModelLoadError:
    short = name.rstrip("/").split("/")[-1]
    if _looks_like_path(name):
        where = Path(name).expanduser()
        if not where.exists():
            return ModelLoadError(
                f"{key} = {name!r}: the directory {where} does not exist. Give the path "
                "of a directory in Hugging Face format (config.json and the weights)."
            )
        return ModelLoadError(
            f"{key} = {name!r}: could not load a model from {where}: {exc}. The directory "
            "must hold a Hugging Face model (config.json plus model.safetensors or "
            "pytorch_model.bin)."
        )
    why = (
        "the Hugging Face hub cannot be reached from this machine and the model is not in the local cache"
        if not hub_reachable()
        else f"the Hugging Face hub has no such model, or refused it ({type(exc).__name__}: {exc})"
    )
    return ModelLoadError(
        f"{key} = {name!r}: the model could not be loaded: {why}. "
        + _LOCAL_HINT.format(name=name, short=short, key=key)
    )


def load_hf_config(name: str, key: str) -> Any:
    """The config of a hub id, a local directory or a model ren builds (``ren:...``: the recipe's
    config until it is built, so reading a config never trains)."""
    from transformers import AutoConfig

    if is_ren_model(name):
        from engine.models import unimodal

        return unimodal.load_config(name, key)
    try:
        return AutoConfig.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name,
                                          **hub_kwargs(name))
    except (OSError, ValueError) as exc:
        raise _load_error(name, key, exc) from None


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
            raise _load_error(name, key, exc) from None
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


def _sizes(hidden_size: int, layers: int, heads: int, mlp_ratio: float, dropout: float,
           attention_dropout: float) -> dict[str, Any]:
    """The HF config fields that size a BERT- or ViT-style encoder."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": int(hidden_size * mlp_ratio),
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": attention_dropout,
    }


def manual_text_config(*, vocab_size: int, max_positions: int, **sizes: Any) -> Any:
    """A BERT config of the given sizes (``hidden_size``, ``layers``, ``heads``, ``mlp_ratio``, ``dropout``,
    ``attention_dropout``)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, type_vocab_size=1,
                      pad_token_id=0, **_sizes(**sizes))


def manual_vision_config(*, patch_size: int, image_size: int, **sizes: Any) -> Any:
    """A ViT config of the given sizes and patching."""
    from transformers import ViTConfig

    return ViTConfig(patch_size=patch_size, image_size=image_size, qkv_bias=True, **_sizes(**sizes))


def set_dropout(config: Any, dropout: float | None, attention_dropout: float | None) -> None:
    """Apply the preset's hidden and attention dropout to a loaded config (the common HF field names);
    None keeps the config's own."""
    for fields, value in ((HIDDEN_DROPOUT_FIELDS, dropout), (ATTENTION_DROPOUT_FIELDS, attention_dropout)):
        for field in fields:
            if value is not None and isinstance(getattr(config, field, None), float):
                setattr(config, field, value)


def text_config_of(config: Any) -> Any:
    """The text part of a composite config (CLIP-like), else the config itself."""
    return getattr(config, "text_config", None) or config


def vision_config_of(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def hidden_size_of(config: Any) -> int:
    for field in ("hidden_size", "d_model", "dim", "embed_dim"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    raise ModelLoadError(f"Cannot tell the hidden size of a {type(config).__name__}.")


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


def modality_of(config: Any) -> str:
    """``"vision"`` for image encoders (they have a patch size), else ``"text"``.

    Composite image-text checkpoints (CLIP-like) are neither: their parts are
    chosen with the two-tower towers, not as a one-tower backbone."""
    if getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None) is not None:
        raise ModelLoadError(
            f"{type(config).__name__} is a composite image-text model; a one-tower backbone must be a "
            "single text or vision encoder (use it in a two_tower or dual_encoder model instead)."
        )
    return "vision" if hasattr(config, "patch_size") and not hasattr(config, "vocab_size") else "text"


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
