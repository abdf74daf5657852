"""Architectures, heads and the model builder.

``build_model`` maps the preset's architecture kind to its module (a small
registry, like timm's) and attaches the heads the run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import config as C
from engine.errors import ConfigError, RenError
from engine.models.dual_encoder import DualEncoder
from engine.models.features import Features
from engine.models.heads import ClassifierHead, ITCEmbeddings, ITCHead, ITMHead, MLMHead, RegionHead
from engine.models.one_tower import OneTower
from engine.models.towers import Groups
from engine.models.two_tower import TwoTower
from engine.tasks import num_classes

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "one_tower": OneTower,
    "two_tower": TwoTower,
    "dual_encoder": DualEncoder,
}


@dataclass
class Outputs:
    """``logits["itc"]`` is this process's (texts x images) similarity matrix; the ITC loss
    compares ``itc``, the embeddings, after gathering them over processes."""

    features: Features
    logits: dict[str, Tensor] = field(default_factory=dict)
    itc: ITCEmbeddings | None = None


class VLModel(nn.Module):
    """An encoder plus its heads. Everything runs inside ``forward`` so that
    distributed wrappers (DDP, FSDP) see every parameter use."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.frozen_modules: list[nn.Module] = []

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        *,
        mlm_positions: Tensor | None = None,
        itm_rows: slice | None = None,
        itc: bool = False,
        task: bool = False,
        pair_pixel_values: Tensor | None = None,
        boxes: Tensor | None = None,
        box_mask: Tensor | None = None,
        towers_only: bool = False,
    ) -> Outputs:
        """``pair_pixel_values`` (NLVR2): a second image per text; both images are encoded
        with the text in one batch, the second with its own image type row (as in ViLT and METER),
        and the task head sees the two pooled features side by side.
        ``boxes``/``box_mask`` (RefCOCO): candidate boxes ``(B, K, 4)`` (``x0, y0, x1, y1`` in
        ``[0, 1]``) and which are real; the task logits are then one per box. ``towers_only``:
        only the ITC embeddings from the separate towers, no fusion (to sample hard ITM
        negatives; it goes through ``forward`` so that DDP/FSDP wrappers and autocast apply)."""
        if towers_only:
            head = self._itc_head("towers_only")
            return Outputs(features=Features(), itc=head(self.text_tokens(input_ids, attention_mask)[:, 0],
                                                         self.image_tokens(pixel_values)[:, 0]))
        pair: dict[str, Tensor] = {}
        if pair_pixel_values is not None:
            input_ids, attention_mask = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
            pixel_values = torch.cat([pixel_values, pair_pixel_values])
            first_or_second = torch.arange(1, 3, device=pixel_values.device)  # image type rows 1 and 2
            pair["image_types"] = first_or_second.repeat_interleave(len(pair_pixel_values))
        # the fused tokens the heads read; the encoder's last layer computes only those rows and the pooler's
        tokens = ("text",) * (mlm_positions is not None) + ("image",) * (task and boxes is not None)
        feats = self.encoder(input_ids, attention_mask, pixel_values, tokens=tokens, **pair)
        out = Outputs(features=feats)
        if mlm_positions is not None:
            out.logits["mlm"] = self.heads["mlm"](feats.text[mlm_positions])
        if itm_rows is not None:
            out.logits["itm"] = self.heads["itm"](feats.pooled[itm_rows])
        if itc:
            out.itc = self.heads["itc"](feats.text_cls, feats.image_cls)
            out.logits["itc"] = out.itc.logits()
        if task and boxes is not None:
            out.logits["task"] = self.heads["task"](feats.image, feats.pooled, boxes, box_mask)
        elif task:
            pooled = feats.pooled
            if pair_pixel_values is not None:
                first, second = pooled.chunk(2)
                pooled = torch.cat([first, second], dim=1)
            out.logits["task"] = self.heads["task"](pooled)
        return out

    # --- retrieval: unimodal embeddings (first stage) and ITM scores (rerank) ---

    def _towers(self, what: str) -> TwoTower | DualEncoder:
        if not isinstance(self.encoder, (TwoTower, DualEncoder)):
            raise RenError(f"{what}: a {_kind(self.encoder)} model encodes text and image together, so it has no "
                           "separate text and image embeddings for a retrieval first stage; use a two_tower model "
                           "pretrained with [objectives.itc], or a dual_encoder.")
        return self.encoder

    def _itc_head(self, what: str) -> ITCHead:
        self._towers(what)
        if "itc" not in self.heads:
            raise RenError(f"{what}: this {_kind(self.encoder)} model has no ITC head (its run did not train "
                           "[objectives.itc]), so there are no projected text and image embeddings for a first "
                           "stage. Pretrain (or finetune on captions) with [objectives.itc] to get a first stage, "
                           "or evaluate a run that did.")
        return self.heads["itc"]

    def _itm_head(self, what: str) -> ITMHead:
        if "itm" not in self.heads:
            why = ("a dual_encoder has no fusion layers" if isinstance(self.encoder, DualEncoder)
                   else "its run did not train [objectives.itm]")
            raise RenError(f"{what}: this {_kind(self.encoder)} model has no ITM head ({why}), so it cannot score "
                           "image-text pairs; rank by the ITC embeddings alone, or train with [objectives.itm].")
        return self.heads["itm"]

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text tower's output tokens ``(B, L, D_t)``, before fusion (two_tower, dual_encoder)."""
        return self._towers("text_tokens").text(input_ids, attention_mask)

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """The vision tower's output tokens ``(B, N, D_v)``, before fusion (two_tower, dual_encoder)."""
        return self._towers("image_tokens").vision(pixel_values)

    def project_texts(self, text_tokens: Tensor) -> Tensor:
        """ITC embeddings ``(B, D)`` of text-tower outputs: the first token through the ITC
        head's projection, L2-normalised (what ``forward(..., itc=True)`` compares)."""
        return F.normalize(self._itc_head("project_texts").text_proj(text_tokens[:, 0]), dim=-1)

    def project_images(self, image_tokens: Tensor) -> Tensor:
        """ITC embeddings ``(B, D)`` of vision-tower outputs (see :meth:`project_texts`)."""
        return F.normalize(self._itc_head("project_images").image_proj(image_tokens[:, 0]), dim=-1)

    def embed_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised ITC text embeddings ``(B, D)``; a :class:`RenError` for a model without an ITC head."""
        self._itc_head("embed_texts")
        return self.project_texts(self.text_tokens(input_ids, attention_mask))

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised ITC image embeddings ``(B, D)``; a :class:`RenError` for a model without an ITC head."""
        self._itc_head("embed_images")
        return self.project_images(self.image_tokens(pixel_values))

    def itm_scores(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        """ITM match scores ``(B,)`` of aligned text/image rows (full forward: both towers and
        fusion per row). The score is the match logit minus the no-match logit, i.e. the log-odds
        ``log p(match) - log p(no match)``: ranks as ``p(match)`` does, without saturating."""
        head = self._itm_head("itm_scores")
        return _match_log_odds(head(self.encoder(input_ids, attention_mask, pixel_values, tokens=()).pooled))

    def fused_itm_scores(self, text_tokens: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """:meth:`itm_scores` from tower outputs (:meth:`text_tokens`, :meth:`image_tokens`), running
        only the fusion layers (two_tower): a reranker encodes each text and image once."""
        head = self._itm_head("fused_itm_scores")
        if not isinstance(self.encoder, TwoTower):
            raise RenError(f"fused_itm_scores: a {_kind(self.encoder)} model has no fusion of separate tower "
                           "outputs; use itm_scores.")
        return _match_log_odds(head(self.encoder.fuse(text_tokens, attention_mask, image_tokens, tokens=()).pooled))

    def groups(self) -> Groups:
        groups = dict(self.encoder.groups())
        for name, head in self.heads.items():
            groups[f"heads.{name}"] = [head]
        return groups

    def train(self, mode: bool = True) -> "VLModel":
        """Frozen groups stay in eval mode (no dropout, frozen norm statistics)."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self


def _kind(encoder: nn.Module) -> str:
    return next((kind for kind, cls in ARCHITECTURES.items() if isinstance(encoder, cls)), type(encoder).__name__)


def _match_log_odds(logits: Tensor) -> Tensor:
    """ITM logits ``(B, 2)`` (class 1 = match, as the ITM loss trains them) -> ``(B,)`` log-odds."""
    return logits[:, 1] - logits[:, 0]


def build_model(cfg: C.RunConfig, *, vocab_size: int, num_answers: int | None = None) -> VLModel:
    """The encoder for ``cfg.model`` with the heads for its objectives or task."""
    pair = {"pair_images": True} if cfg.task is not None and cfg.task.name == "nlvr2" else {}
    encoder = ARCHITECTURES[cfg.model.kind](cfg.model, vocab_size, **pair)
    if isinstance(encoder, OneTower) and encoder.text_embeddings is not None:  # also a backbone found to be vision
        too_long = C.text_positions_error(cfg.data.max_text_len, "model.backbone.max_text_positions",
                                          cfg.model.backbone.max_text_positions)
        if too_long:
            raise ConfigError(f"{too_long}.", key="data.max_text_len")
    heads: dict[str, nn.Module] = {}
    if cfg.objectives is not None:
        obj = cfg.objectives
        if obj.mlm:
            heads["mlm"] = MLMHead(encoder.text_dim, encoder.vocab_size)
        if obj.itm:
            heads["itm"] = ITMHead(encoder.pooled_dim)
        if obj.itc:
            dim = cfg.model.projection_dim if cfg.model.kind == "dual_encoder" else encoder.hidden_size
            heads["itc"] = ITCHead(*encoder.unimodal_dims, dim, obj.itc.temperature, obj.itc.learn_temperature)
    if cfg.task is not None and cfg.task.name == "refcoco":
        heads["task"] = RegionHead(encoder.hidden_size, encoder.pooled_dim, cfg.task.head_hidden_mult)
    elif cfg.task is not None:
        in_dim = encoder.pooled_dim * (2 if cfg.task.name == "nlvr2" else 1)
        classes = num_classes(cfg.task.name, num_answers)
        heads["task"] = ClassifierHead(in_dim, classes, cfg.task.head_hidden_mult)
    return VLModel(encoder, heads)


__all__ = ["ARCHITECTURES", "ITCEmbeddings", "Outputs", "VLModel", "build_model"]
