"""constraints.txt and pyproject.toml agree: every dependency is pinned, inside its range."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins(machine: str) -> dict[str, str]:
    """The versions constraints.txt pins on a Linux machine of this architecture."""
    environment = {**default_environment(), "platform_machine": machine, "sys_platform": "linux"}
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        assert str(requirement.specifier).startswith("=="), f"{line!r} is not an exact pin"
        if requirement.marker is None or requirement.marker.evaluate(environment):
            name = canonicalize_name(requirement.name)
            assert name not in pins, f"{name} is pinned twice for {machine}"
            pins[name] = str(requirement.specifier)[2:]
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [req for group in project["optional-dependencies"].values() for req in group]
    # an extra that names ren's own other extras (ren[trackers]) is checked through those extras
    return [Requirement(req) for req in [*project["dependencies"], *extras]
            if canonicalize_name(Requirement(req).name) != canonicalize_name(project["name"])]


def test_every_dependency_is_pinned_inside_its_range():
    for machine in ("x86_64", "aarch64"):
        pins = _pins(machine)
        for requirement in _requirements():
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement.name} (pyproject.toml) has no pin in constraints.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"constraints.txt pins {name}=={pins[name]} on {machine}, outside pyproject.toml's {requirement}")


def test_the_readme_and_ci_install_through_the_constraints():
    setup = "pip install -c constraints.txt -e '.[test]'"
    assert setup in (REPO / "README.md").read_text()
    assert "install --quiet -c constraints.txt -e '.[test]'" in (REPO / ".ci" / "run").read_text()
