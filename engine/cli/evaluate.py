"""The work behind ``ren eval``: scores of a stored run's final weights, kept in its record."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from engine.errors import RenError
from engine.store import Store

console = Console()

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


def retrieval(run_id: str, *, root: Path, corpus: str, split: str, k: int, batch_size: int,
              max_images: int | None, device: str | None) -> None:
    """Evaluate image and text retrieval of run ``run_id`` on ``corpus``'s ``split`` arrow file(s)
    in ``root``, print the recalls and merge them into the run's final scores."""
    if corpus not in RETRIEVAL_CORPORA:
        raise RenError(f"--corpus {corpus!r} is not a retrieval benchmark; choose {' or '.join(RETRIEVAL_CORPORA)}.")
    for name, value in (("--k", k), ("--batch-size", batch_size), ("--max-images", max_images)):
        if value is not None and value < 1:
            raise RenError(f"{name} must be a positive integer, got {value}.")
    from engine.data.arrow import find_arrow_files, open_arrow
    from engine.data.pipeline import image_size_of
    from engine.data.transforms import resolve_normalization
    from engine.evaluate import RECALL_KEYS, load_run_model, retrieval_scores

    store = Store()
    record, cfg, model, tokenizer = load_run_model(store, run_id, _device(device))
    # the Karpathy file split as named (open_corpus would read f30k "val" as ViLT's test)
    source = open_arrow(find_arrow_files(root, corpus, split), corpus, random_access=False)
    console.print(f"[bold]{record.id}[/] ({cfg.model.kind}): retrieval on {corpus} {split} "
                  f"({', '.join(p.name for p in source.paths)})")
    scores = retrieval_scores(model, tokenizer, source, image_size=image_size_of(cfg),
                              norm=resolve_normalization(cfg), k=k, batch_size=batch_size,
                              max_text_len=cfg.data.max_text_len, max_images=max_images)
    _print_recalls(scores)
    label = split if scores["n_images"] == len(source) else f"{split}[:{scores['n_images']}]"
    new = {f"{corpus}/{label}/{key}": float(scores[key]) for key in RECALL_KEYS}
    current = store.get_run(record.id).final_scores
    store.update_run(record.id, final_scores={**current, **new})
    console.print(f"stored in the run's final scores as {corpus}/{label}/*")


def _print_recalls(scores: dict[str, float]) -> None:
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in ("", "R@1", "R@5", "R@10"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("IR (text -> image)", *(f"{scores[f'ir_r{n}']:.2f}" for n in (1, 5, 10)))
    table.add_row("TR (image -> text)", *(f"{scores[f'tr_r{n}']:.2f}" for n in (1, 5, 10)))
    console.print(table)
    rerank = (f"top {scores['k']} reranked by ITM ({scores['fused_pairs']} pairs fused)" if scores["fused_pairs"]
              else "ITC first stage only (no ITM head)")
    console.print(f"r_mean {scores['r_mean']:.2f}   {scores['n_images']} images, {scores['n_texts']} texts, "
                  f"{rerank}")
    console.print(f"time: embed {scores['embed_s']:.1f}s (decode {scores['decode_s']:.1f}s), rerank "
                  f"{scores['rerank_s']:.1f}s, total {scores['total_s'] + scores['tokenize_s']:.1f}s",
                  highlight=False)
