"""``ren data prepare`` (engine.data.prepare): original releases in their real layouts -> the engine's arrow files.

Each fixture writes a tiny copy of an original release into ``tmp_path``: the
annotation files with their real names, structure and keys, and image folders
of real JPEG/PNG files made with PIL, one of them missing and one corrupt. The
outputs are read back with :func:`engine.data.arrow.open_arrow`, which checks
the columns the engine expects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from filelock import FileLock

import engine.data.prepare.writer as writer_module
from engine.data.arrow import find_arrow_files, open_arrow, open_split
from engine.data.prepare import (
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    NO_VOCAB_ANSWER,
    UNKNOWN_LABEL,
    UNKNOWN_SPLIT,
    UNREADABLE_IMAGE,
    prepare,
    prepare_vqav2,
)
from engine.data.vqav2 import answer_vocabulary
from engine.errors import RenError
from tests.arrow_fixtures import corrupt_bytes, write_vqav2
from tests.helpers.prepare import arrow_rows, skip_reasons, write_image, write_json


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


# --- VQAv2 ------------------------------------------------------------------------------------------------------

# image id -> [(question id, multiple_choice_answer, the ten answers)]; "yes" is the majority answer of 10
# questions and "2" of 9 (one written "two"), so ViLT's rule (>= 9) keeps ["yes", "2"]: yes = 0, 2 = 1.
_YES, _NO = ["yes"] * 10, ["no"] * 10
_VQA_TRAIN = {
    1: [(101, "yes", _YES), (102, "2", ["2"] * 5 + ["two"] * 2 + ["3"] * 3),
        *[(103 + k, "yes", _YES) for k in range(5)]],
    2: [(201, "blue", ["blue"] * 10), (202, "yes", ["yes"] * 2 + _NO[:8])],
    3: [(301, "yes", _YES)],  # its image file is missing
    4: [(401, "2", ["2"] * 10)],  # its image file is corrupt
    5: [(501, "blue", ["blue"] * 10)],  # no answer in the vocabulary: the image is dropped
}
_VQA_VAL = {
    11: [(1101, "yes", ["yes"] * 3 + ["yeah"] * 7)],
    12: [(1201, "2", ["2"] * 10), (1202, "yes", ["yes"] * 4 + _NO[:6])],
    13: [*[(1301 + k, "2", ["2"] * 10) for k in range(5)], (1306, "two", ["two"] * 10)],
}
_VQA_TEST = {21: [2101, 2102], 22: [2201], 23: [2301]}  # 23's image is missing
_VQA_TEST_DEV = {21: [2101]}
# what the train/val rows hold: image id -> (question ids, labels, scores)
_VQA_EXPECTED = {
    "train": {1: ([101, 102, 103, 104, 105, 106, 107], [[0], [1], [0], [0], [0], [0], [0]],
                  [[1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0]]),
              2: ([202], [[0]], [[0.6]])},
    "val": {11: ([1101], [[0]], [[0.9]]), 12: ([1201, 1202], [[1], [0]], [[1.0], [1.0]]),
            13: ([1301, 1302, 1303, 1304, 1305, 1306], [[1]] * 6, [[1.0]] * 6)},
}


def _question(question_id: int) -> str:
    return f"What is shown in picture {question_id}?"


def _write_vqav2(source: Path) -> dict[int, bytes]:
    """The VQAv2 release layout; returns the bytes of each image file written."""
    images: dict[int, bytes] = {}
    info = {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017}
    for subtype, annotated in (("train2014", _VQA_TRAIN), ("val2014", _VQA_VAL)):
        questions = [{"image_id": image_id, "question": _question(qid), "question_id": qid}
                     for image_id, entries in annotated.items() for qid, _, _ in entries]
        annotations = [{"question_type": "what", "multiple_choice_answer": majority,
                        "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                    for k, answer in enumerate(answers)],
                        "image_id": image_id, "answer_type": "other", "question_id": qid}
                       for image_id, entries in annotated.items() for qid, majority, answers in entries]
        write_json(source / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                   {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                    "data_subtype": subtype, "questions": questions})
        write_json(source / f"v2_mscoco_{subtype}_annotations.json",
                   {"info": info, "license": {}, "data_subtype": subtype, "annotations": annotations})
    for subtype, by_image in (("test2015", _VQA_TEST), ("test-dev2015", _VQA_TEST_DEV)):
        questions = [{"image_id": image_id, "question": _question(qid), "question_id": qid}
                     for image_id, qids in by_image.items() for qid in qids]
        write_json(source / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                   {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                    "data_subtype": subtype, "questions": questions})
    for folder, ids in (("train2014", (1, 2, 4)), ("val2014", (11, 12, 13)), ("test2015", (21, 22))):
        for image_id in ids:
            path = source / folder / f"COCO_{folder}_{image_id:012d}.jpg"
            images[image_id] = write_image(path, image_id, corrupt=image_id == 4)
    write_image(source / "train2014" / "COCO_train2014_000000000099.jpg", 99)  # an image no question is about
    return images


def test_vqav2_writes_vilts_files_with_labels_scores_and_skips(tmp_path: Path) -> None:
    source, out = tmp_path / "vqa", tmp_path / "arrows"
    images = _write_vqav2(source)
    calls: list[tuple[int, int]] = []
    report = prepare("vqav2", source, out, progress=lambda done, total: calls.append((done, total)))

    columns = ["image", "questions", "answers", "answer_labels", "answer_scores", "image_id", "question_id", "split",
               "raw_answers"]
    vocab = ["yes", "2"]
    for split in ("train", "val"):
        rows = arrow_rows(find_arrow_files(out, "vqav2", split)[0], "vqav2", columns)
        expected = _VQA_EXPECTED[split]
        assert [row["image_id"] for row in rows] == list(expected)
        for row in rows:
            qids, labels, scores = expected[row["image_id"]]
            assert row["image"] == images[row["image_id"]]
            assert row["question_id"] == qids
            assert row["questions"] == [_question(qid) for qid in qids]
            assert row["answer_labels"] == labels
            assert row["answer_scores"] == scores
            assert row["answers"] == [[vocab[label] for label in question] for question in labels]
            assert row["split"] == split
            annotated = {qid: answers for entries in (_VQA_TRAIN | _VQA_VAL).values() for qid, _, answers in entries}
            assert row["raw_answers"] == [annotated[qid] for qid in qids]  # for the official VQA accuracy
    for split, by_image in (("test", {21: [2101, 2102], 22: [2201]}), ("test-dev", _VQA_TEST_DEV)):
        rows = arrow_rows(out / f"vqav2_{split}.arrow", "vqav2", columns)
        assert [(row["image_id"], row["question_id"]) for row in rows] == list(by_image.items())
        assert all(row["answers"] == row["answer_labels"] == row["answer_scores"] == row["raw_answers"] == []
                   for row in rows)
        assert all(row["image"] == images[row["image_id"]] and row["split"] == split for row in rows)
    # ViLT's minival: the last 1,000 images of val (here all three), trainable_val the rest (none)
    assert report.rows["vqav2_trainable_val.arrow"] == 0
    rest = arrow_rows(out / "vqav2_rest_val.arrow", "vqav2", columns)
    assert rest == arrow_rows(out / "vqav2_val.arrow", "vqav2", columns)
    # the engine's VQAv2 reader recovers the vocabulary from the answers column
    assert answer_vocabulary([open_split(out, "vqav2", "train+trainable_val")]) == vocab

    assert report.rows == {"vqav2_train.arrow": 2, "vqav2_val.arrow": 3, "vqav2_test.arrow": 2,
                           "vqav2_test-dev.arrow": 1, "vqav2_trainable_val.arrow": 0, "vqav2_rest_val.arrow": 3}
    assert [output.texts for output in report.outputs] == [8, 9, 3, 1, 0, 9]
    assert skip_reasons(report) == sorted([
        ("vqav2_train.arrow", "question 201", NO_VOCAB_ANSWER), ("vqav2_train.arrow", "question 501", NO_VOCAB_ANSWER),
        ("vqav2_train.arrow", "image 3 (1 question)", MISSING_IMAGE),
        ("vqav2_train.arrow", "image 4 (1 question)", UNREADABLE_IMAGE),
        ("vqav2_test.arrow", "image 23 (1 question)", MISSING_IMAGE)])
    # progress counts the candidate images of train, val, test and test-dev: 4 + 3 + 3 + 1
    assert calls[0] == (0, 11) and calls[-1] == (11, 11)
    assert [done for done, _ in calls] == list(range(12))
    summary = report.summary()
    assert "vqav2_rest_val.arrow" in summary and "2 no answer in the vocabulary" in summary
    assert "COCO_train2014_000000000003.jpg" in summary


def test_vqav2_rest_val_is_the_last_images_of_val(tmp_path: Path) -> None:
    source, out = tmp_path / "vqa", tmp_path / "arrows"
    _write_vqav2(source)
    report = prepare_vqav2(source, out, rest_val_images=1)
    ids = {name: [row["image_id"] for row in arrow_rows(out / name, "vqav2", ["image_id"])]
           for name in ("vqav2_val.arrow", "vqav2_trainable_val.arrow", "vqav2_rest_val.arrow")}
    assert ids == {"vqav2_val.arrow": [11, 12, 13], "vqav2_trainable_val.arrow": [11, 12],
                   "vqav2_rest_val.arrow": [13]}
    assert report.rows["vqav2_trainable_val.arrow"] == 2
    # a rewritten val rewrites its two parts, even when they are complete
    (out / "vqav2_val.arrow").unlink()
    again = prepare_vqav2(source, out, rest_val_images=2)
    assert again.written == ["vqav2_val.arrow", "vqav2_trainable_val.arrow", "vqav2_rest_val.arrow"]
    assert [row["image_id"] for row in arrow_rows(out / "vqav2_rest_val.arrow", "vqav2", ["image_id"])] == [12, 13]


def test_vqav2_test_alone_needs_no_annotations(tmp_path: Path) -> None:
    source, out = tmp_path / "vqa", tmp_path / "arrows"
    _write_vqav2(source)
    prepare("vqav2", source, out)
    (out / "vqav2_test.arrow").unlink()
    for name in ("v2_mscoco_train2014_annotations.json", "v2_mscoco_val2014_annotations.json"):
        (source / name).unlink()
    report = prepare("vqav2", source, out)
    assert report.written == ["vqav2_test.arrow"]
    assert report.rows["vqav2_test.arrow"] == 2


def test_files_in_vilts_own_layout_are_kept(tmp_path: Path) -> None:
    """ViLT's published test files (answer columns typed list<null>) count as complete: kept, not rewritten."""
    source, out = tmp_path / "vqa", tmp_path / "arrows"
    _write_vqav2(source)
    vilt_test = write_vqav2(out, "test", 3)
    write_vqav2(out, "test-dev", 2)
    for path in (source / "test2015").iterdir():
        path.unlink()
    report = prepare("vqav2", source, out)
    assert report.kept == ["vqav2_test.arrow", "vqav2_test-dev.arrow"]
    assert report.rows["vqav2_test.arrow"] == 3 and report.outputs[2].texts == 9
    assert arrow_rows(out / "vqav2_test.arrow", "vqav2", ["image", "question_id"]) == [
        {"image": row["image"], "question_id": row["question_id"]} for row in vilt_test.rows]
    assert report.written == ["vqav2_train.arrow", "vqav2_val.arrow", "vqav2_trainable_val.arrow",
                              "vqav2_rest_val.arrow"]


