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

_TRUE = {"1", "true", "yes", "on"}
REN_PREFIX = "ren:"
"""Names of the small models ren builds itself (``ren:easyvqa-vit``; see :mod:`engine.unimodal`)."""


def is_ren_model(name: str | None) -> bool:
    """Is ``name`` one of the models ren builds (``ren:...``), not a hub id or a directory?"""
    return name is not None and name.startswith(REN_PREFIX)


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
