"""The layer rules, as import-linter contracts (pyproject.toml's [tool.importlinter]): they hold on this tree,
and each one breaks when a module makes the import it forbids."""

from __future__ import annotations

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