def test_vqav2_missing_annotation_file_names_file_task_and_place(tmp_path: Path) -> None:
    source = tmp_path / "vqa"
    _write_vqav2(source)
    (source / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(RenError) as caught:
        prepare("vqav2", source, tmp_path / "arrows")
    message = str(caught.value)
    assert "vqav2" in message and "v2_mscoco_val2014_annotations.json" in message
    assert str(source / "v2_mscoco_val2014_annotations.json") in message and "visualqa.org" in message
    assert not list((tmp_path / "arrows").glob("*.arrow"))


def test_vqav2_missing_image_folder_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "vqa"
    _write_vqav2(source)
    for path in (source / "test2015").iterdir():
        path.unlink()
    (source / "test2015").rmdir()
    with pytest.raises(RenError, match=r"vqav2: the image folder test2015/ is missing"):
        prepare("vqav2", source, tmp_path / "arrows")


def test_vqav2_malformed_question_record_names_file_index_and_key(tmp_path: Path) -> None:
    source = tmp_path / "vqa"
    _write_vqav2(source)
    path = source / "v2_OpenEnded_mscoco_train2014_questions.json"
    content = json.loads(path.read_text())
    del content["questions"][2]["image_id"]
    write_json(path, content)
    with pytest.raises(RenError) as caught:
        prepare("vqav2", source, tmp_path / "arrows")
    assert str(path) in str(caught.value) and "questions[2]" in str(caught.value)
    assert "'image_id'" in str(caught.value)


# --- COCO and Flickr30k captions (Karpathy splits) ----------------------------------------------------------------


def _karpathy_record(index: int, filename: str, split: str, captions: list[str], **extra: Any) -> dict[str, Any]:
    sentences = [{"tokens": caption.lower().rstrip(".").split(), "raw": caption, "imgid": index,
                  "sentid": index * 5 + k} for k, caption in enumerate(captions)]
    return {**extra, "sentids": [s["sentid"] for s in sentences], "filename": filename, "imgid": index,
            "split": split, "sentences": sentences}


def _coco_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def _write_coco(source: Path) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Karpathy's dataset_coco.json and the COCO folders; returns image bytes by file name and the records."""
    entries = [  # (folder, image id, split, captions, how the image file is)
        ("train2014", 9, "train", ["A dog runs on grass.", "A brown dog.", "A dog outside."], "ok"),
        ("val2014", 42, "restval", ["Two people near a bus.", "A red bus."], "ok"),
        ("val2014", 73, "val", ["A cat on a table."], "missing"),
        ("val2014", 74, "val", ["A table with food.", "Plates on a table."], "ok"),
        ("val2014", 88, "test", ["Three cats.", "Cats sleeping."], "ok"),
        ("val2014", 89, "test", ["A broken picture."], "corrupt"),
        ("val2014", 90, "test", [], "ok"),
        ("val2014", 91, "extra", ["Not a Karpathy split."], "ok"),
    ]
    records, images = [], {}
    for index, (folder, image_id, split, captions, state) in enumerate(entries):
        name = _coco_name(folder, image_id)
        records.append(_karpathy_record(index, name, split, captions, filepath=folder, cocoid=image_id))
        if state != "missing":
            images[name] = write_image(source / folder / name, index, corrupt=state == "corrupt")
    write_json(source / "karpathy" / "dataset_coco.json", {"images": records, "dataset": "coco"})
    return images, records


def test_coco_caption_karpathy_splits(tmp_path: Path) -> None:
    source, out = tmp_path / "coco", tmp_path / "arrows"
    images, records = _write_coco(source)
    report = prepare("coco_caption", source, out)
    rows = {split: arrow_rows(find_arrow_files(out, "coco_caption", split)[0], "coco_caption",
                              ["image", "caption", "image_id", "split"])
            for split in ("train", "restval", "val", "test")}
    expected: dict[str, list[dict[str, Any]]] = {split: [] for split in rows}
    for record in records:
        name = record["filename"]
        if record["split"] in expected and name in images and record["sentences"] and name != _coco_name(
                "val2014", 89):
            expected[record["split"]].append({"image": images[name], "image_id": name, "split": record["split"],
                                              "caption": [s["raw"] for s in record["sentences"]]})
    assert rows == expected
    assert [len(expected[split]) for split in ("train", "restval", "val", "test")] == [1, 1, 1, 1]
    assert report.rows == {f"coco_caption_karpathy_{split}.arrow": 1 for split in ("train", "restval", "val", "test")}
    assert [output.texts for output in report.outputs] == [3, 2, 2, 2]
    assert skip_reasons(report) == sorted([
        ("coco_caption_karpathy_val.arrow", _coco_name("val2014", 73), MISSING_IMAGE),
        ("coco_caption_karpathy_test.arrow", _coco_name("val2014", 89), UNREADABLE_IMAGE),
        ("coco_caption_karpathy_test.arrow", _coco_name("val2014", 90), MISSING_ANNOTATION),
        ("", f"images[7] ({_coco_name('val2014', 91)})", UNKNOWN_SPLIT)])
    missing = next(record for record in report.skipped if record.reason == MISSING_IMAGE)
    assert missing.detail == str(source / "val2014" / _coco_name("val2014", 73))


def test_coco_caption_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "coco"
    _write_coco(source)
    path = source / "karpathy" / "dataset_coco.json"
    path.write_text('{"images": [\n{"filename": "x.jpg",,}]}', encoding="utf-8")
    with pytest.raises(RenError, match=r"coco_caption: .*dataset_coco.json is not valid JSON \(line 2"):
        prepare("coco_caption", source, tmp_path / "arrows")


def test_coco_caption_record_without_a_key_names_its_index(tmp_path: Path) -> None:
    source = tmp_path / "coco"
    _, records = _write_coco(source)
    del records[1]["split"]
    write_json(source / "karpathy" / "dataset_coco.json", {"images": records, "dataset": "coco"})
    with pytest.raises(RenError) as caught:
        prepare("coco_caption", source, tmp_path / "arrows")
    assert "images[1]" in str(caught.value) and "no key 'split'" in str(caught.value)
    assert "dataset_coco.json" in str(caught.value)


def test_f30k_caption_karpathy_splits(tmp_path: Path) -> None:
    source, out = tmp_path / "f30k", tmp_path / "arrows"
    entries = [("1000092795.jpg", "train", ["Two young guys outside.", "Two men in a yard."], "ok"),
               ("10002456.jpg", "train", ["Workers on a building."], "corrupt"),
               ("1000268201.jpg", "val", ["A child in pink."], "ok"),
               ("1000344755.jpg", "test", ["A man on a ladder."], "missing"),
               ("1000366164.jpg", "test", ["Two men by a wall.", "Men talking."], "ok")]
    records, images = [], {}
    for index, (name, split, captions, state) in enumerate(entries):
        records.append(_karpathy_record(index, name, split, captions))
        if state == "corrupt":
            (source / "flickr30k-images" / name).write_bytes(corrupt_bytes(0))  # not an image at all
        elif state != "missing":
            images[name] = write_image(source / "flickr30k-images" / name, index)
    write_json(source / "dataset_flickr30k.json", {"images": records, "dataset": "flickr30k"})
    report = prepare("f30k_caption", source, out)
    columns = ["image", "caption", "image_id", "split"]
    got = {split: arrow_rows(out / f"f30k_caption_karpathy_{split}.arrow", "f30k_caption", columns)
           for split in ("train", "val", "test")}
    assert got == {
        split: [{"image": images[name], "caption": captions, "image_id": name, "split": split}
                for name, record_split, captions, state in entries if record_split == split and state == "ok"]
        for split in ("train", "val", "test")}
    assert report.rows == {"f30k_caption_karpathy_train.arrow": 1, "f30k_caption_karpathy_val.arrow": 1,
                           "f30k_caption_karpathy_test.arrow": 1}
    assert skip_reasons(report) == sorted([("f30k_caption_karpathy_train.arrow", "10002456.jpg", UNREADABLE_IMAGE),
                                           ("f30k_caption_karpathy_test.arrow", "1000344755.jpg", MISSING_IMAGE)])


# --- NLVR2 ------------------------------------------------------------------------------------------------------


def _nlvr2_record(identifier: str, sentence: str, label: str, **extra: Any) -> dict[str, Any]:
    return {"validation": {"12": label}, "sentence": sentence, "left_url": "https://example.org/l.jpg",
            "writer": "103", "label": label, "right_url": "https://example.org/r.jpg", "synset": "beer bottle",
            "query": "some beer bottles2", "identifier": identifier, "extra_validations": {}, **extra}


def _write_nlvr2(source: Path) -> dict[str, tuple[bytes, bytes]]:
    """The layout ViLT's write_nlvr2.py reads: nlvr2/data/*.json, images/train/<directory>/, dev/, test1/."""
    data = source / "nlvr2" / "data"
    _write_jsonl(data / "train.json", [
        _nlvr2_record("train-10-0-0", "Both images show dogs.", "True", directory=41),
        _nlvr2_record("train-11-1-0", "There are two cats.", "False", directory=7),
        _nlvr2_record("train-10-0-1", "The left image shows one dog.", "False", directory=41),
        _nlvr2_record("train-12-3-0", "One bus is red.", "maybe", directory=7),
    ])
    _write_jsonl(data / "dev.json", [_nlvr2_record("dev-5-0-0", "A bottle is open.", "True"),
                                     _nlvr2_record("dev-5-0-1", "Bottles are in a row.", "False"),
                                     _nlvr2_record("dev-6-2-0", "A cake with bottles.", "True")])
    _write_jsonl(data / "test1.json", [_nlvr2_record("test1-7-0-0", "Two men drink.", "True"),
                                       _nlvr2_record("test1-8-1-0", "A man holds a bottle.", "False")])
    _write_jsonl(data / "balanced" / "balanced_dev.json", [_nlvr2_record("dev-5-0-1", "Bottles are in a row.",
                                                                         "False")])
    images: dict[str, tuple[bytes, bytes]] = {}
    for index, (folder, pair, state) in enumerate([
            ("images/train/41", "train-10-0", "ok"), ("images/train/7", "train-11-1", "ok"),
            ("dev", "dev-5-0", "ok"), ("dev", "dev-6-2", "img1 missing"),
            ("test1", "test1-7-0", "ok"), ("test1", "test1-8-1", "img0 corrupt")]):
        left = write_image(source / folder / f"{pair}-img0.png", 2 * index, "PNG", corrupt=state == "img0 corrupt")
        if state == "img1 missing":
            continue
        images[pair] = (left, write_image(source / folder / f"{pair}-img1.png", 2 * index + 1, "PNG"))
    return images


def test_nlvr2_pairs_sentences_per_image_pair(tmp_path: Path) -> None:
    source, out = tmp_path / "nlvr", tmp_path / "arrows"
    images = _write_nlvr2(source)
    report = prepare("nlvr2", source, out)
    columns = ["image_0", "image_1", "questions", "answers", "identifier"]
    expected = {
        "train": [("train-10-0", ["Both images show dogs.", "The left image shows one dog."], ["True", "False"]),
                  ("train-11-1", ["There are two cats."], ["False"])],
        "dev": [("dev-5-0", ["A bottle is open.", "Bottles are in a row."], ["True", "False"])],
        "test1": [("test1-7-0", ["Two men drink."], ["True"])],
        "balanced_dev": [("dev-5-0", ["Bottles are in a row."], ["False"])],
    }
    for split, pairs in expected.items():
        assert arrow_rows(find_arrow_files(out, "nlvr2", split)[0], "nlvr2", columns) == [
            {"image_0": images[pair][0], "image_1": images[pair][1], "questions": sentences, "answers": labels,
             "identifier": pair} for pair, sentences, labels in pairs]
    assert report.rows == {"nlvr2_train.arrow": 2, "nlvr2_dev.arrow": 1, "nlvr2_test1.arrow": 1,
                           "nlvr2_balanced_dev.arrow": 1}
    assert report.unavailable == ["nlvr2_balanced_test1.arrow", "nlvr2_unbalanced_dev.arrow",
                                  "nlvr2_unbalanced_test1.arrow"]
    assert skip_reasons(report) == sorted([("nlvr2_train.arrow", "train-12-3-0", UNKNOWN_LABEL),
                                           ("nlvr2_dev.arrow", "dev-6-2", MISSING_IMAGE),
                                           ("nlvr2_test1.arrow", "test1-8-1", UNREADABLE_IMAGE)])
    missing = next(record for record in report.skipped if record.reason == MISSING_IMAGE)
    assert missing.detail == str(source / "dev" / "dev-6-2-img1.png")
    assert re.search(r"nlvr2_unbalanced_dev.arrow +not written: its input file is not in the source", report.summary())


def test_nlvr2_train_record_without_directory_names_line_and_key(tmp_path: Path) -> None:
    source = tmp_path / "nlvr"
    _write_nlvr2(source)
    path = source / "nlvr2" / "data" / "train.json"
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    del record["directory"]
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RenError) as caught:
        prepare("nlvr2", source, tmp_path / "arrows")
    assert "nlvr2: line 2 of" in str(caught.value) and "train.json" in str(caught.value)
    assert "no key 'directory'" in str(caught.value)


