"""Is the Hugging Face hub reachable? Decided once per process.

When it is not (no network, a firewall, ``HF_HUB_OFFLINE=1``), hub ids are
loaded with ``local_files_only=True``: models already in the local HF cache
still load, and anything else fails at once with ren's own message instead of
after a minute of retries.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from engine import recipes
from engine.recipes import is_ren_model

_TRUE = {"1", "true", "yes", "on"}
def looks_like_path(name: str) -> bool:
    if is_ren_model(name):
        return False
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def hub_kwargs(name: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``name``."""
    return {} if looks_like_path(name) or hub_reachable() else {"local_files_only": True}


HIDDEN_DROPOUT_FIELDS = ("hidden_dropout_prob", "dropout", "hidden_dropout")
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")
"""The common Hugging Face config fields of a model's hidden-state and attention dropout."""


def dropouts_in(config: Any) -> tuple[float | None, float | None]:
    """(hidden, attention) dropout of a config object or a config.json dict; None where it names none."""
    read = config.get if isinstance(config, dict) else lambda f: getattr(config, f, None)
    hidden, attention = (next((v for f in fields if isinstance(v := read(f), float)), None)
                         for fields in (HIDDEN_DROPOUT_FIELDS, ATTENTION_DROPOUT_FIELDS))
    return hidden, attention


@lru_cache(maxsize=64)
def checkpoint_dropouts(name: str, part: str) -> tuple[float | None, float | None]:
    """(hidden, attention) dropout of the named checkpoint (its ``text``/``vision`` part of a composite
    config, or the whole config for ``part=""``), read from its config.json without torch or transformers
    (a ``ren:`` model's from its build, or the recipe's own when it is not built yet); (None, None)
    when there is no readable config."""
    if is_ren_model(name):
        from engine.errors import RenError

        try:
            built = recipes.config_json(name)
        except RenError:
            return None, None
        return dropouts_in(built) if built is not None else (recipes.DROPOUT, recipes.DROPOUT)
    raw = _config_json(name)
    if raw is None:
        return None, None
    sub = raw.get(f"{part}_config") if part else None
    return dropouts_in(sub if isinstance(sub, dict) else raw)


def _config_json(name: str) -> dict[str, Any] | None:
    """A local directory's or a hub id's config.json (from the local cache, or downloaded where the hub
    is reachable), or None."""
    import json

    if looks_like_path(name):
        path: Path | None = Path(name).expanduser() / "config.json"
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError

        try:
            path = Path(hf_hub_download(name, "config.json", local_files_only=not hub_reachable()))
        except (OSError, ValueError, HFValidationError):
            path = None
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
