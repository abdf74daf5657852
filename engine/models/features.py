"""What an encoder returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Features:
    """Encoder outputs.

    ``text``/``image``: fused token features (None for a dual encoder, and when the caller did not ask
    for them: the last layer then computes only the rows it needs, see ``engine.models.rows``);
    ``pooled``: the joint representation fed to ITM and task heads;
    ``text_cls``/``image_cls``: unimodal summaries before fusion, for ITC.
    """

    text: Tensor | None = None
    image: Tensor | None = None
    text_mask: Tensor | None = None
    pooled: Tensor | None = None
    text_cls: Tensor | None = None
    image_cls: Tensor | None = None