def test_nlvr2_missing_dev_file(tmp_path: Path) -> None:
    source = tmp_path / "nlvr"
    _write_nlvr2(source)
    (source / "nlvr2" / "data" / "dev.json").unlink()
    with pytest.raises(RenError) as caught:
        prepare("nlvr2", source, tmp_path / "arrows")
    message = str(caught.value)
    assert "nlvr2: the input file dev.json is missing" in message
    assert str(source / "nlvr2" / "data" / "dev.json") in message and "lil-lab/nlvr" in message


# --- SNLI-VE ------------------------------------------------------------------------------------------------------


def _snli_record(image_id: str, caption: int, premise: str, hypothesis: str, gold: str) -> dict[str, Any]:
    return {"annotator_labels": [gold], "captionID": f"{image_id}.jpg#{caption}", "gold_label": gold,
            "pairID": f"{image_id}.jpg#{caption}r1{gold[:1]}", "sentence1": premise, "sentence2": hypothesis,
            "sentence1_binary_parse": "( ( A dog ) runs )", "Flickr30K_ID": image_id}


_SNLI = {
    "train": [("1000092795", "Two young guys outside.", "Two men are outside.", "entailment"),
              ("1000092795", "Two young guys outside.", "Two women sleep.", "contradiction"),
              ("2000000001", "A dog on grass.", "The dog is hungry.", "-"),
              ("2000000001", "A dog on grass.", "An animal outside.", "entailment"),
              ("3000000002", "A boy jumps.", "The boy is happy.", "neutral"),  # its image file is missing
              ("4000000003", "A cat naps.", "The cat is asleep.", "entailment")],  # its image is corrupt
    "dev": [("5000000004", "A man on a ladder.", "A man is painting.", "neutral"),
            ("6000000005", "A woman reads.", "A woman holds a book.", "entailment")],
    "test": [("7000000006", "Kids play soccer.", "Children play a sport.", "entailment")],
}


