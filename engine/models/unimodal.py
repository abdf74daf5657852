"""Building the small pretrained unimodal models ren trains itself: ``ren:easyvqa-vit`` (SimMIM-style masked
image modelling on easy-VQA's training images) and ``ren:easyvqa-bert`` (MLM on its training questions and captions),
on a CPU, in a few minutes, as offline stand-ins for the DeiT and ELECTRA starts of the paper's base-model study.
Their names, versions and directories are :mod:`engine.recipes`; their configs :mod:`engine.backbones`. The recipes,
what each differs from its reference in and the measured builds: docs/PROTOCOLS.md, "The small models ren builds".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import Tensor

from engine.backbones import recipe_config
from engine.data.tokenizer import easy_vqa_word_tokenizer
from engine.recipes import (
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    PATCH_SIZE,
    RECIPE_VERSIONS,
    RECORD_FILE,
    REN_PREFIX,
    built_dir,
    model_dir,
    recipe_of,
)
from engine.store import follow_umask

SEED = 0

VIT_STEPS = 600
BERT_STEPS = 400
_BATCH = {"easyvqa-vit": 64, "easyvqa-bert": 128}
_LR = 1e-3
_WEIGHT_DECAY = 0.01
_WARMUP = 0.05
_SHIFT = 4
_MASK_RATIO_IMAGE = 0.6
"""SimMIM's mask ratio for ViT (configs/vit_base__800ep: MASK_RATIO 0.6)."""
_MASK_BLOCK = 16
"""Pixels per side of a masked block: 2x2 patches, as SimMIM's ViT (MASK_PATCH_SIZE 32, patch 16)."""
_KNN = 20
_KNN_TEMPERATURE = 0.07
"""DINO's k-NN evaluation (facebookresearch/dino eval_knn.py: nb_knn 20, temperature 0.07)."""
_KNN_MEMORY = 1000
"""Training images whose features the k-NN searches (DINO: all; a quarter here keeps the build's evaluation
to a few percent of its time)."""
_MASK_PROB = 0.15
_MAX_TEXT_LEN = 24
_HELD_OUT_TEXTS = 4096
_THREADS = 1
"""CPU threads of a build: the same computation on any machine, and these small matrices gain little from
more threads (on a busy 2-core machine two threads ran 2.5x slower than one)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildReport:
    """What one build did: its steps and time, and how well the model does on held-out easy-VQA data."""

    name: str
    steps: int
    batch_size: int
    seconds: float
    train_loss: float
    """Mean training loss over the last 50 steps."""
    held_out: str
    """What the metrics were measured on."""
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        scores = ", ".join(f"{key} {value:.4f}" for key, value in self.metrics.items())
        return (f"{REN_PREFIX}{self.name}: {self.steps} steps of batch {self.batch_size} in {self.seconds:.0f} s, "
                f"final train loss {self.train_loss:.4f}; on {self.held_out}: {scores}")


# --------------------------------------------------------------------------- building


def ensure_built(name: str, *, key: str | None = None, steps: int | None = None, log: Log | None = None) -> Path:
    """The model's directory, built first if it does not exist yet (once, whoever else asks at the same time;
    ``steps``: the recipe's own unless given)."""
    recipe_of(name, key)
    path = built_dir(name)
    if path is not None:
        return path
    return _build_locked(name, force=False, steps=steps, log=log or _stderr)


def build(name: str, *, force: bool = False, steps: int | None = None,
          log: Log | None = None) -> tuple[Path, BuildReport | None]:
    """Build the model into ``$REN_HOME/models`` (``force``: again, replacing the old build). Returns its
    directory and the build's report (None when it was built already and not forced)."""
    if not force:
        path = built_dir(name)
        if path is not None:
            return path, None
    path = _build_locked(name, force=force, steps=steps, log=log or _stderr)
    return path, read_report(path)


def read_report(path: Path) -> BuildReport:
    """The report a build left in ``recipe.json``."""
    record = json.loads((path / RECORD_FILE).read_text())
    return BuildReport(**{key: record[key] for key in BuildReport.__dataclass_fields__})


