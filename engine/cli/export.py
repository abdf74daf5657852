"""The work behind ``ren export``: export the run, then say what was written and where loading it is told."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from engine.export import export_run
from engine.store import Store

console = Console()
ROLES = {"model.text": "the text tower", "model.vision": "the vision tower",
         "model.backbone": "the backbone (the shared transformer)"}


def export(run_id: str, out: Path, *, force: bool, towers: bool) -> None:
    done = export_run(Store(read_only=True), run_id, out, force=force, towers=towers)
    table = Table(box=None, show_header=False, padding=(0, 2, 0, 2))
    table.add_row("model.safetensors, config.json", "the whole model, for train.init_from")
    for key, folder in done.towers.items():
        table.add_row(f"{folder}/", f"{ROLES[key]} ({key}) alone")
    table.add_row("README.md", "the model card")
    console.print(f"exported run {done.run_id} into {done.out}:", markup=False, highlight=False, soft_wrap=True)
    console.print(table, markup=False, highlight=False)
    console.print(f"how to load each: docs/export.md; to push it to the Hugging Face Hub: hf upload USER/NAME "
                  f"{done.out}", markup=False, highlight=False, soft_wrap=True)
