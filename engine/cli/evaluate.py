"""The work behind ``ren eval``: scores of a stored run's final weights, kept in its record."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from engine.cli import jsonout
from engine.errors import RenError
from engine.store import Store

if TYPE_CHECKING:
    from engine.predictions import SplitPredictions

console = Console()
err_console = Console(stderr=True)

RETRIEVAL_CORPORA = ("f30k_caption", "coco_caption")


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RenError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RenError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu.")
    return name


def _output(as_json: bool) -> Console:
    """Where an evaluation says what it does: stdout, or stderr when stdout carries the JSON document."""
    return err_console if as_json else console


def retrieval(run_id: str, *, root: Path, corpus: str, split: str, k: int, batch_size: int,
              max_images: int | None, device: str | None, first_stage: str | None = None,
              as_json: bool = False) -> None:
    """Evaluate image and text retrieval of run ``run_id`` on ``corpus``'s ``split`` arrow file(s)
    in ``root``, print the recalls and merge them into the run's final scores. With ``first_stage``
    (another run's id) that run ranks and ``run_id``'s ITM head reranks; the scores are stored as
    ``{corpus}/{split}@{first-stage id}/*``. ``as_json``: the recalls as one JSON document on stdout
    (schema ``ren.eval-retrieval/1``), the rest on stderr."""
    if corpus not in RETRIEVAL_CORPORA:
        raise RenError(f"--corpus {corpus!r} is not a retrieval benchmark; choose {' or '.join(RETRIEVAL_CORPORA)}.")
    for name, value in (("--k", k), ("--batch-size", batch_size), ("--max-images", max_images)):
        if value is not None and value < 1:
            raise RenError(f"{name} must be a positive integer, got {value}.")
    from engine.data.arrow import find_arrow_files, open_arrow
    from engine.data.pipeline import image_size_of
    from engine.data.transforms import resolve_normalization
    from engine.evaluate import RECALL_KEYS, RunModel, check_rerank_config, load_run_model, retrieval_scores

    say = _output(as_json)
    store = Store()
    on = _device(device)
    first = None
    if first_stage is None:
        record, cfg, model, tokenizer = load_run_model(store, run_id, on)
    else:
        record, cfg, model, tokenizer = load_run_model(store, run_id, on, check=check_rerank_config)
        first_record, first_cfg, first_model, first_tokenizer = load_run_model(store, first_stage, on,
                                                                               role="first-stage run")
        first = RunModel.of(first_cfg, first_model, first_tokenizer)
    # the Karpathy file split as named (open_corpus would read f30k "val" as ViLT's test)
    source = open_arrow(find_arrow_files(root, corpus, split), corpus, random_access=False)
    say.print(f"[bold]{record.id}[/] ({cfg.model.kind}): retrieval on {corpus} {split} "
              f"({', '.join(p.name for p in source.paths)})")
    if first is not None:
        say.print(f"first stage: run {first_record.id} ({first_cfg.model.kind}, ITC), reranked by this run's ITM")
    scores = retrieval_scores(model, tokenizer, source, image_size=image_size_of(cfg),
                              norm=resolve_normalization(cfg), k=k, batch_size=batch_size,
                              max_text_len=cfg.data.max_text_len, max_images=max_images, first_stage=first)
    _print_recalls(scores, say)
    label = split if scores["n_images"] == len(source) else f"{split}[:{scores['n_images']}]"
    if first is not None:
        label = f"{label}@{first_record.id}"
    new = {f"{corpus}/{label}/{key}": float(scores[key]) for key in RECALL_KEYS}
    current = store.get_run(record.id).final_scores
    store.update_run(record.id, final_scores={**current, **new})
    say.print(f"stored in the run's final scores as {corpus}/{label}/*")
    if as_json:
        jsonout.emit("eval retrieval", {
            "run_id": record.id, "first_stage": first_record.id if first is not None else None,
            "corpus": corpus, "split": split, "files": [str(p) for p in source.paths],
            "n_images": int(scores["n_images"]), "n_texts": int(scores["n_texts"]), "k": int(scores["k"]),
            "recalls": {key: float(scores[key]) for key in RECALL_KEYS},
            "reranked": {"full_passes": int(scores["full_passes"]), "fused_pairs": int(scores["fused_pairs"])},
            "seconds": {"embed": scores["embed_s"], "decode": scores["decode_s"], "rerank": scores["rerank_s"],
                        "tokenize": scores["tokenize_s"], "total": scores["total_s"] + scores["tokenize_s"]},
            "stored_as": f"{corpus}/{label}"})


def _print_recalls(scores: dict[str, float], say: Console) -> None:
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in ("", "R@1", "R@5", "R@10"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("IR (text -> image)", *(f"{scores[f'ir_r{n}']:.2f}" for n in (1, 5, 10)))
    table.add_row("TR (image -> text)", *(f"{scores[f'tr_r{n}']:.2f}" for n in (1, 5, 10)))
    say.print(table)
    bound = scores["k"] * (scores["n_texts"] + scores["n_images"])
    if scores["full_passes"]:
        rerank = (f"top {scores['k']} reranked by ITM ({scores['full_passes']} full forward passes, at most "
                  f"k x (texts + images) = {bound})")
    elif scores["fused_pairs"]:
        rerank = f"top {scores['k']} reranked by ITM ({scores['fused_pairs']} pairs fused)"
    else:
        rerank = "ITC first stage only (no ITM head)"
    say.print(f"r_mean {scores['r_mean']:.2f}   {scores['n_images']} images, {scores['n_texts']} texts, {rerank}")
    say.print(f"time: embed {scores['embed_s']:.1f}s (decode {scores['decode_s']:.1f}s), rerank "
              f"{scores['rerank_s']:.1f}s, total {scores['total_s'] + scores['tokenize_s']:.1f}s", highlight=False)


def task(run_id: str, *, split: str | None, root: Path | None, submission: Path | None, batch_size: int,
         device: str | None, examples: int | None = None, as_json: bool = False) -> None:
    """Evaluate finetuned run ``run_id`` on ``split`` of its data set (default: its eval split), print
    the score and merge it into the run's final scores as ``{dataset}/{split}/{metric}``; keep the score per
    category and ``examples`` scored examples (default 20) with the run; with ``submission``, write the VQAv2
    result file of its predictions (required for answerless test splits). ``as_json``: the score as one JSON
    document on stdout (schema ``ren.eval-task/1``), the rest on stderr."""
    if batch_size < 1:
        raise RenError(f"--batch-size must be a positive integer, got {batch_size}.")
    if examples is not None and examples < 0:
        raise RenError(f"--examples must be 0 or more, got {examples}.")
    from engine.evaluate import load_task_eval, split_predictions, task_scores
    from engine.predictions import keep_predictions

    say = _output(as_json)
    store = Store()
    run = load_task_eval(store, run_id, split, root=root, device=_device(device))
    cfg, data = run.cfg, run.data
    vqav2 = cfg.task.name == "vqa" and cfg.data.dataset == "vqav2"
    if submission is not None and not vqav2:
        raise RenError(f"--submission writes the VQAv2 result file (question ids and answers); {run.where} "
                       f"finetuned {cfg.task.name} on {cfg.data.dataset}. Drop --submission.")
    if not data.labelled and submission is None:
        raise RenError(f"The {cfg.data.dataset} split {run.split!r} has no answers (a test split), so {run.where} "
                       "cannot be scored on it; give --submission FILE to write its predictions for the "
                       "evaluation server.")
    source = getattr(data.dataset, "source", None)  # arrow data sets; easy-VQA is embedded
    files = ", ".join(p.name for p in source.paths) if source is not None else "embedded"
    say.print(f"[bold]{run.record.id}[/] ({cfg.task.name} on {cfg.data.dataset}, {cfg.model.kind}): "
              f"split {run.split} ({files}), {len(data.dataset)} items")
    if examples and not data.labelled:
        raise RenError(f"--examples {examples}: the {cfg.data.dataset} split {run.split!r} has no answers (a test "
                       "split), so its predictions cannot be scored; keep examples of a split with answers, e.g. "
                       f"--split {cfg.data.eval_split}, or drop --examples.")
    result = task_scores(run.model, data.dataset, cfg.task.name, batch_size=batch_size,
                         num_workers=cfg.data.num_workers, mixed_precision=cfg.train.mixed_precision,
                         keep_predictions=submission is not None, keep_items=data.labelled,
                         vqa_loss=cfg.task.loss)
    left_out = result.items - result.samples
    note = f" ({left_out} left out: their images could not be decoded)" if left_out else ""
    if data.labelled:
        say.print(f"{result.metric} {result.score:.4f}{_scorer(result.metric, cfg.data.dataset)} on "
                  f"{result.samples} samples{note} in {result.seconds:.1f}s", highlight=False)
        current = store.get_run(run.record.id).final_scores
        store.update_run(run.record.id, final_scores={**current, run.score_key(result.metric): result.score})
        say.print(f"stored in the run's final scores as {run.score_key(result.metric)}")
        kept, thumbnails = split_predictions(run, result, 20 if examples is None else examples)
        folder = keep_predictions(store, run.record.id, kept, thumbnails)
        _print_breakdown(kept, say)
        say.print(f"kept {len(kept.examples)} scored examples ({sum(e.error for e in kept.examples)} of them "
                  f"errors) in {folder}: `ren-tui` shows them (Runs, x)", highlight=False)
    if submission is not None:
        if left_out:
            raise RenError(f"Not writing {submission}: {left_out} of {result.items} questions of split "
                           f"{run.split!r} have images that cannot be decoded, and the evaluation server needs an "
                           "answer for every question. Re-create the files with `ren data prepare vqav2`.")
        from engine.vqa_answers import write_submission

        answers = data.answers or []
        write_submission(result.question_ids, [answers[i] for i in result.predictions], submission)
        say.print(f"submission: {len(result.predictions)} answers written to {submission}")
    if as_json:
        jsonout.emit("eval task", {
            "run_id": run.record.id, "task": cfg.task.name, "dataset": cfg.data.dataset, "split": run.split,
            "files": [str(p) for p in source.paths] if source is not None else None,
            "items": result.items, "samples": result.samples, "seconds": result.seconds,
            "metric": result.metric if data.labelled else None, "score": result.score if data.labelled else None,
            "stored_as": run.score_key(result.metric) if data.labelled else None,
            "submission": None if submission is None else {"path": str(submission),
                                                           "answers": len(result.predictions)},
            "breakdown": None if not data.labelled else {
                "kind": kept.category_kind,
                "categories": [dataclasses.asdict(row) for row in kept.breakdown]},
            "examples": None if not data.labelled else {"kept": len(kept.examples), "path": str(folder)}})


def _print_breakdown(kept: SplitPredictions, say: Console) -> None:
    """The score per category, when the data has categories."""
    if kept.category_kind is None:
        return
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in (kept.category_kind, "items", kept.metric, "errors"):
        table.add_column(column, justify="left" if column == kept.category_kind else "right")
    for row in kept.breakdown:
        table.add_row(row.category, str(row.n), f"{row.score:.4f}", str(row.errors))
    say.print(table)


def _scorer(metric: str, dataset: str) -> str:
    """Which VQAv2 scorer produced ``metric``, in words (nothing for other data sets)."""
    from engine.tasks import OFFICIAL_VQA_METRIC

    if dataset != "vqav2":
        return ""
    if metric == OFFICIAL_VQA_METRIC:
        return " (the official VQA accuracy over the annotators' answers, vqaEval.py)"
    return " (ViLT's soft score: the files carry no raw annotator answers)"
