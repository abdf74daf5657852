"""The work behind ``ren models``."""

from __future__ import annotations

from rich.console import Console

from engine.recipes import REN_PREFIX

console = Console()


def build(name: str, *, force: bool) -> None:
    """Build ``easyvqa-vit``, ``easyvqa-bert`` or ``all`` into ``$REN_HOME/models`` and say what each learned."""
    from engine.models import unimodal
    from engine.recipes import RECIPES, recipe_of

    recipes = RECIPES if name == "all" else (recipe_of(name),)
    for recipe in recipes:
        path, report = unimodal.build(recipe, force=force, log=_say)
        if report is None:
            _say(f"{REN_PREFIX}{recipe} is built already in {path} (--force builds it again); "
                 f"its build: {unimodal.read_report(path).summary()}")
        else:
            _say(f"{REN_PREFIX}{recipe} built in {path}")


def _say(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)
