"""Where the repository and its shipped presets are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "presets"
