"""``python -m engine.inspector``: the model inspector, a long-lived helper process.

It imports torch once, then answers each JSON line on stdin with one JSON line on stdout, so a torch-free
client (the TUI) can show parameter counts and compute estimates while a config is being edited.

- on start, once the heavy imports are done: ``{"ready": true}``
- request: ``{"id": n, "config": {...}}`` (a raw config dict, as a preset holds it)
- answer: ``{"id": n, "ok": true, "config": resolved, "params": summary, "frozen_groups": [...],
  "flops_per_sample": {...}}`` (``params`` as :func:`model_summary` reports it, ``frozen_groups`` the group
  names ``[freeze]`` selects, ``flops_per_sample`` as :func:`flops_per_sample` estimates it), or
  ``{"id": n, "ok": false, "error": message, "key": "dotted.key" or null}``

Bad input never stops the helper: a line that is not a JSON request gets an error answer (``id`` null
when it has none). It exits at the end of stdin.
"""

from __future__ import annotations

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
        return {"id": rid, "ok": True, "config": cfg.to_dict(), "params": params,
                "frozen_groups": frozen_groups(cfg, list(params["groups"])),
                "flops_per_sample": flops_per_sample(cfg, params)}
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


def image_tokens(cfg: RunConfig) -> int:
    """Tokens of one image: ``(image_size // patch_size)^2 + 1`` (patches and a summary token).

    The patch size is the config's for manual towers, fresh image embeddings and
    timm models (a rough stand-in for CNNs), else the checkpoint config's."""
    model = cfg.model
    tower = model.backbone if model.kind == "one_tower" else model.vision
    patch = tower.patch_size
    if tower.source != "manual" and getattr(tower, "library", "hf") == "hf":
        from engine import backbones

        key = "model.backbone.name" if model.kind == "one_tower" else "model.vision.name"
        config = backbones.load_hf_config(tower.name, key)
        if model.kind != "one_tower" or backbones.modality_of(config) == "vision":
            patch = int(getattr(backbones.vision_config_of(config), "patch_size", patch))
    return (tower.image_size // patch) ** 2 + 1


def flops_per_sample(cfg: RunConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Estimated compute of one sample, in FLOPs (a multiply-add counts 2). An estimate.

    ``forward = sum over groups g of 2 * P_g * T_g * passes_g`` where ``P_g`` is
    the group's parameter count and ``T_g`` the tokens its weights are applied to:

    - text tower groups: ``T_text = data.max_text_len`` (an upper bound: padding is
      to the longest text of a batch);
    - vision tower groups: ``T_image`` from :func:`image_tokens`;
    - one-tower backbone layers: ``T_text + T_image``; fusion groups:
      ``(T_text + T_image) / 2`` (each fusion layer holds one block per stream);
    - embedding tables are look-ups (0): text embeddings, the one tower's text and
      modality embeddings; patch embeddings are a matmul per patch (``T_image``);
    - pooler and heads: 1 token, except ``heads.mlm``: ``mask_prob * T_text``
      (logits are computed at the masked positions only).

    ``passes_g`` is 1 for heads and when finetuning; when pretraining, the encoder
    runs once per row block of a step (MLM rows, then ITM or ITC rows: see
    ``engine.train._pretrain_step``). ``train = 3 * forward``: the backward pass
    costs about twice the forward (input gradients plus weight gradients).
    Attention score products (about ``T^2 * width`` per layer), norms and
    activations are left out.

    Returns ``{"forward", "train", "passes", "tokens": {"text", "image"},
    "groups": {name: forward FLOPs}}`` (ints; the groups sum to ``forward``).
    """
    t_text = cfg.data.max_text_len
    t_image = image_tokens(cfg)
    obj = cfg.objectives
    passes = 1 if obj is None else int(obj.mlm is not None) + int(obj.itm is not None or obj.itc is not None)
    mask_prob = obj.mlm.mask_prob if obj is not None and obj.mlm is not None else 0.0
    groups = {}
    for name, group in params["groups"].items():
        tokens, runs = _tokens(name, t_text, t_image, mask_prob), passes
        if name.startswith("heads."):
            runs = 1
        groups[name] = round(2 * group["total"] * tokens * runs)
    forward = sum(groups.values())
    return {"forward": forward, "train": 3 * forward, "passes": passes,
            "tokens": {"text": t_text, "image": t_image}, "groups": groups}


def _tokens(name: str, t_text: int, t_image: int, mask_prob: float) -> float:
    top, _, part = name.partition(".")
    if part in ("text_embeddings", "modality_type") or (top == "text" and part == "embeddings"):
        return 0
    if part in ("image_embeddings", "embeddings"):
        return t_image
    if name == "heads.mlm":
        return mask_prob * t_text
    return {"text": t_text, "vision": t_image, "backbone": t_text + t_image,
            "fusion": (t_text + t_image) / 2}.get(top, 1)


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
    import torch

    from engine.data.pipeline import build_tokenizer, num_answers
    from engine.freeze import apply_freeze
    from engine.models import build_model

    tokenizer = build_tokenizer(cfg)
    with torch.device("meta"):
        model = build_model(_as_random(cfg), vocab_size=len(tokenizer), num_answers=num_answers(cfg))
    return apply_freeze(model, cfg.freeze).to_dict()


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
