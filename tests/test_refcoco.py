"""RefCOCO: box scoring head, IoU accuracy, and the arrow data set on Renaissance-layout fixtures."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from engine.config import config_from_dict
from engine.data.arrow import open_split
from engine.data.images import whole_image_transform
from engine.data.refcoco import ArrowRefCOCODataset, normalized_boxes
from engine.data.tokenizer import build_word_tokenizer
from engine.data.transforms import HALF
from engine.errors import RenError
from engine.models.heads import RegionHead, box_weights, patch_grid
from engine.tasks import box_iou, refcoco_score, task_loss, task_score

from .arrow_fixtures import IMAGE_SIZE, WORDS, write_arrow_table, write_refcoco


def test_box_iou_matches_hand_computed_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7; identical; disjoint
    assert torch.allclose(box_iou(a, b), torch.tensor([1 / 7, 1.0, 0.0]))


def test_refcoco_accuracy_counts_a_pick_overlapping_the_referred_box_by_half() -> None:
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.4], [0.5, 0.5, 1.0, 1.0]]] * 3)
    labels = torch.tensor([0, 0, 0])
    logits = torch.tensor([
        [3.0, 1.0, 0.0],  # picks the referred box
        [1.0, 3.0, 0.0],  # picks a box with IoU 0.2 / 0.25 = 0.8 >= 0.5: correct
        [1.0, 0.0, 3.0],  # picks a disjoint box
    ])
    assert refcoco_score(logits, labels, boxes).tolist() == [1.0, 1.0, 0.0]
    assert task_score("refcoco", logits, labels, boxes).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="boxes"):
        task_score("refcoco", logits, labels)


def test_padding_boxes_never_win_and_do_not_change_the_loss() -> None:
    logits = torch.tensor([[0.5, 2.0, float("-inf")]])
    loss = task_loss("refcoco", logits, torch.tensor([1]))
    assert torch.isclose(loss, task_loss("refcoco", logits[:, :2], torch.tensor([1])))
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    assert refcoco_score(logits, torch.tensor([1]), boxes).item() == 1.0


def test_box_weights_are_the_covered_fraction_of_each_cell() -> None:
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0],     # left half of a 2x2 grid
                           [0.0, 0.0, 0.25, 0.25],   # a quarter of the top-left cell
                           [0.6, 0.6, 0.6, 0.6]]])   # a point: a sliver of its cell only
    w = box_weights(boxes, 2)
    assert torch.allclose(w[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(w[0, 1], torch.tensor([[0.25, 0.0], [0.0, 0.0]]))
    assert w[0, 2, 1, 1] > 0 and w[0, 2].sum() == w[0, 2, 1, 1]


def test_patch_grid_drops_leading_tokens() -> None:
    tokens = torch.arange(2 * 18 * 1, dtype=torch.float32).reshape(2, 18, 1)  # CLS + distillation + 4x4 patches
    grid = patch_grid(tokens)
    assert grid.shape == (2, 4, 4, 1) and grid[0, 0, 0, 0] == 2.0 and grid[1, 3, 3, 0] == 35.0
    with pytest.raises(ValueError, match="square patch grid"):
        patch_grid(torch.zeros(1, 80, 1))


def test_region_head_pools_the_patches_inside_each_box() -> None:
    torch.manual_seed(0)
    head = RegionHead(token_dim=4, pooled_dim=3, hidden_mult=1.0)
    tokens = torch.randn(1, 1 + 4, 4)  # CLS + 2x2 patches
    pooled = torch.randn(1, 3)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    logits = head(tokens, pooled, boxes, mask)
    assert logits.shape == (1, 3) and logits[0, 2] == float("-inf")
    # the first box covers exactly patch (0, 0), the second the right column: patches (0, 1) and (1, 1)
    geometry = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.25], [0.5, 0.0, 1.0, 1.0, 0.5]])
    feats = torch.stack([tokens[0, 1], (tokens[0, 2] + tokens[0, 4]) / 2]) + head.geometry(geometry)
    expected = head.score(torch.cat([feats, pooled.expand(2, -1)], dim=1)).squeeze(-1)
    assert torch.allclose(logits[0, :2], expected, atol=1e-6)
    # changing a patch outside the first box leaves its score alone
    tokens[0, 4] += 10
    assert torch.isclose(head(tokens, pooled, boxes, mask)[0, 0], logits[0, 0])


def test_normalized_boxes_are_corner_fractions() -> None:
    boxes = normalized_boxes([[2.0, 4.0, 6.0, 8.0], [20.0, 0.0, 10.0, 16.0]], width=24, height=16)
    assert torch.allclose(boxes, torch.tensor([[2 / 24, 4 / 16, 8 / 24, 12 / 16], [20 / 24, 0.0, 1.0, 1.0]]))


def _tokenizer():
    return build_word_tokenizer([" ".join(WORDS)])


def test_dataset_yields_whole_images_padded_boxes_and_labels(tmp_path: Path) -> None:
    written = write_refcoco(tmp_path, "val", n=3)
    dataset = ArrowRefCOCODataset(open_split(tmp_path, "refcoco", "val"), _tokenizer(), 16,
                                  whole_image_transform(8), HALF)
    assert len(dataset) == 6  # two expressions per referred object
    batch = dataset.__getitems__([0, 1, 4])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    rows = [written.rows[0], written.rows[0], written.rows[2]]
    most = max(len(r["bboxes"]) for r in rows)
    assert batch["boxes"].shape == (3, most, 4)
    assert batch["labels"].tolist() == [r["labels"] for r in rows]
    for i, row in enumerate(rows):
        k = len(row["bboxes"])
        assert batch["box_mask"][i].tolist() == [True] * k + [False] * (most - k)
        assert torch.allclose(batch["boxes"][i, :k], normalized_boxes(row["bboxes"], *IMAGE_SIZE))
    tokens = _tokenizer()(rows[2]["sentences"][0])["input_ids"]
    assert batch["input_ids"][2, :len(tokens)].tolist() == tokens


def test_every_refcoco_variant_is_read_by_its_own_file_names(tmp_path: Path) -> None:
    write_refcoco(tmp_path, "testB", n=2, name="refcoco+")
    write_refcoco(tmp_path, "test", n=3, name="refcocog")
    assert len(open_split(tmp_path, "refcoco+", "testB")) == 2
    assert len(open_split(tmp_path, "refcocog", "test")) == 3
    with pytest.raises(RenError, match="refcoco_unc_testB.arrow"):
        open_split(tmp_path, "refcoco", "testB")


def test_a_corrupt_image_drops_its_expressions_and_is_counted(tmp_path: Path) -> None:
    write_refcoco(tmp_path, "train", n=3, corrupt=[1])
    dataset = ArrowRefCOCODataset(open_split(tmp_path, "refcoco", "train"), _tokenizer(), 16,
                                  whole_image_transform(8), HALF)
    batch = dataset.__getitems__(list(range(6)))
    assert len(batch["labels"]) == 4 and dataset.source.skipped_images == 1


def _with_column(path: Path, column: str, values: list) -> pa.Table:
    table = pa.ipc.open_file(pa.OSFile(str(path))).read_all()  # read, not mapped: the file is rewritten
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type))


@pytest.mark.parametrize(("column", "values", "message"), [
    ("labels", [0, 5, 1], r"row 1: labels = 5 but the row has 3 candidate boxes"),
    ("bboxes", [[[0, 0, 4, 4]], [[0, 0, 4]], [[1, 1, 2, 2]]], r"row 1: a box has 3 numbers"),
    ("bboxes", [[[0, 0, 4, 4]], [[0, 0, 4, 4]], [[1, 1, 0, 2]]], r"row 2: box \[1.0, 1.0, 0.0, 2.0\]"),
])
def test_bad_labels_and_boxes_name_the_file_and_row(tmp_path: Path, column: str, values: list,
                                                    message: str) -> None:
    path = write_refcoco(tmp_path, "train", n=3).path
    if column == "bboxes":
        write_arrow_table(path, _with_column(path, "labels", [0, 0, 0]))
    write_arrow_table(path, _with_column(path, column, values))
    with pytest.raises(RenError, match=message) as error:
        ArrowRefCOCODataset(open_split(tmp_path, "refcoco", "train"), _tokenizer(), 16, whole_image_transform(8), HALF)
    assert str(path) in str(error.value)


def test_randaugment_is_refused_for_refcoco() -> None:
    with pytest.raises(Exception, match="augment = 'randaugment'.*move"):
        config_from_dict({"task": {"name": "refcoco"}, "data": {"dataset": "refcoco", "root": "/d",
                                                                 "augment": "randaugment"}}, source="test")
