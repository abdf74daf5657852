"""RefCOCO, RefCOCO+ and RefCOCOg from Renaissance-format arrow files.

Each row is one referred object with every box of its image (Renaissance's ``write_refcoco``); an item is
one expression, scored over the image's candidate boxes. Images are resized whole, so boxes become exact
fractions of the model's input. Details: docs/tasks-and-data.md, "How each task reads its rows".
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from engine.data.arrow import ArrowSource, list_lengths, numbers
from engine.data.images import ImageTransform
from engine.data.items import ArrowItems
from engine.data.transforms import Normalization

DATASETS = ("refcoco", "refcoco+", "refcocog")


def normalized_boxes(xywh: list[list[float]], width: int, height: int) -> Tensor:
    """COCO ``[x, y, w, h]`` pixel boxes -> ``(K, 4)`` ``x0, y0, x1, y1`` fractions of the image."""
    boxes = torch.as_tensor(xywh, dtype=torch.float32).reshape(-1, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    corners = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    return (corners / scale).clamp(0, 1)


class ArrowRefCOCODataset(ArrowItems):
    """One item per referring expression. Batch keys: ``input_ids``, ``attention_mask``
    (B x L), ``pixel_values`` (B x 3 x S x S, normalised), ``boxes`` (B x K x 4 float32,
    ``x0, y0, x1, y1`` in [0, 1]; K the most candidates in the batch), ``box_mask``
    (B x K bool, False for padding), ``labels`` (B, int64 index of the referred box)."""

    def __init__(self, source: ArrowSource, tokenizer: PreTrainedTokenizerBase, max_text_len: int,
                 transform: ImageTransform, norm: Normalization) -> None:
        super().__init__(source, tokenizer, max_text_len, transform, norm, items_column="sentences",
                         items="referring expressions (every row's sentences list is empty)")
        self._check_rows(self.paths)

    def _check_rows(self, paths: str) -> None:
        """Every label indexes its row's boxes and every box has 4 numbers with positive size."""
        bboxes = self.source.column("bboxes")
        counts = list_lengths(bboxes)
        labels = numbers(self.source.column("labels"), -1).astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= counts))
        if len(bad):
            self.fail(int(bad[0]), f"labels = {int(labels[bad[0]])} but the row has {int(counts[bad[0]])} "
                       f"candidate boxes; the label is the referred object's index in bboxes. Rows with such a "
                       f"label: {len(bad)} of {len(labels)} in {paths}.")
        boxes = pc.list_flatten(bboxes)
        sizes = list_lengths(boxes)
        row_of_box = np.repeat(np.arange(len(counts)), counts)
        wrong = np.flatnonzero(sizes != 4)
        if len(wrong):
            self.fail(int(row_of_box[wrong[0]]), f"a box has {int(sizes[wrong[0]])} numbers; boxes are COCO "
                       f"[x, y, w, h] in pixels. Such boxes: {len(wrong)} in {paths}.")
        values = numbers(pc.list_flatten(boxes), -1).astype(np.float64).reshape(-1, 4)
        flat = np.flatnonzero((values[:, 2] <= 0) | (values[:, 3] <= 0) | (values[:, 0] < 0) | (values[:, 1] < 0))
        if len(flat):
            self.fail(int(row_of_box[flat[0]]), f"box {values[flat[0]].tolist()} is not a COCO [x, y, w, h] box "
                       f"(negative corner, or no width or height). Such boxes: {len(flat)} in {paths}.")

    def _image(self, image: object) -> tuple[Tensor, tuple[int, int]]:
        return self.transform(image), image.size

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        images: dict[tuple[int, str], tuple[Tensor, tuple[int, int]] | None] = {}
        cells: dict[int, dict] = {}
        texts, pixels, boxes, labels, kept = [], [], [], [], []
        for index in indices:
            row, slot = int(self.rows[index]), int(self.slots[index])
            decoded = self.item_image(self.source, row, index, self._image, images)
            if decoded is None:
                continue
            if row not in cells:
                cells[row] = self.source.row(row, ("sentences", "bboxes", "labels"))
            pixel, (width, height) = decoded
            texts.append(cells[row]["sentences"][slot])
            pixels.append(pixel)
            boxes.append(normalized_boxes(cells[row]["bboxes"], width, height))
            labels.append(cells[row]["labels"])
            kept.append(index)
        if not texts:
            raise self.unreadable(indices, "referring expressions")
        most = max(len(b) for b in boxes)
        padded = torch.zeros(len(boxes), most, 4)
        mask = torch.zeros(len(boxes), most, dtype=torch.bool)
        for i, b in enumerate(boxes):
            padded[i, :len(b)] = b
            mask[i, :len(b)] = True
        return {**self.encode(texts), "pixel_values": self.norm.apply(torch.stack(pixels)), "boxes": padded,
                "box_mask": mask, "labels": torch.as_tensor(labels, dtype=torch.int64),
                "items": torch.as_tensor(kept, dtype=torch.int64)}