def _write_snli(source: Path) -> dict[str, bytes]:
    images = {}
    for split, entries in _SNLI.items():
        _write_jsonl(source / f"snli_ve_{split}.jsonl",
                     [_snli_record(image_id, k, premise, hypothesis, gold)
                      for k, (image_id, premise, hypothesis, gold) in enumerate(entries)])
        for image_id, *_ in entries:
            if image_id != "3000000002" and image_id not in images:
                images[image_id] = write_image(source / "flickr30k-images" / f"{image_id}.jpg", len(images),
                                               corrupt=image_id == "4000000003")
    return images


def test_snli_ve_groups_pairs_per_image_in_meters_layout(tmp_path: Path) -> None:
    source, out = tmp_path / "snli", tmp_path / "arrows"
    images = _write_snli(source)
    calls: list[tuple[int, int]] = []
    report = prepare("snli_ve", source, out, progress=lambda done, total: calls.append((done, total)))
    labels = {"contradiction": 0, "neutral": 1, "entailment": 2}
    for split in ("train", "dev", "test"):
        expected: dict[str, dict[str, Any]] = {}
        for image_id, premise, hypothesis, gold in _SNLI[split]:
            if gold in labels and image_id not in ("3000000002", "4000000003"):
                row = expected.setdefault(image_id, {"image": images[image_id], "sentences": [], "labels": []})
                row["sentences"].append([premise, hypothesis])
                row["labels"].append(labels[gold])
        got = arrow_rows(find_arrow_files(out, "snli_ve", split)[0], "snli_ve", ["image", "sentences", "labels"])
        assert got == list(expected.values())
    assert report.rows == {"snli_train.arrow": 2, "snli_dev.arrow": 2, "snli_test.arrow": 1}
    assert skip_reasons(report) == sorted([("snli_train.arrow", "line 3 (image 2000000001)", UNKNOWN_LABEL),
                                           ("snli_train.arrow", "3000000002.jpg (1 pair)", MISSING_IMAGE),
                                           ("snli_train.arrow", "4000000003.jpg (1 pair)", UNREADABLE_IMAGE)])
    assert report.skipped_counts() == {UNKNOWN_LABEL: 1, MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1}
    assert calls == [(done, 7) for done in range(8)]  # 4 train images, 2 dev, 1 test
    summary = report.summary()
    assert "snli_train.arrow  written" in summary and "Skipped 3 records" in summary
    assert "gold_label '-'" in summary


