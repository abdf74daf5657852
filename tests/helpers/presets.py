"""Preset files written for a test: the small one-tower finetuning fixture, extended."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.paths import REPO

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"
TOKENIZER = 'tokenizer = "google/electra-small-discriminator"\n'  # a preset's [data] line; in the test hub cache


def write_file(path: Path, text: str | bytes) -> Path:
    """Write ``text`` (or bytes) to ``path``, making its folders; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def preset(tmp: Path, body: str, name: str = "p.toml") -> Path:
    """A preset extending the small one-tower finetuning fixture with ``body``."""
    return write_file(tmp / name, f'extends = "{ONE_TOWER}"\n{body}')
