"""The models ren builds itself (``ren:easyvqa-vit``, ``ren:easyvqa-bert``): their names, recipe versions and
build directories, without torch. Validation, studies and the TUI ask these questions; only building or
loading the weights needs :mod:`engine.models.unimodal` (docs/tasks-and-data.md)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelLoadError

REN_PREFIX = "ren:"
"""Names of the small models ren builds itself (``ren:easyvqa-vit``; see :mod:`engine.models.unimodal`)."""


def is_ren_model(name: str | None) -> bool:
    """Is ``name`` one of the models ren builds (``ren:...``), not a hub id or a directory?"""
    return name is not None and name.startswith(REN_PREFIX)


RECIPES = ("easyvqa-vit", "easyvqa-bert")
RECIPE_VERSIONS = {"easyvqa-vit": 2, "easyvqa-bert": 2}
"""Each recipe's version, part of its directory's name; bump it when a change to the recipe changes the weights it
builds. easyvqa-vit 1 was a colour x shape classifier; easyvqa-bert 1 was trained with the MLM masking that put
half of its targets on a caption's first word."""
RECORD_FILE = "recipe.json"
DROPOUT = 0.0
"""The hidden and attention dropout every recipe's config carries."""
HIDDEN_SIZE = 128
LAYERS = 4
HEADS = 4
MLP_RATIO = 2.0
IMAGE_SIZE = 64
PATCH_SIZE = 8
MAX_POSITIONS = 32
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def recipe_of(name: str, key: str | None = None) -> str:
    """The recipe a ``ren:`` name (or a bare recipe name) names; a :class:`ModelLoadError` for unknown ones
    (naming the config ``key`` that holds the name, when given)."""
    recipe = name.removeprefix(REN_PREFIX)
    if recipe not in RECIPES:
        where = f"{key} = {name!r}" if key else repr(name)
        raise ModelLoadError(
            f"{where} is not a model ren builds: the models ren builds are "
            f"{', '.join(REN_PREFIX + r for r in RECIPES)} (see `ren models build --help`)."
        )
    return recipe


def models_root() -> Path:
    """``$REN_HOME/models``."""
    from engine.store import default_root

    return default_root() / "models"


def model_dir(name: str) -> Path:
    """Where the model ``name`` is (or will be) built by the current version of its recipe."""
    recipe = recipe_of(name)
    return models_root() / f"{recipe}-v{RECIPE_VERSIONS[recipe]}"


def built_dir(name: str) -> Path | None:
    """The model's directory if it has been built by the current recipe, else None."""
    path = model_dir(name)
    record = path / RECORD_FILE
    if not path.exists():
        return None
    try:
        version = json.loads(record.read_text()).get("version")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} exists but is not a complete build of {REN_PREFIX}{recipe_of(name)} ({record} is missing "
            f"or unreadable: {exc}); delete it or run `ren models build {recipe_of(name)} --force`."
        ) from None
    current = RECIPE_VERSIONS[recipe_of(name)]
    if version != current:
        raise ModelLoadError(
            f"{path} was built by version {version} of the {recipe_of(name)} recipe; this ren builds version "
            f"{current}. Rebuild it with `ren models build {recipe_of(name)} --force` (runs that used the "
            "old weights keep their scores but cannot be repeated with them)."
        )
    return path


def config_json(name: str) -> dict | None:
    """The built model's ``config.json`` as a dict, or None when it is not built (or unreadable)."""
    path = built_dir(name)
    if path is None:
        return None
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def image_statistics(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the vision model was trained with (its ``preprocessor_config.json`` once built)."""
    if recipe_of(name) != "easyvqa-vit":
        raise ModelLoadError(f"{name!r} is a text model; it has no image statistics.")
    path = built_dir(name)
    if path is None:
        return IMAGE_MEAN, IMAGE_STD
    processor = json.loads((path / "preprocessor_config.json").read_text())
    return tuple(processor["image_mean"]), tuple(processor["image_std"])
