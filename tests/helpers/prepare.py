"""Original dataset releases written for ``ren data prepare``: JSON annotations and real image files (some
corrupt); and the arrow rows and skip reasons a preparation gives back."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

import engine.data.prepare as prepare_module
from engine.data.arrow import open_arrow
from tests.arrow_fixtures import image_bytes


def write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")


def _truncated(fmt: str) -> bytes:
    """An image whose header is intact but whose pixel data is cut short: PIL opens it, only decoding fails."""
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 37 + i // 7) % 256 for i in range(64 * 64 * 3)))
    buffer = BytesIO()
    noise.save(buffer, fmt)
    data = buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4]
    with Image.open(BytesIO(data)) as image:
        assert image.size == (64, 64)
    return data


def write_image(path: Path, index: int, fmt: str = "JPEG", *, corrupt: bool = False) -> bytes:
    """Write a real image (or, with ``corrupt``, one with truncated pixel data) to ``path``; return its bytes."""
    data = _truncated(fmt) if corrupt else image_bytes(index, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def arrow_rows(path: Path, kind: str, columns: list[str]) -> list[dict[str, Any]]:
    source = open_arrow([path], kind)
    return [source.row(i, columns) for i in range(len(source))]


def skip_reasons(report: prepare_module.PrepareReport) -> list[tuple[str, str, str]]:
    return sorted((record.output, record.record, record.reason) for record in report.skipped)