def test_snli_ve_bad_jsonl_line_and_missing_image_folder(tmp_path: Path) -> None:
    source = tmp_path / "snli"
    _write_snli(source)
    path = source / "snli_ve_dev.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n{\"gold_label\": \n")
    with pytest.raises(RenError, match=r"snli_ve: line 2 of .*snli_ve_dev.jsonl is not valid JSON"):
        prepare("snli_ve", source, tmp_path / "arrows")
    (source / "flickr30k-images").rename(source / "elsewhere")
    with pytest.raises(RenError) as caught:
        prepare("snli_ve", source, tmp_path / "arrows")
    assert "snli_ve: the image folder flickr30k-images/ is missing" in str(caught.value)
    assert str(source / "Flickr30K" / "images") in str(caught.value)


# --- resuming, batches, locking -------------------------------------------------------------------------------------


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.glob("*.arrow")}


def test_complete_files_are_kept_deleted_ones_rewritten_and_force_rewrites_all(tmp_path: Path) -> None:
    source, out = tmp_path / "snli", tmp_path / "arrows"
    _write_snli(source)
    first = prepare("snli_ve", source, out)
    assert first.written == ["snli_train.arrow", "snli_dev.arrow", "snli_test.arrow"]
    before = _stats(out)
    dev_rows = arrow_rows(out / "snli_dev.arrow", "snli_ve", ["image", "sentences", "labels"])

    calls: list[tuple[int, int]] = []
    again = prepare("snli_ve", source, out, progress=lambda done, total: calls.append((done, total)))
    assert again.written == [] and again.kept == ["snli_train.arrow", "snli_dev.arrow", "snli_test.arrow"]
    assert again.rows == first.rows and [o.texts for o in again.outputs] == [o.texts for o in first.outputs]
    assert again.skipped == [] and calls == [] and _stats(out) == before

    (out / "snli_dev.arrow").unlink()
    third = prepare("snli_ve", source, out)
    assert third.written == ["snli_dev.arrow"] and third.kept == ["snli_train.arrow", "snli_test.arrow"]
    after = _stats(out)
    assert {name: after[name] for name in ("snli_train.arrow", "snli_test.arrow")} == {
        name: before[name] for name in ("snli_train.arrow", "snli_test.arrow")}
    assert arrow_rows(out / "snli_dev.arrow", "snli_ve", ["image", "sentences", "labels"]) == dev_rows

    forced = prepare("snli_ve", source, out, force=True)
    assert forced.written == ["snli_train.arrow", "snli_dev.arrow", "snli_test.arrow"]
    assert all(_stats(out)[name] != after[name] for name in after)
    assert sorted(path.name for path in out.iterdir() if path.suffix != ".lock") == [
        "snli_dev.arrow", "snli_test.arrow", "snli_train.arrow"]


