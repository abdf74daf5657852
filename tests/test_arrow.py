"""Reading ViLT/METER/Renaissance arrow files (engine.data.arrow) from fixtures in their exact layouts."""

from __future__ import annotations

import pickle
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from engine.data.arrow import ARROW_KINDS, find_arrow_files, open_arrow
from engine.errors import RenError
from tests.arrow_fixtures import (
    WRITERS,
    image_bytes,
    write_arrow_table,
    write_cc,
    write_coco_caption,
    write_nlvr2,
    write_sbu,
    write_snli_ve,
    write_vqav2,
)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _read_table(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


@pytest.mark.parametrize("kind", list(ARROW_KINDS))
def test_each_kind_round_trips(tmp_path: Path, kind: str) -> None:
    written = WRITERS[kind](tmp_path, "train", 5)
    assert find_arrow_files(tmp_path, kind, "train") == [written.path]
    source = open_arrow([written.path], kind)
    layout = ARROW_KINDS[kind]
    assert len(source) == 5
    columns = list(written.rows[0])
    for i, expected in enumerate(written.rows):
        assert source.row(i, columns) == expected
        for column in layout.image_columns:
            image = source.image(i, column)
            assert image.mode == "RGB" and image.size == (24, 16)
            assert np.array_equal(_pixels(image), _decoded(expected[column]))
    assert source.skipped_images == 0
    assert isinstance(source.row(0, [layout.text_column])[layout.text_column], list)


def test_row_returns_only_the_requested_columns(tmp_path: Path) -> None:
    written = write_vqav2(tmp_path, "train", 3)
    source = open_arrow([written.path], "vqav2")
    assert source.row(2, ["question_id", "image_id"]) == {"question_id": written.rows[2]["question_id"],
                                                         "image_id": 2}


def test_png_images_decode_to_the_pixels_drawn(tmp_path: Path) -> None:
    written = write_nlvr2(tmp_path, "dev", 2)
    source = open_arrow([written.path], "nlvr2")
    for i in range(2):
        for column in ("image_0", "image_1"):
            with Image.open(BytesIO(written.rows[i][column])) as original:
                assert original.format == "PNG"
                assert np.array_equal(_pixels(source.image(i, column)), np.asarray(original.convert("RGB")))
    assert not np.array_equal(_pixels(source.image(0, "image_0")), _pixels(source.image(0, "image_1")))


def test_vqav2_test_split_with_empty_answers_opens(tmp_path: Path) -> None:
    written = write_vqav2(tmp_path, "test", 2)
    assert _read_table(written.path).schema.field("answers").type == pa.list_(pa.null())
    source = open_arrow(find_arrow_files(tmp_path, "vqav2", "test"), "vqav2")
    assert source.row(1, ["answers", "answer_labels", "answer_scores", "question_id"]) == {
        "answers": [], "answer_labels": [], "answer_scores": [], "question_id": [1000, 1001, 1002]}


def test_file_written_with_pandas_3_inferred_types_opens(tmp_path: Path) -> None:
    rows = [[image_bytes(i), [f"caption {i}"], f"{i}.jpg", "train"] for i in range(3)]
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=["image", "caption", "image_id", "split"]))
    assert table.schema.field("image_id").type == pa.large_string()
    path = write_arrow_table(tmp_path / "coco_caption_karpathy_train.arrow", table)
    source = open_arrow([path], "coco_caption")
    assert source.row(2, ["caption", "image_id", "split"]) == {"caption": ["caption 2"], "image_id": "2.jpg",
                                                               "split": "train"}


def test_missing_column_names_file_column_type_and_columns_there(tmp_path: Path) -> None:
    written = write_coco_caption(tmp_path, "train", 2)
    bad = write_arrow_table(tmp_path / "bad" / written.path.name, _read_table(written.path).drop_columns(["caption"]))
    with pytest.raises(RenError) as error:
        open_arrow([bad], "coco_caption")
    message = str(error.value)
    assert str(bad) in message
    assert "no column 'caption' (expected list<string>)" in message
    assert "image (binary), image_id (string), split (string)" in message


def test_wrong_type_names_the_type_found_and_expected(tmp_path: Path) -> None:
    written = write_vqav2(tmp_path, "train", 2)
    table = _read_table(written.path)
    as_strings = pa.array([str(v) for v in table.column("image_id").to_pylist()])
    table = table.set_column(table.schema.get_field_index("image_id"), "image_id", as_strings)
    bad = write_arrow_table(tmp_path / "bad" / written.path.name, table)
    with pytest.raises(RenError, match=r"column 'image_id' has type string, expected int") as error:
        open_arrow([bad], "vqav2")
    assert str(bad) in str(error.value)
    assert "question_id (list<item: int64>)" in str(error.value)