def _build_locked(name: str, *, force: bool, steps: int | None, log: Log) -> Path:
    recipe = recipe_of(name)
    target = model_dir(name)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / f".{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"another process is building {REN_PREFIX}{recipe}; waiting for it ...")
        lock.acquire()
    try:
        if not force and built_dir(name) is not None:
            return target
        for stale in root.glob(f".{target.name}.tmp-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
        try:
            log(f"building {REN_PREFIX}{recipe} in {target} (a few minutes, once) ...")
            report = train_recipe(recipe, work, steps=steps, cache_dir=_cache_dir(), log=log)
            log(report.summary())
            follow_umask(work)  # mkdtemp's 0700 and safetensors' 0600 would hide the model from other users
            if target.exists():
                old = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-old-"))
                os.replace(target, old / target.name)
                os.replace(work, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        lock.release()
    return target


def train_recipe(name: str, out_dir: Path, *, steps: int | None = None, seed: int = SEED,
                 cache_dir: Path | None = None, log: Log | None = None) -> BuildReport:
    """Train the recipe ``name`` and save the model into ``out_dir`` (which must exist); ``steps``
    defaults to the recipe's own. The directory is complete (``recipe.json`` written) on return."""
    recipe = recipe_of(name)
    out_dir = Path(out_dir)
    cache_dir = cache_dir or _cache_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if recipe == "easyvqa-vit":
                report = _train_vit(out_dir, steps=VIT_STEPS if steps is None else steps, seed=seed,
                                    cache_dir=cache_dir, log=log)
            else:
                report = _train_bert(out_dir, steps=BERT_STEPS if steps is None else steps, seed=seed,
                                     cache_dir=cache_dir, log=log)
    finally:
        torch.set_num_threads(threads)
    record = {**asdict(report), "recipe": recipe, "version": RECIPE_VERSIONS[recipe], "seed": seed,
              "torch": torch.__version__, "threads": _THREADS}
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return report


def _train_vit(out_dir: Path, *, steps: int, seed: int, cache_dir: Path, log: Log | None) -> BuildReport:
    from transformers import ViTForMaskedImageModeling, ViTImageProcessor

    from engine.data.easyvqa import load_easy_vqa

    data = load_easy_vqa(cache_dir)
    images = {split: torch.from_numpy(data.split(split).images).permute(0, 3, 1, 2) for split in ("train", "test")}
    model = ViTForMaskedImageModeling(recipe_config("easyvqa-vit"))
    masks = _block_masks(len(images["test"]), torch.Generator().manual_seed(seed + 1))
    initial = _evaluate_vit(model, data, images, masks)
    seconds, train_loss = _pretrain_vit(model, images["train"], steps, torch.Generator().manual_seed(seed), log)
    metrics = {**_evaluate_vit(model, data, images, masks), **{f"random_init_{k}": v for k, v in initial.items()}}
    model.save_pretrained(out_dir)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(IMAGE_MEAN),
                      image_std=list(IMAGE_STD)).save_pretrained(out_dir)
    return BuildReport("easyvqa-vit", steps, _BATCH["easyvqa-vit"], seconds, train_loss,
                       f"the {len(images['test'])} easy-VQA test images (masked L1 under seeded masks; k-NN on "
                       f"colour and shape, k={_KNN}, the first {_KNN_MEMORY} training images as memory)",
                       metrics)


def _pretrain_vit(model: Any, images_u8: Tensor, steps: int, generator: torch.Generator,
                  log: Log | None) -> tuple[float, float]:
    """SimMIM on ``images_u8`` (uint8, N x 3 x H x W), the only data it is given: no labels reach it."""
    norm = _vit_norm()
    batch = _BATCH["easyvqa-vit"]

    def loss_of(step: int) -> Tensor:
        rows = torch.randint(0, len(images_u8), (batch,), generator=generator)
        pixels = norm.apply(_augment(images_u8[rows], generator))
        return model(pixel_values=pixels, bool_masked_pos=_block_masks(batch, generator)).loss

    return _optimise(model, loss_of, steps, log)


def _block_masks(n: int, generator: torch.Generator) -> Tensor:
    """``n`` SimMIM masks over the patch grid, flattened: ``ceil(ratio x blocks)`` random blocks of
    ``_MASK_BLOCK`` pixels each (as SimMIM's ``MaskGenerator``, drawn from ``generator``)."""
    side, scale = IMAGE_SIZE // _MASK_BLOCK, _MASK_BLOCK // PATCH_SIZE
    count = math.ceil(side * side * _MASK_RATIO_IMAGE)
    chosen = torch.rand(n, side * side, generator=generator).argsort(1)[:, :count]
    blocks = torch.zeros(n, side * side, dtype=torch.bool).scatter_(1, chosen, True).view(n, side, side)
    return blocks.repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)


def _evaluate_vit(model: Any, data: Any, images: dict[str, Tensor], masks: Tensor) -> dict[str, float]:
    """Masked L1 on the test images under ``masks``; k-NN accuracy of colour and of shape from mean-pooled
    features (the first ``_KNN_MEMORY`` training images as memory). The labels come in here, after training,
    and only to score frozen features."""
    from engine.data.easyvqa import PALETTE, SHAPES, easy_vqa_captions

    norm = _vit_norm()
    model.eval()
    with torch.no_grad():
        test = images["test"].split(250)
        l1 = [float(model(pixel_values=norm.apply(x), bool_masked_pos=m).loss) * len(x)
              for x, m in zip(test, masks.split(250), strict=True)]
        memory = {"train": images["train"][:_KNN_MEMORY], "test": images["test"]}
        features = {split: torch.cat([model.vit(pixel_values=norm.apply(x)).last_hidden_state[:, 1:].mean(1)
                                      for x in memory[split].split(250)]) for split in memory}
    corpora = {split: easy_vqa_captions(data, split) for split in memory}
    metrics = {"masked_l1": sum(l1) / len(images["test"])}
    for kind, values in (("colour", list(PALETTE)), ("shape", list(SHAPES))):
        labels = {split: torch.tensor([values.index(v) for v in getattr(corpus, f"{kind}s")][:len(features[split])])
                  for split, corpus in corpora.items()}
        metrics[f"knn_{kind}_accuracy"] = _knn_accuracy(features["train"], labels["train"], features["test"],
                                                        labels["test"], len(values))
    return metrics