class _Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_at_the_first_unfinished_file(tmp_path: Path) -> None:
    source, out = tmp_path / "snli", tmp_path / "arrows"
    _write_snli(source)

    def interrupt(done: int, total: int) -> None:
        if done == 5:  # the first dev image (train has 4)
            raise _Interrupted

    with pytest.raises(_Interrupted):
        prepare("snli_ve", source, out, progress=interrupt)
    assert sorted(path.name for path in out.iterdir() if not path.name.endswith(".lock")) == ["snli_train.arrow"]
    assert len(open_arrow([out / "snli_train.arrow"], "snli_ve")) == 2
    resumed = prepare("snli_ve", source, out)
    assert resumed.kept == ["snli_train.arrow"] and resumed.written == ["snli_dev.arrow", "snli_test.arrow"]
    assert resumed.rows == {"snli_train.arrow": 2, "snli_dev.arrow": 2, "snli_test.arrow": 1}


def test_an_incomplete_output_file_is_written_again(tmp_path: Path) -> None:
    source, out = tmp_path / "snli", tmp_path / "arrows"
    _write_snli(source)
    prepare("snli_ve", source, out)
    data = (out / "snli_test.arrow").read_bytes()
    (out / "snli_test.arrow").write_bytes(data[: len(data) // 2])  # no footer: an interrupted copy
    report = prepare("snli_ve", source, out)
    assert report.written == ["snli_test.arrow"] and report.rows["snli_test.arrow"] == 1
    assert any("snli_test.arrow existed but was not a complete" in note for note in report.notes)
    assert (out / "snli_test.arrow").read_bytes() == data


def _batch_rows(path: Path) -> list[int]:
    with pa.memory_map(str(path)) as mapped:
        reader = pa.ipc.open_file(mapped)
        return [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]


def test_rows_are_written_in_record_batches_by_rows_and_by_bytes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "vqa"
    images = _write_vqav2(source)
    monkeypatch.setattr(writer_module, "BATCH_ROWS", 2)
    prepare_vqav2(source, tmp_path / "by_rows", rest_val_images=1)
    assert _batch_rows(tmp_path / "by_rows" / "vqav2_val.arrow") == [2, 1]
    monkeypatch.setattr(writer_module, "BATCH_ROWS", 1000)
    monkeypatch.setattr(writer_module, "BATCH_BYTES", len(images[11]) + len(images[12]))
    prepare_vqav2(source, tmp_path / "by_bytes", rest_val_images=1)
    assert _batch_rows(tmp_path / "by_bytes" / "vqav2_val.arrow") == [2, 1]
    for out in ("by_rows", "by_bytes"):
        rows = arrow_rows(tmp_path / out / "vqav2_val.arrow", "vqav2", ["image", "image_id"])
        assert rows == [{"image": images[image_id], "image_id": image_id} for image_id in (11, 12, 13)]


def test_unknown_task_and_concurrent_runs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RenError, match=r"does not know the task 'gqa'; the tasks are vqav2, coco_caption"):
        prepare("gqa", tmp_path, tmp_path / "arrows")
    source, out = tmp_path / "snli", tmp_path / "arrows"
    _write_snli(source)
    with FileLock(str(out / ".ren-prepare.lock")):
        with pytest.raises(RenError, match=r"another ren data prepare is writing into"):
            prepare("snli_ve", source, out)
    assert prepare("snli_ve", source, out).rows["snli_train.arrow"] == 2


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(RenError, match=r"The snli_ve source folder .*nowhere does not exist"):
        prepare("snli_ve", tmp_path / "nowhere", tmp_path / "arrows")


def test_ren_data_prepare_prints_the_summary_and_resumes(tmp_path: Path) -> None:
    from tests.helpers.cli import ren

    source, out = tmp_path / "snli", tmp_path / "arrows"
    _write_snli(source)
    result = ren("data", "prepare", "snli_ve", "--source", str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "snli_train.arrow  written" in result.stdout and "Skipped 3 records" in result.stdout
    again = ren("data", "prepare", "snli_ve", "--source", str(source), "--out", str(out))
    assert "3 kept as complete" in again.stdout
    missing = ren("data", "prepare", "snli_ve", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
