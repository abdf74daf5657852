"""What a backbone's name means before any weights load: its Hugging Face config and modality, for a hub
id, a local directory or a model ren builds (``ren:...``), and the configs of the manual towers ren sizes
itself. Validation, the inspector, the data pipeline and the model builders all ask here, so none of them
needs another's module (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.data.tokenizer import easy_vqa_word_tokenizer
from engine.errors import ModelLoadError
from engine.hub import hub_kwargs, hub_reachable
from engine.hub import looks_like_path as _looks_like_path
from engine.recipes import (
    DROPOUT,
    HEADS,
    HIDDEN_SIZE,
    IMAGE_SIZE,
    LAYERS,
    MAX_POSITIONS,
    MLP_RATIO,
    PATCH_SIZE,
    built_dir,
    is_ren_model,
    recipe_of,
)

_LOCAL_HINT = (
    "To use a model without network access, download it once elsewhere "
    "(e.g. `huggingface-cli download {name} --local-dir /models/{short}`), copy "
    "the directory here and point the preset at it: {key} = \"/models/{short}\"."
)


def load_error(name: str, key: str, exc: Exception) -> ModelLoadError:
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
        return _ren_config(name, key)
    try:
        return AutoConfig.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name,
                                          **hub_kwargs(name))
    except (OSError, ValueError) as exc:
        raise load_error(name, key, exc) from None


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


# --------------------------------------------------------------------------- the models ren builds


def recipe_config(name: str) -> Any:
    """The Hugging Face config the recipe builds (no training, no files)."""
    sizes = dict(hidden_size=HIDDEN_SIZE, layers=LAYERS, heads=HEADS, mlp_ratio=MLP_RATIO, dropout=DROPOUT,
                 attention_dropout=DROPOUT)
    if recipe_of(name) == "easyvqa-vit":
        config = manual_vision_config(patch_size=PATCH_SIZE, image_size=IMAGE_SIZE, **sizes)
        config.encoder_stride = PATCH_SIZE  # the reconstruction head predicts each token's own patch
        config.architectures = ["ViTForMaskedImageModeling"]
        return config
    config = manual_text_config(vocab_size=len(easy_vqa_word_tokenizer()), max_positions=MAX_POSITIONS, **sizes)
    config.architectures = ["BertForMaskedLM"]
    return config


def _ren_config(name: str, key: str | None = None) -> Any:
    """A model ren builds: the built one's config, else the recipe's (nothing is trained)."""
    recipe_of(name, key)
    path = built_dir(name)
    if path is None:
        return recipe_config(name)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))
