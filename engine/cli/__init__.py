"""``ren``: the headless command line.

Arguments are parsed here; the work lives in :mod:`engine.cli.commands`, which
imports torch only inside the commands that need it, so ``ren --help`` is fast.
"""

from __future__ import annotations

import enum
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


class Tracker(str, enum.Enum):
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    wandb = "wandb"

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a preset key, e.g. --set optim.lr=3e-4 (repeatable)."),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead (its schema: docs/cli-json.md).")
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
    as_json: JsonOption = False,
    groups: Annotated[bool, typer.Option("--groups", help="List every layer group.")] = False,
    gpus: Annotated[int, typer.Option(help="Check the batch splits over this many processes, as `ren run --gpus`.")]
    = 1,
) -> None:
    """Check a preset; print the resolved config and the model's parameter report."""
    from engine.cli import commands

    commands.validate(preset, list(set_ or ()), as_json=as_json, all_groups=groups, gpus=gpus)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="Show at most this many runs.")] = 50,
    mlflow: Annotated[str | None, typer.Option(
        "--mlflow", metavar="URI", help="List the runs an MLflow server holds (every box that mirrors to it) "
        "instead of this store's.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List runs: id, name, status, steps, best scores, duration."""
    if mlflow:
        from engine.cli import sync

        sync.list_lab_runs(mlflow, limit, as_json=as_json)
        return
    from engine.cli import commands

    commands.list_runs(limit, as_json=as_json)


@app.command("sync")
def sync_command(
    run_ids: Annotated[list[str], typer.Argument(metavar="RUN...", help="Run ids or unique prefixes.")],
    to: Annotated[Tracker, typer.Option("--to", help="The tracker to replay into.")],
    uri: Annotated[str, typer.Option(help="MLflow tracking URI (default: the run's tracking.mlflow.tracking_uri, else "
                                          "$MLFLOW_TRACKING_URI, else the store's mlflow.db).")] = "",
    logdir: Annotated[str, typer.Option(help="TensorBoard log folder (default: the run's, else the store's "
                                             "tensorboard/).")] = "",
) -> None:
    """Replay runs already in the store into an experiment tracker: config, every metric, test scores."""
    from engine.cli import sync

    sync.sync(run_ids, to.value, uri=uri, logdir=logdir)


@app.command()
def show(run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
         as_json: JsonOption = False) -> None:
    """Show a run: its config, parameter report and scores."""
    from engine.cli import commands

    commands.show(run_id, as_json=as_json)


queue_app = typer.Typer(help="Queue runs for the local GPUs (or CPU slots); a worker starts them.",
                        no_args_is_help=True)
app.add_typer(queue_app, name="queue")
RunArg = Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")]


@queue_app.command("add")
def queue_add(
    preset: Annotated[Path, typer.Argument(help="Preset TOML file.")],
    set_: SetOption = None,
    gpus: Annotated[int, typer.Option(help="GPUs (processes) the run needs; more than 1 uses accelerate.")] = 1,
    after: Annotated[
        Optional[list[str]], typer.Option("--after", help="Start only after this run has finished (repeatable).")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: the preset's run.name).")] = None,
) -> None:
    """Queue a preset; a worker starts it when enough GPUs are free."""
    from engine.cli import queue

    queue.add(preset, list(set_ or ()), gpus=gpus, after=list(after or ()), name=name)


@queue_app.command("ls")
def queue_ls(as_json: JsonOption = False) -> None:
    """Show running and queued runs, and why each queued run waits."""
    from engine.cli import queue

    queue.ls(as_json=as_json)


@queue_app.command("mv")
def queue_mv(run_id: RunArg, position: Annotated[int, typer.Argument(help="New position, 1 = next.")]) -> None:
    """Move a queued run to another position."""
    from engine.cli import queue

    queue.move(run_id, position)


@queue_app.command("cancel")
def queue_cancel(run_id: RunArg) -> None:
    """Drop a queued run, or stop a running one (it checkpoints, then ends as cancelled)."""
    from engine.cli import queue

    queue.cancel(run_id)


@queue_app.command("retry")
def queue_retry(run_id: RunArg) -> None:
    """Queue a failed or cancelled run again, resuming from its last checkpoint."""
    from engine.cli import queue

    queue.retry(run_id)


@queue_app.command("pause")
def queue_pause() -> None:
    """Start nothing new (running runs go on)."""
    from engine.cli import queue

    queue.pause(True)


@queue_app.command("resume")
def queue_resume() -> None:
    """Start queued runs again."""
    from engine.cli import queue

    queue.pause(False)


@queue_app.command("config")
def queue_config(
    assignments: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE, e.g. cpu_slots=2 allow_gpus=0,1")]
    = None,
) -> None:
    """Show or change queue settings (they apply while the worker runs)."""
    from engine.cli import queue

    queue.config(list(assignments or ()))


@app.command()
def logs(
    run_id: RunArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")]
    = False,
    lines: Annotated[Optional[int], typer.Option("--lines", "-n", help="Only the last N lines.")] = None,
) -> None:
    """Print a queued run's log (stdout and stderr of its processes)."""
    from engine.cli import queue

    queue.logs(run_id, follow=follow, lines=lines)


@app.command()
def worker(
    action: Annotated[Optional[str], typer.Argument(help="start (detached), stop, status; none: serve here.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="With status: print one JSON document instead (its "
                                          "schema: docs/cli-json.md).")] = False,
) -> None:
    """The queue worker: one per store; `ren queue add` starts it when none runs."""
    from engine.cli import queue

    queue.worker(action, as_json=as_json)


@app.command()
def submit(
    preset: Annotated[Optional[Path], typer.Argument(help="Preset TOML file.")] = None,
    resume: Annotated[
        Optional[str], typer.Option("--resume", help="Write the script that continues run RUN_ID.")
    ] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="Write a SLURM batch script (the only backend).")] = False,
    nodes: Annotated[int, typer.Option(min=1, help="Machines.")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs (processes) per machine.")] = 1,
    partition: Annotated[Optional[str], typer.Option(help="SLURM partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="SLURM time limit, e.g. 24:00:00.")] = None,
    sbatch: Annotated[Optional[list[str]], typer.Option(help="Extra #SBATCH line, e.g. --sbatch='--mem=64G'.")]
    = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Directory the job starts in (default: here).")] = None,
    now: Annotated[bool, typer.Option("--now", help="Call sbatch on the script.")] = False,
    set_: SetOption = None,
) -> None:
    """Create a run and write the sbatch script that trains it on several machines."""
    from engine.cli import queue

    if not slurm:
        raise RenError("ren submit needs a backend: --slurm (the only one so far).")
    queue.submit(preset, list(set_ or ()), resume=resume, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition,
                 time_limit=time_limit, sbatch_lines=list(sbatch or ()), workdir=workdir, now=now)


study_app = typer.Typer(help="Studies: one TOML file of variants x seeds, each pretrained and finetuned.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("run")
def study_run(
    study: Annotated[Path, typer.Argument(help="Study TOML file (e.g. presets/studies/freezing-easyvqa.toml).")],
    gpus: Annotated[int, typer.Option(help="GPUs (processes) each run needs; more than 1 uses accelerate.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; queue nothing.")] = False,
) -> None:
    """Queue every run of a study (pretraining, then its finetunes); runs already there are kept."""
    from engine.cli import study as study_cmd

    study_cmd.run(study, gpus=gpus, dry_run=dry_run)


@study_app.command("status")
def study_status(
    study: Annotated[str, typer.Argument(help="Study TOML file or the study's name.", metavar="STUDY.toml|NAME")],
    as_json: JsonOption = False,
) -> None:
    """A study's runs by variant: status, steps, scores, time, and why queued runs wait."""
    from engine.cli import study as study_cmd

    study_cmd.status(study, as_json=as_json)


data_app = typer.Typer(help="Prepare data sets for training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    task: Annotated[str, typer.Argument(help="vqav2, coco_caption, f30k_caption, nlvr2, snli_ve, refcoco, refcoco+, "
                                             "refcocog, vg, cc or sbu.")],
    source: Annotated[Path, typer.Option("--source", help="The original release: annotation files and images.")],
    out: Annotated[Path, typer.Option("--out", help="Where the arrow files go (data.root of the presets).")],
    force: Annotated[bool, typer.Option("--force", help="Rewrite files that are already complete.")] = False,
    split_by: Annotated[Optional[str], typer.Option(
        "--split-by", help="refcoco*: the refs file, refs(SPLIT_BY).p: unc, umd or google (default: unc; refcocog: "
        "umd, or google when only refs(google).p is there).")] = None,
    shard_rows: Annotated[Optional[int], typer.Option(
        "--shard-rows", min=1, help="cc, sbu: images per arrow shard (default 100000, as ViLT).")] = None,
) -> None:
    """Convert an original release into the ViLT-format arrow files `ren run` reads (resumable)."""
    from engine.cli import data

    data.prepare(task, source, out, force=force, split_by=split_by, shard_rows=shard_rows)


models_app = typer.Typer(help="Small pretrained models ren builds itself (ren:easyvqa-vit, ren:easyvqa-bert).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("build")
def models_build(
    name: Annotated[str, typer.Argument(help="easyvqa-vit, easyvqa-bert or all.")],
    force: Annotated[bool, typer.Option("--force", help="Build again, replacing an existing build.")] = False,
) -> None:
    """Train a small pretrained model into $REN_HOME/models (minutes on a CPU; runs naming it build it on first use)."""
    from engine.cli import models

    models.build(name, force=force)


eval_app = typer.Typer(help="Evaluate a stored run's final weights; scores go into its record.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("retrieval")
def eval_retrieval(
    run_id: RunArg,
    root: Annotated[Path, typer.Option("--root", help="Directory of the arrow files (ren data prepare --out).")],
    corpus: Annotated[str, typer.Option(help="f30k_caption or coco_caption (Karpathy splits).")] = "f30k_caption",
    split: Annotated[str, typer.Option(help="The Karpathy file split read: test, val or train.")] = "test",
    k: Annotated[int, typer.Option("--k", help="Candidates per query reranked by ITM.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Texts, images or pairs per forward pass.")] = 64,
    max_images: Annotated[Optional[int], typer.Option(help="Only the first N images and their captions.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
    = None,
    first_stage: Annotated[
        Optional[str], typer.Option("--first-stage", help="Another run (ITC) picks the candidates; this run's ITM "
                                    "reranks them (for one_tower runs and two_tower runs without ITC).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Image and text retrieval Recall@1/5/10: ITC first stage, top-k reranked by ITM."""
    from engine.cli import evaluate

    evaluate.retrieval(run_id, root=root, corpus=corpus, split=split, k=k, batch_size=batch_size,
                       max_images=max_images, device=device, first_stage=first_stage, as_json=as_json)


@eval_app.command("task")
def eval_task(
    run_id: RunArg,
    split: Annotated[Optional[str], typer.Option(help="The split scored, e.g. test1 (NLVR2), test (SNLI-VE), "
                                                 "rest_val, test-dev (VQAv2), testA (RefCOCO), val (easy_vqa); "
                                                 "default: the run's eval_split.")] = None,
    root: Annotated[Optional[Path], typer.Option("--root", help="Directory of the arrow files, if they moved "
                                                 "(default: the run's data.root).")] = None,
    submission: Annotated[Optional[Path], typer.Option(help="VQAv2: write the result JSON for the evaluation "
                                                       "server (required for test and test-dev).")] = None,
    examples: Annotated[Optional[int], typer.Option(
        help="Scored examples kept with the run for `ren-tui` (x on a run) (half of them the most confident "
             "errors), with the score per category; 0 keeps only the per-category scores. Default: 20, none for "
             "a split without answers.")] = None,
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 64,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """A finetuned run's task score on any split of its data set (VQA score or accuracy), its score per
    category of the data, and a few scored examples kept to look at."""
    from engine.cli import evaluate

    evaluate.task(run_id, split=split, root=root, submission=submission, batch_size=batch_size, device=device,
                  examples=examples, as_json=as_json)


@app.command("report")
def report_command(
    targets: Annotated[list[str], typer.Argument(help="A study TOML file or study name, or run ids (prefixes).",
                                                 metavar="STUDY.toml | RUN_ID...")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Directory to write into "
                                                "(default: $REN_HOME/reports/<name>/).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report's data as one JSON document instead of "
                                          "its table (the files are written all the same; its schema: "
                                          "docs/cli-json.md).")] = False,
) -> None:
    """Compare a study's variants (or runs): scores, compute, savings; writes report.md, table.tex, figures."""
    from engine.cli import report

    report.report(targets, out, as_json=as_json)


@app.command("export")
def export_command(
    run_id: RunArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write (created; it must be empty unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out, replacing the files and "
                                        "folders an export writes.")] = False,
    no_towers: Annotated[bool, typer.Option("--no-towers", help="Export the whole model only, without the "
                                            "standalone towers.")] = False,
) -> None:
    """Export a finished run: its towers for transformers and timm, the whole model for ren, a model card."""
    from engine.cli import export

    export.export(run_id, out, force=force, towers=not no_towers)


def main() -> None:
    """Entry point: user errors print one paragraph on stderr and exit with code 2, with --json too (its
    document is printed only on success); a failed run or evaluation exits 1 (docs/cli-json.md)."""
    try:
        app()
    except RenError as exc:
        err_console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