def test_optional_column_is_checked_when_present(tmp_path: Path) -> None:
    written = write_coco_caption(tmp_path, "val", 2)
    table = _read_table(written.path)
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array([1, 2]))
    bad = write_arrow_table(tmp_path / "bad" / written.path.name, table)
    with pytest.raises(RenError, match="column 'split' has type int64, expected string"):
        open_arrow([bad], "coco_caption")
    without = write_arrow_table(tmp_path / "meter" / written.path.name, _read_table(written.path).drop_columns(
        ["split"]))
    assert len(open_arrow([without], "coco_caption")) == 2


def test_files_of_another_kind_are_refused(tmp_path: Path) -> None:
    written = write_nlvr2(tmp_path, "train", 2)
    with pytest.raises(RenError, match="not a vqav2 arrow file") as error:
        open_arrow([written.path], "vqav2")
    assert "no column 'image'" in str(error.value) and "no column 'question_id'" in str(error.value)


def test_not_an_arrow_file_and_stream_format_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "coco_caption_karpathy_train.arrow"
    text.write_text("not arrow at all\n")
    with pytest.raises(RenError, match="is not an Arrow IPC file"):
        open_arrow([text], "coco_caption")
    table = _read_table(write_coco_caption(tmp_path / "ok", "train", 2).path)
    stream = tmp_path / "stream.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(RenError, match="stream files"):
        open_arrow([stream], "coco_caption")
    with pytest.raises(RenError, match="does not exist"):
        open_arrow([tmp_path / "missing.arrow"], "coco_caption")
    empty = tmp_path / "empty.arrow"
    empty.touch()
    with pytest.raises(RenError, match="empty.arrow is empty"):
        open_arrow([empty], "coco_caption")
    with pytest.raises(RenError, match="No arrow files were given"):
        open_arrow([], "coco_caption")
    with pytest.raises(RenError, match="Unknown arrow data kind 'coco'.*coco_caption"):
        open_arrow([text], "coco")


def test_corrupt_images_are_none_and_counted(tmp_path: Path) -> None:
    written = write_coco_caption(tmp_path, "train", 5, corrupt=(1, 4, 3))
    source = open_arrow([written.path], "coco_caption")
    images = [source.image(i) for i in range(5)]
    assert [image is None for image in images] == [False, True, False, True, True]
    assert source.skipped_images == 3
    assert source.row(3, ["image_id"]) == {"image_id": "COCO_train2014_000000000003.jpg"}
    assert np.array_equal(_pixels(images[2]), _decoded(written.rows[2]["image"]))


def test_several_files_concatenate_in_order(tmp_path: Path) -> None:
    train = write_coco_caption(tmp_path, "train", 3)
    restval = write_coco_caption(tmp_path, "restval", 4, start=100, rows_per_batch=1)
    paths = find_arrow_files(tmp_path, "coco_caption", ARROW_KINDS["coco_caption"].vilt_splits["train"])
    assert paths == [train.path, restval.path]
    source = open_arrow(paths, "coco_caption")
    assert len(source) == 7
    expected = train.rows + restval.rows
    assert [source.row(i, ["image_id"])["image_id"] for i in range(7)] == [r["image_id"] for r in expected]
    assert [source.locate(i) for i in (0, 2, 3, 6)] == [(train.path, 0), (train.path, 2), (restval.path, 0),
                                                        (restval.path, 3)]
    assert np.array_equal(_pixels(source.image(5)), _decoded(restval.rows[2]["image"]))
    with pytest.raises(IndexError):
        source.row(7, ["image_id"])
    with pytest.raises(IndexError):
        source.row(-1, ["image_id"])


def test_unknown_column_and_non_image_column_are_errors(tmp_path: Path) -> None:
    written = write_coco_caption(tmp_path, "test", 2)
    source = open_arrow([written.path], "coco_caption")
    with pytest.raises(RenError, match=r"has no column 'questions'; its columns are: caption, image, image_id"):
        source.row(0, ["questions"])
    with pytest.raises(RenError, match="'caption' is not an image column of coco_caption"):
        source.image(0, "caption")