def _knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, classes: int) -> float:
    """Weighted k-NN, as DINO's ``eval_knn.py``: the ``_KNN`` most cosine-similar training features vote for
    their labels with weight ``exp(similarity / _KNN_TEMPERATURE)``."""
    similarity, nearest = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).topk(_KNN, dim=1)
    weights = (similarity / _KNN_TEMPERATURE).exp()
    votes = torch.zeros(len(test), classes).scatter_add_(1, train_labels[nearest], weights)
    return _mean(votes.argmax(1) == test_labels)


def _vit_norm() -> Any:
    from engine.data.transforms import Normalization

    return Normalization(IMAGE_MEAN, IMAGE_STD)


def _train_bert(out_dir: Path, *, steps: int, seed: int, cache_dir: Path, log: Log | None) -> BuildReport:
    from transformers import BertForMaskedLM

    from engine.objectives import IGNORE, mask_tokens

    tokenizer = easy_vqa_word_tokenizer()
    from engine.data.easyvqa import load_easy_vqa

    data = load_easy_vqa(cache_dir)
    texts = {split: _texts(data, split) for split in ("train", "test")}
    encoded = {split: _encode(tokenizer, texts[split]) for split in texts}
    model = BertForMaskedLM(recipe_config("easyvqa-bert"))
    batch = _BATCH["easyvqa-bert"]
    generator = torch.Generator().manual_seed(seed)
    mask = dict(mask_prob=_MASK_PROB, whole_word=False, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                num_special=max(tokenizer.all_special_ids) + 1)

    train_ids, train_words, train_attention = encoded["train"]

    def loss_of(step: int) -> Tensor:
        rows = torch.randint(0, len(train_ids), (batch,), generator=generator)
        masked, targets = mask_tokens(train_ids[rows], train_words[rows], generator=generator, **mask)
        return model(input_ids=masked, attention_mask=train_attention[rows], labels=targets).loss

    seconds, train_loss = _optimise(model, loss_of, steps, log)
    model.eval()
    held_out = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(len(texts["test"]), generator=held_out)[:_HELD_OUT_TEXTS].sort().values
    ids, word_ids, attention = (t[rows] for t in encoded["test"])
    masked, targets = mask_tokens(ids, word_ids, generator=held_out, **mask)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=m, attention_mask=a).logits
                            for m, a in zip(masked.split(1024), attention.split(1024), strict=True)])
    chosen = targets != IGNORE
    most_common = torch.bincount(train_ids[train_words >= 0]).argmax()
    metrics = {
        "masked_accuracy": _mean(logits.argmax(-1)[chosen] == targets[chosen]),
        "masked_loss": float(F.cross_entropy(logits[chosen], targets[chosen])),
        "most_common_word_accuracy": _mean(targets[chosen] == most_common),
    }
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return BuildReport("easyvqa-bert", steps, batch, seconds, train_loss,
                       f"{int(chosen.sum())} masked words of {len(ids)} of the {len(texts['test'])} easy-VQA test "
                       "questions and captions (a seeded sample)",
                       metrics)


def _optimise(model: torch.nn.Module, loss_of: Callable[[int], Tensor], steps: int,
              log: Log | None) -> tuple[float, float]:
    """AdamW with linear warm-up and cosine decay; returns (seconds, mean loss of the last 50 steps)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
    warmup = max(1, round(steps * _WARMUP))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    model.train()
    start, recent = time.perf_counter(), []
    for step in range(steps):
        loss = loss_of(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        recent = [*recent[-49:], float(loss.detach())]
        if log is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            log(f"  step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"{time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start, (sum(recent) / len(recent) if recent else float("nan"))


def _augment(images_u8: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to ``_SHIFT`` pixels (edges repeated), per image."""
    n, _, height, width = images_u8.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images_u8.flip(3), images_u8)
    padded = F.pad(images.float(), (_SHIFT,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * _SHIFT + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)]).to(
        torch.uint8)


def _texts(data: Any, split: str) -> list[str]:
    """A split's questions and its derived captions."""
    from engine.data.easyvqa import easy_vqa_captions

    return list(data.split(split).questions) + easy_vqa_captions(data, split).texts


def _encode(tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """(input ids, word ids with -1 at special and padding tokens, attention mask), padded to the longest."""
    encoding = tokenizer(texts, padding="longest", truncation=True, max_length=_MAX_TEXT_LEN, return_tensors="pt")
    words = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(row)] for row in range(len(texts))])
    return encoding["input_ids"], words, encoding["attention_mask"]


def _mean(hits: Tensor) -> float:
    return float(hits.float().mean())


def _cache_dir() -> Path:
    from engine.store import default_root

    return default_root() / "cache"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
