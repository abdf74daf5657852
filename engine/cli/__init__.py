"""``ren``: the headless command line.

Arguments are parsed here; the work lives in :mod:`engine.cli.commands`, which
imports torch only inside the commands that need it, so ``ren --help`` is fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.errors import RenError

app = typer.Typer(
    name="ren",
    help="Compose, freeze, pretrain and finetune vision-language encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a preset key, e.g. --set optim.lr=3e-4 (repeatable)."),
]


@app.command()
def run(
    preset: Annotated[Optional[Path], typer.Argument(help="Preset TOML file.")] = None,
    set_: SetOption = None,
    resume: Annotated[
        Optional[str], typer.Option("--resume", help="Continue run RUN_ID from its last checkpoint.")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: the preset's run.name).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes/GPUs; more than 1 starts `accelerate launch`.")] = 1,
) -> None:
    """Train a preset (pretraining or finetuning) and record it in the store."""
    from engine.cli import commands

    commands.run(preset, list(set_ or ()), resume=resume, name=name, gpus=gpus)


@app.command()
def validate(
    preset: Annotated[Path, typer.Argument(help="Preset TOML file.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    groups: Annotated[bool, typer.Option("--groups", help="List every layer group.")] = False,
) -> None:
    """Check a preset; print the resolved config and the model's parameter report."""
    from engine.cli import commands

    commands.validate(preset, list(set_ or ()), as_json=as_json, all_groups=groups)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="Show at most this many runs.")] = 50,
) -> None:
    """List runs: id, name, status, steps, best scores, duration."""
    from engine.cli import commands

    commands.list_runs(limit)


@app.command()
def show(run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")]) -> None:
    """Show a run: its config, parameter report and scores."""
    from engine.cli import commands

    commands.show(run_id)


def main() -> None:
    """Entry point: user errors print one paragraph and exit with code 2."""
    try:
        app()
    except RenError as exc:
        err_console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
