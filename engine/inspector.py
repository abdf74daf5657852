"""``python -m engine.inspector``: the model inspector, a long-lived helper process.

It imports torch once, then answers each JSON line on stdin with one JSON line on stdout, so a torch-free
client (the TUI) can show parameter counts and compute estimates while a config is being edited.

- on start, once the heavy imports are done: ``{"ready": true}``
- request: ``{"id": n, "config": {...}}`` (a raw config dict, as a preset holds it)
- answer: ``{"id": n, "ok": true, "config": resolved, "params": summary, "frozen_groups": [...],
  "flops_per_sample": {...}}`` (``params`` as :func:`model_summary` reports it, ``frozen_groups`` the group
  names ``[freeze]`` selects, ``flops_per_sample`` as :func:`flops_per_sample` estimates it: ``{}`` and a
  ``flops_error`` message when the count failed), or
  ``{"id": n, "ok": false, "error": message, "key": "dotted.key" or null}``

Bad input never stops the helper: a line that is not a JSON request gets an error answer (``id`` null
when it has none). It exits at the end of stdin.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from typing import IO, Any

from engine.config import RunConfig, config_from_dict
from engine.errors import ConfigError, RenError

_LEADING_KEY = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)\b")


def answer(request: Any) -> dict[str, Any]:
    """The answer to one decoded request; never raises."""
    if not isinstance(request, dict):
        return _error(None, 'a request is a JSON object {"id": n, "config": {...}}, '
                            f"got {type(request).__name__}.")
    rid = request.get("id")
    config = request.get("config")
    if not isinstance(config, dict):
        return _error(rid, "the request has no \"config\" object.")
    try:
        cfg = config_from_dict(config)
        params = model_summary(cfg)
        reply = {"id": rid, "ok": True, "config": cfg.to_dict(), "params": params,
                 "frozen_groups": frozen_groups(cfg, list(params["groups"])), "flops_per_sample": {}}
        try:
            reply["flops_per_sample"] = flops_per_sample(cfg)
        except Exception as exc:  # a valid config stays valid when its compute cannot be counted
            reply["flops_error"] = f"{type(exc).__name__}: {exc}"
        return reply
    except ConfigError as exc:
        return _error(rid, str(exc), exc.key or _key_in(str(exc)))
    except RenError as exc:
        return _error(rid, str(exc), _key_in(str(exc)) or _named_key(config, str(exc)))
    except Exception as exc:  # the helper must outlive any bad config
        return _error(rid, f"{type(exc).__name__}: {exc}", _key_in(str(exc)) or _named_key(config, str(exc)))


def answer_line(line: str) -> dict[str, Any] | None:
    """The answer to one input line (None for a blank line)."""
    if not line.strip():
        return None
    try:
        request = json.loads(line)
    except ValueError as exc:
        return _error(None, f"not a JSON line: {exc}.")
    return answer(request)


def _error(rid: Any, message: str, key: str | None = None) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": message, "key": key}


def _key_in(message: str) -> str | None:
    """The dotted key an engine message starts with (``model.text.name = ...``)."""
    found = _LEADING_KEY.match(message)
    return found[1] if found else None


_NAMED = ("model.text.name", "model.vision.name", "model.backbone.name", "data.tokenizer")


def _named_key(config: dict[str, Any], message: str) -> str | None:
    """The model-name key whose value the message quotes (a tokenizer that failed to load)."""
    for key in _NAMED:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and repr(node) in message:
            return key
    return None


def frozen_groups(cfg: RunConfig, names: list[str]) -> list[str]:
    """The group names ``cfg.freeze`` freezes, in model order."""
    from engine.freeze import select

    frozen = select(cfg.freeze.groups, names, "freeze.groups") - select(cfg.freeze.unfreeze, names, "freeze.unfreeze")
    return [name for name in names if name in frozen]


SAMPLE_TEXTS = 4096
"""Texts read (from the start of the training split) to learn how long the data's texts are."""
EVAL_BATCH = 256
"""The evaluation loader's batch (engine.train: ``max(micro batch, 256)``)."""
REFCOCO_BOXES = 8
"""Candidate boxes per RefCOCO image assumed by the estimate (the data's own count varies per image)."""
_FLOPS_CACHE: dict[str, dict[str, Any]] = {}
_LENGTHS_CACHE: dict[str, tuple[list[int], list[float], str]] = {}
_CACHE_SIZE = 32