def test_sequential_mode_reads_the_same_rows(tmp_path: Path) -> None:
    written = write_snli_ve(tmp_path, "dev", 6, rows_per_batch=4)
    random_order = open_arrow([written.path], "snli_ve")
    in_order = open_arrow([written.path], "snli_ve", random_access=False)
    for i in range(6):
        assert in_order.row(i, ["sentences", "labels"]) == random_order.row(i, ["sentences", "labels"])
        assert np.array_equal(_pixels(in_order.image(i)), _pixels(random_order.image(i)))


def test_source_pickles_as_paths_and_reopens(tmp_path: Path) -> None:
    written = write_coco_caption(tmp_path, "train", 50, distinct_images=50)
    source = open_arrow([written.path], "coco_caption", random_access=False)
    source.image(0)
    data = pickle.dumps(source)
    assert len(data) < 2000 < written.path.stat().st_size
    copy = pickle.loads(data)
    assert len(copy) == 50 and copy.random_access is False and copy.skipped_images == 0
    assert copy.row(49, ["caption", "image_id"]) == source.row(49, ["caption", "image_id"])
    assert np.array_equal(_pixels(copy.image(7)), _pixels(source.image(7)))


def test_find_arrow_files_orders_shards_by_number(tmp_path: Path) -> None:
    shards = {shard: write_cc(tmp_path, "train", 2, shard=shard) for shard in (10, 2, 0, 1)}
    write_cc(tmp_path, "val", 2, shard=0)
    expected = [shards[s].path for s in (0, 1, 2, 10)]
    assert find_arrow_files(tmp_path, "cc", "train") == expected
    assert find_arrow_files(tmp_path, "cc", "train+val")[-1].name == "conceptual_caption_val_0.arrow"
    write_sbu(tmp_path, shard=0)
    write_sbu(tmp_path, shard=11)
    assert [p.name for p in find_arrow_files(tmp_path, "sbu", "train")] == ["sbu_0.arrow", "sbu_11.arrow"]
    assert len(open_arrow(expected, "cc")) == 8


def test_find_arrow_files_without_match_lists_the_directory(tmp_path: Path) -> None:
    write_vqav2(tmp_path, "train", 1)
    write_vqav2(tmp_path, "val", 1)
    (tmp_path / "README.txt").write_text("x")
    with pytest.raises(RenError) as error:
        find_arrow_files(tmp_path, "vqav2", "train+trainable_val")
    message = str(error.value)
    assert "split 'trainable_val'" in message and "expected vqav2_trainable_val.arrow" in message
    assert "these .arrow files: vqav2_train.arrow, vqav2_val.arrow" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RenError, match="holds nothing"):
        find_arrow_files(empty, "vg", "train")
    (empty / "notes.txt").write_text("x")
    with pytest.raises(RenError, match=r"expected vg.arrow .*no .arrow files, only 1 other entries: notes.txt"):
        find_arrow_files(empty, "vg", "train")
    with pytest.raises(RenError, match="does not exist"):
        find_arrow_files(tmp_path / "nowhere", "vg", "train")
    with pytest.raises(RenError, match=r"Unknown split 'validation' for nlvr2.*dev, test1"):
        find_arrow_files(tmp_path, "nlvr2", "validation")


def test_open_is_memory_mapped(tmp_path: Path) -> None:
    written = write_coco_caption(tmp_path, "train", 10_000, distinct_images=32)
    size = written.path.stat().st_size
    assert size > 5_000_000
    before = pa.total_allocated_bytes()
    source = open_arrow([written.path], "coco_caption")
    assert pa.total_allocated_bytes() - before < size // 100
    for i in range(0, 10_000, 997):
        assert source.image(i) is not None
        assert source.row(i, ["caption", "image_id"])["image_id"] == written.rows[i]["image_id"]
    assert pa.total_allocated_bytes() - before < size // 100


def test_numbers_reads_values_with_nulls_filled_across_chunks_and_slices() -> None:
    from engine.data.arrow import numbers

    ints = pa.chunked_array([pa.array([1, None, 3], pa.int32()), pa.array([4, 5, 6], pa.int64()).slice(1)
                             .cast(pa.int32())])
    assert numbers(ints, -1).tolist() == [1, -1, 3, 5, 6]
    assert numbers(pa.array([0.5, None]), 9.0).tolist() == [0.5, 9.0]
    assert numbers(pa.array([True, None, False, True]).slice(1)).tolist() == [0, 0, 1]
    assert numbers(pa.array([None, None]), 7).tolist() == [7, 7]
    assert len(numbers(pa.chunked_array([], pa.int64()))) == 0
