"""Dotted keys (``"model.backbone.name"``) into the nested tables of a preset: the one reader and writer the
study planner and the TUI's Compose screen share."""

from __future__ import annotations

from typing import Any


def get_in(raw: dict[str, Any], key: str, default: Any = None) -> Any:
    """The value at ``key``, or ``default`` where a table on the way, or the key itself, is missing."""
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_in(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key``, making the tables on the way (a non-table there is replaced); ``None`` removes the key, so
    the schema's default applies."""
    *path, last = key.split(".")
    node = raw
    for part in path:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