def flops_per_sample(cfg: RunConfig) -> dict[str, Any]:
    """The compute of one sample, in FLOPs, counted as training counts it.

    Training measures its first step with torch's flop counter (:class:`engine.compute.FlopMeter`). The
    estimate runs the same counter (:func:`engine.compute.flop_counter`) over one step of the same model on
    fake tensors (shapes only: nothing is computed or allocated), shaped as the trainer's step: the
    pretraining row blocks of ``engine.train._pretrain_step`` (MLM rows, then ITM or ITC rows, plus the
    towers-only pass of hard ITM negatives) or the task forward of ``_finetune_step``, a backward through
    what ``[freeze]`` leaves trainable, and an evaluation forward. So the count includes what a formula
    over parameter counts misses: convolutions (timm CNNs), attention products, the last layer's rows
    (``engine.models.rows``), the MLM head at the masked positions only.

    What the shapes cannot know is how long the texts are: a batch is padded to its longest text
    (:func:`typical_text_len`). Returns ``{"forward", "backward", "train", "eval" (task runs),
    "text_len": {"train", "eval", "source"}, "groups": {group: forward FLOPs}}`` (floats; the groups
    hold what ran inside each layer group's modules, so they sum to about ``forward``).
    """
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("run", "optim", "distributed")}
                     | {"train": micro}, sort_keys=True, default=str)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _count_flops(cfg, micro)
        while len(_FLOPS_CACHE) > _CACHE_SIZE:
            _FLOPS_CACHE.pop(next(iter(_FLOPS_CACHE)))
    return copy.deepcopy(_FLOPS_CACHE[key])


def typical_text_len(cfg: RunConfig, tokenizer: Any, batch: int) -> tuple[float, str]:
    """(the expected length a batch of ``batch`` training texts is padded to, where that comes from).

    Batches are padded to their longest text (``padding="longest"``), so this is the expected maximum of
    ``batch`` lengths drawn from the token lengths of the first :data:`SAMPLE_TEXTS` training texts (cut at
    ``data.max_text_len``). Data that cannot be read here gives ``data.max_text_len``, an upper bound."""
    lengths, _, source = text_lengths(cfg, tokenizer)
    if not lengths:
        return float(cfg.data.max_text_len), source
    return expected_max(lengths, batch), source


def expected_max(lengths: list[int], n: int) -> float:
    """The expected maximum of ``n`` independent draws from ``lengths``: sum over the distinct lengths
    ``l`` of ``l * (F(l)^n - F(l-)^n)``, ``F`` their distribution function."""
    ordered = sorted(lengths)
    total, below, out = len(ordered), 0.0, 0.0
    for i, length in enumerate(ordered):
        if i + 1 < total and ordered[i + 1] == length:
            continue
        at = (i + 1) / total
        out += length * (at**n - below**n)
        below = at
    return out


def text_lengths(cfg: RunConfig, tokenizer: Any) -> tuple[list[int], list[float], str]:
    """(token lengths, MLM-maskable tokens per text, source) of a sample of the training texts, tokenized
    as the data sets do (cut at ``data.max_text_len``); no lengths when the data cannot be read here."""
    d = cfg.data
    key = json.dumps([d.model_dump(mode="json"), cfg.task is None, getattr(tokenizer, "name_or_path", ""),
                      len(tokenizer), cfg.objectives.mlm.model_dump() if cfg.objectives and cfg.objectives.mlm
                      else None], sort_keys=True, default=str)
    if key not in _LENGTHS_CACHE:
        try:
            texts, where = _training_texts(cfg)
        except (RenError, OSError, ValueError, KeyError) as exc:
            _LENGTHS_CACHE[key] = ([], [], f"at most data.max_text_len: the texts cannot be read here ({exc})")
        else:
            _LENGTHS_CACHE[key] = (*_lengths(cfg, tokenizer, texts), f"the lengths of {len(texts):,} {where}")
        while len(_LENGTHS_CACHE) > _CACHE_SIZE:
            _LENGTHS_CACHE.pop(next(iter(_LENGTHS_CACHE)))
    return _LENGTHS_CACHE[key]


