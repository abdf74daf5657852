"""The layer rules, as import-linter contracts (pyproject.toml's [tool.importlinter]): they hold on this tree,
and each one breaks when a module makes the import it forbids. And the rule of the tests: no module under
tests/ imports a test module or a conftest; what tests share lives in tests/helpers/."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LINT, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_tree_keeps_every_contract():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


TUI = "the TUI never imports torch, transformers, timm, the models or the trainer"


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("engine/store.py", "import textual", "the engine never imports the TUI or Textual"),
    ("engine/train.py", "import ren_tui.app", "the engine never imports the TUI or Textual"),
    ("ren_tui/backend.py", "import torch", TUI),
    ("ren_tui/app.py", "import engine.train", TUI),
    ("engine/evaluate.py", "import engine.cli.commands", "the engine core never imports its CLI"),
    ("engine/report.py", "import torch", "the torch-free modules never import torch"),
    ("engine/config.py", "from engine.models import unimodal", "the torch-free modules never import torch"),
    ("engine/jobs/runner.py", "import accelerate", "the torch-free modules never import torch"),
    ("engine/data/transforms.py", "from engine.models.hf import encoder_layers",
     "the data pipeline never imports the models or the trainer"),
])
def test_each_contract_breaks_on_the_import_it_forbids(tmp_path: Path, module: str, line: str, contract: str):
    for package in ("engine", "ren_tui"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\ndef _wrong():\n    {line}\n")  # a lazy import counts too
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout
    assert f"{contract} BROKEN" in result.stdout


def test_no_engine_module_imports_itself_back():
    """No import cycle between engine modules, lazy imports included: each module can be read (and
    imported) after the ones it needs."""
    import grimp

    graph = grimp.build_graph("engine")
    cycles = [(module, chain) for module in sorted(graph.modules)
              for imported in graph.find_modules_directly_imported_by(module)
              if imported.startswith("engine") and imported != module
              and (chain := graph.find_shortest_chain(importer=imported, imported=module))]
    assert not cycles, "\n".join(f"{module} -> {' -> '.join(chain)}" for module, chain in cycles)


def imports_of_test_modules(root: Path) -> list[str]:
    """Each import, in a module under ``root``/tests, of a test module (``test_*``) or of a ``conftest``:
    "file:line: the import statement" (a lazy import inside a function counts too)."""
    found = []
    for path in sorted((root / "tests").rglob("*.py")):
        package = list(path.relative_to(root).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = base + (node.module.split(".") if node.module else [])
                targets = [".".join(module)] + [".".join([*module, alias.name]) for alias in node.names]
            else:
                continue
            if any(_is_test_module(target) for target in targets):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    ours = parts[0] == "tests" or parts[0] == "conftest" or parts[0].startswith("test_")
    return ours and any(part == "conftest" or part.startswith("test_") for part in parts)


def test_no_test_module_imports_another_or_a_conftest():
    wrong = imports_of_test_modules(REPO)
    assert not wrong, "import these from tests/helpers/ instead:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("module", "line"), [
    ("tests/test_a.py", "from .test_cli import ren"),
    ("tests/test_a.py", "from tests.test_cli import ren"),
    ("tests/test_a.py", "import tests.test_cli"),
    ("tests/test_a.py", "from tests import test_cli"),
    ("tests/test_a.py", "from . import conftest"),
    ("tests/test_a.py", "from .conftest import REPO"),
    ("tests/test_a.py", "from tests.conftest import REPO"),
    ("tests/jobs/test_a.py", "from ..test_cli import ren"),
    ("tests/reliability/test_a.py", "from .conftest import REN"),
    ("tests/reliability/test_a.py", "from tests.reliability.test_bad_inputs import cli"),
    ("tests/helpers/a.py", "from tests.test_models import make"),
])
def test_the_tests_rule_breaks_on_an_import_of_a_test_module(tmp_path: Path, module: str, line: str):
    fine = "from tests.helpers.cli import ren\nfrom tests.arrow_fixtures import write_vqav2\nfrom . import helpers\n"
    for folder in ("tests", "tests/jobs", "tests/reliability", "tests/helpers"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "test_fine.py").write_text(fine)
    target = tmp_path / module
    target.write_text(f"import os\n\n\ndef _wrong():\n    {line}\n")  # a lazy import counts too
    assert imports_of_test_modules(tmp_path) == [f"{module}:5: {line}"]