def _training_texts(cfg: RunConfig) -> tuple[list[str], str]:
    """The first :data:`SAMPLE_TEXTS` texts of the training split, and what they are."""
    if cfg.data.dataset == "easy_vqa":
        from engine.data.easyvqa import CAPTION_TEMPLATES, PALETTE, SHAPES

        if cfg.task is None:  # each image has one caption per template
            return ([t.format(colour=c, shape=s) for c in PALETTE for s in SHAPES for t in CAPTION_TEMPLATES],
                    "easy-VQA captions")
        import easy_vqa

        return list(easy_vqa.get_train_questions()[0][:SAMPLE_TEXTS]), "easy-VQA training questions"
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.data.arrow import arrow_kind
    from engine.data.pipeline import _text_kinds, open_source

    texts: list[str] = []
    kinds = _text_kinds(cfg)
    for kind in kinds:
        column = open_source(cfg, kind, str(cfg.data.train_split)).column(arrow_kind(kind).text_column)
        column = column.slice(0, SAMPLE_TEXTS)
        while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            column = pc.list_flatten(column)
        texts += [t for t in column.to_pylist()[:SAMPLE_TEXTS] if t]
    if not texts:
        raise RenError("no texts")
    return texts, f"{'+'.join(kinds)} {cfg.data.train_split} texts"


def _lengths(cfg: RunConfig, tokenizer: Any, texts: list[str]) -> tuple[list[int], list[float]]:
    """Token lengths, and the tokens MLM predicts per text: ``max(1, round(n * mask_prob))`` of its ``n``
    words (or tokens) with their tokens (``engine.objectives.mask_tokens``)."""
    encoding = tokenizer(texts, truncation=True, max_length=cfg.data.max_text_len)
    lengths = [len(ids) for ids in encoding["input_ids"]]
    mlm = cfg.objectives.mlm if cfg.objectives is not None else None
    if mlm is None:
        return lengths, []
    masked = []
    for i in range(len(texts)):
        words = [w for w in encoding.word_ids(i) if w is not None]
        units = len(set(words)) if mlm.whole_word else len(words)
        masked.append(0.0 if not units else max(1, round(units * mlm.mask_prob)) * len(words) / units)
    return lengths, masked


def _count_flops(cfg: RunConfig, micro: int) -> dict[str, Any]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.compute import flop_counter
    from engine.freeze import apply_freeze

    model, tokenizer = _meta_model(cfg)
    apply_freeze(model, cfg.freeze)
    t_train, source = typical_text_len(cfg, tokenizer, micro)
    t_eval, _ = typical_text_len(cfg, tokenizer, max(micro, EVAL_BATCH))
    _, masked, _ = text_lengths(cfg, tokenizer)
    obj = cfg.objectives
    mask_prob = obj.mlm.mask_prob if obj is not None and obj.mlm is not None else 0.0
    masked_per_text = sum(masked) / len(masked) if masked else mask_prob * t_train
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")  # fake CPU tensors: the CPU kernels' shapes and attention ops
    with fake, _padded_batches():
        model.train()
        with flop_counter() as counter:
            loss = _training_forward(model, cfg, micro, round(t_train), masked_per_text)
            forward = counter.get_total_flops()
            modules = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
            loss.backward()
            backward = counter.get_total_flops() - forward
        out: dict[str, Any] = {"forward": forward / micro, "backward": backward / micro,
                               "train": (forward + backward) / micro}
        if cfg.task is not None:
            batch = max(micro, EVAL_BATCH)
            model.eval()
            with torch.no_grad(), flop_counter() as counter:
                _task_logits(model, cfg, batch, round(t_eval))
            out["eval"] = counter.get_total_flops() / batch
    out["text_len"] = {"train": t_train, "eval": t_eval, "source": source}
    out["groups"] = {name: flops / micro for name, flops in _group_flops(model, modules).items()}
    return out


def _padded_batches() -> Any:
    """A dispatch mode that answers what a step reads from its data's values, which fake tensors do not
    have, as a padded training batch would: ``bool(mask.all())`` (nothing padded?) is False
    (``engine.models.layers.additive_mask``). Reading any other value stops the count."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    class PaddedBatches(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func in reads and args[0].dtype == torch.bool:
                return False
            return func(*args, **(kwargs or {}))

    return PaddedBatches()


def _inputs(cfg: RunConfig, batch: int, text_len: int) -> dict[str, Any]:
    import torch

    from engine.data.pipeline import image_size_of

    size = image_size_of(cfg)
    out = {"input_ids": torch.zeros(batch, text_len, dtype=torch.long),
           "attention_mask": torch.ones(batch, text_len, dtype=torch.long),
           "pixel_values": torch.zeros(batch, 3, size, size)}
    if cfg.task is not None and cfg.task.name == "nlvr2":  # a pair of images, as engine.data.nlvr2 batches them
        out["pixel_values_0"] = out["pixel_values"]
        out["pixel_values_1"] = torch.zeros(batch, 3, size, size)
    if cfg.task is not None and cfg.task.name == "refcoco":
        out["boxes"] = torch.zeros(batch, REFCOCO_BOXES, 4)
        out["box_mask"] = torch.ones(batch, REFCOCO_BOXES, dtype=torch.bool)
    return out


def _task_logits(model: Any, cfg: RunConfig, batch: int, text_len: int) -> Any:
    """The task forward of a batch of fake inputs, through the trainer's own :func:`engine.train.task_logits`."""
    from engine.train import task_logits

    return task_logits(model, _inputs(cfg, batch, text_len))


def _training_forward(model: Any, cfg: RunConfig, batch: int, text_len: int, masked_per_text: float) -> Any:
    """One training step's forward (``engine.train._pretrain_step`` or ``_finetune_step``) and a loss
    that reads every output it computes (the losses' own arithmetic is not a matmul: flop_counter counts
    none of it, except ITC's similarity matrix, which the ITC head computes)."""
    import torch

    obj = cfg.objectives
    if obj is None:
        return _task_logits(model, cfg, batch, text_len).float().sum()
    b = _inputs(cfg, batch, text_len)
    ids, mask, pix = b["input_ids"], b["attention_mask"], b["pixel_values"]
    if obj.itm is not None and obj.itm.negatives == "hard":
        with torch.no_grad():
            model(ids, mask, pix, towers_only=True)
    blocks = int(obj.mlm is not None) + int(obj.itm is not None or obj.itc is not None)
    positions = None
    if obj.mlm is not None:  # MLM rows come first; (row, column) pairs of the predicted tokens
        n = max(1, round(masked_per_text * batch))
        positions = (torch.arange(n) % batch, torch.zeros(n, dtype=torch.long))
    n_mlm = batch if obj.mlm is not None else 0
    out = model(ids.repeat(blocks, 1), mask.repeat(blocks, 1), pix.repeat(blocks, 1, 1, 1),
                mlm_positions=positions, itm_rows=slice(n_mlm, n_mlm + batch) if obj.itm is not None else None,
                itc=obj.itc is not None)
    return sum(logits.float().sum() for logits in out.logits.values())


def _group_flops(model: Any, modules: dict[str, float]) -> dict[str, float]:
    """Forward FLOPs per layer group, from the flop counter's per-module totals (a module's total holds its
    submodules'). A module run by parts (the last layer's rows) has no total of its own: its parts' count."""
    root = type(model).__name__
    names = {id(m): f"{root}.{n}" if n else root for n, m in model.named_modules()}
    out = {}
    for group, members in model.groups().items():
        total = 0.0
        for module in members:
            name = names[id(module)]
            if name in modules:
                total += modules[name]
                continue
            inside = [k for k in modules if k.startswith(name + ".")]
            total += sum(modules[k] for k in inside if not any(k.startswith(o + ".") for o in inside))
        out[group] = total
    return out


def _protocol_stream() -> IO[str]:
    """A private copy of stdout for the answers; fd 1 then points at stderr, so
    whatever a library prints cannot corrupt the protocol."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return out


def model_summary(cfg: RunConfig) -> dict:
    """Parameter report of the preset's model, built on the meta device (no weights
    are allocated or downloaded; pretrained towers need only their config)."""
    from engine.freeze import apply_freeze

    return apply_freeze(_meta_model(cfg)[0], cfg.freeze).to_dict()


def _meta_model(cfg: RunConfig) -> tuple[Any, Any]:
    """(the run's model on the meta device, its tokenizer)."""
    import torch

    from engine.data.pipeline import build_tokenizer, num_answers
    from engine.models import build_model

    tokenizer = build_tokenizer(cfg)
    with torch.device("meta"):
        model = build_model(_as_random(cfg), vocab_size=len(tokenizer), num_answers=num_answers(cfg))
    return model, tokenizer


def _as_random(cfg: RunConfig) -> RunConfig:
    """The same architecture with pretrained towers switched to random init."""
    raw = cfg.to_dict()
    for tower in ("backbone", "text", "vision"):
        section = raw["model"].get(tower)
        if section and section.get("source") == "pretrained":
            section["source"] = "random"
    return config_from_dict(raw)


def main() -> None:
    out = _protocol_stream()
    import torch  # noqa: F401  (the heavy imports happen once, before "ready")

    import engine.models  # noqa: F401

    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        reply = answer_line(line)
        if reply is not None:
            out.write(json.dumps(reply, default=str) + "\n")


if __name__ == "__main__":
    main()
