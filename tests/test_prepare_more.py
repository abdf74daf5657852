"""``ren data prepare`` for RefCOCO/+/g, Visual Genome, Conceptual Captions and SBU from their original layouts.

Each fixture writes a tiny copy of a release into ``tmp_path`` with the real
file names and structures: lichengunc/refer's ``refs(unc).p`` pickles (one
written byte for byte as Python 2's cPickle writes protocol 2) beside a COCO
``instances.json``, Visual Genome's ``region_descriptions.json``, and ViLT's
``*annot.json`` lists for CC and SBU, with real JPEG files made by PIL (one
missing, one corrupt). The converters run through the ``ren`` command line and
their files are read back with :func:`engine.data.arrow.open_arrow`.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.data.arrow import find_arrow_files
from engine.data.prepare import MISSING_ANNOTATION, MISSING_IMAGE, UNKNOWN_SPLIT, UNREADABLE_IMAGE, prepare
from engine.errors import RenError
from tests.helpers.prepare import arrow_rows, skip_reasons, write_image, write_json


def _ren_prepare(task: str, source: Path, out: Path, *options: str) -> str:
    """Run ``ren data prepare`` in process; its output with runs of whitespace made one space."""
    result = CliRunner().invoke(app, ["data", "prepare", task, "--source", str(source), "--out", str(out), *options])
    assert result.exit_code == 0, (result.output, result.exception)
    return " ".join(result.output.split())


# --- RefCOCO, RefCOCO+, RefCOCOg ------------------------------------------------------------------------------------


def _py2_pickle(value: Any) -> bytes:
    """``value`` as Python 2's ``cPickle.dump(value, file, 2)`` writes it, as in refer's ``refs(*).p``: ``str`` as
    Python 2's ``str``, UTF-8 bytes in a SHORT_BINSTRING (which Python 3 must decode), ``bytes`` as such a string of
    those bytes, and a memo entry (BINPUT) after each container and string."""
    out = bytearray(b"\x80\x02")
    memo = 0

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]) if memo < 256 else b"r" + struct.pack("<I", memo))
        memo += 1

    def dump(item: Any) -> None:
        if isinstance(item, dict):
            out.extend(b"}")
            put()
            if item:
                out.extend(b"(")
                for key, inner in item.items():
                    dump(key)
                    dump(inner)
                out.extend(b"u")
        elif isinstance(item, list):
            out.extend(b"]")
            put()
            if item:
                out.extend(b"(")
                for inner in item:
                    dump(inner)
                out.extend(b"e")
        elif isinstance(item, (str, bytes)):
            data = item.encode("utf-8") if isinstance(item, str) else item
            out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data)
            put()
        elif isinstance(item, int) and 0 <= item < 65536:
            out.extend(b"K" + bytes([item]) if item < 256 else b"M" + struct.pack("<H", item))
        elif isinstance(item, int):
            out.extend(b"J" + struct.pack("<i", item))
        else:
            raise TypeError(f"no Python 2 opcode here for {item!r}")

    dump(value)
    out.extend(b".")
    return bytes(out)


def _protocol2(value: Any) -> bytes:
    return pickle.dumps(value, protocol=2)


# instances.json: image id -> (its annotations: (ann id, bbox)); image 3's file is missing, image 4's is corrupt,
# image 6 is in no annotation and image 7 is not in instances.json at all
_COCO_OBJECTS = {
    1: [(11, [10.5, 20.0, 30.25, 40.0]), (12, [1, 2, 3, 4]), (13, [50.0, 60.0, 5.5, 6.5])],
    2: [(21, [0.0, 0.0, 24.0, 16.0])],
    3: [(31, [1.0, 1.0, 2.0, 2.0])],
    4: [(41, [2.0, 2.0, 3.0, 3.0])],
    5: [(51, [4.0, 4.0, 4.0, 4.0])],
}
# refs: (ref id, ann id, image id, split, sentences)
_REFS = [
    (100, 12, 1, "train", ["man in the middle", "the café guy"]),
    (101, 21, 2, "val", ["whole picture"]),
    (102, 11, 1, "testA", ["left man"]),
    (103, 13, 1, "testB", ["right thing", "small box", "lower right"]),
    (104, 31, 3, "train", ["missing image"]),
    (105, 41, 4, "testB", ["broken image"]),
    (106, 99, 5, "train", ["an annotation of no image"]),
    (107, 21, 2, "val", []),
    (108, 11, 1, "test", ["a split unc does not have"]),
    (109, 71, 7, "val", ["an image instances.json lacks"]),
]


def _coco_file(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[str]) -> dict[str, Any]:
    sent_ids = [ref_id * 10 + k for k in range(len(sentences))]
    return {"image_id": image_id, "split": split, "sentences": [
        {"tokens": sentence.split(), "raw": sentence.upper(), "sent_id": sent_id, "sent": sentence}
        for sent_id, sentence in zip(sent_ids, sentences)],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "category_id": 1, "ann_id": ann_id,
        "sent_ids": sent_ids, "ref_id": ref_id}


def _write_refer(source: Path, task: str, refs: list[tuple[Any, ...]], dump: Callable[[Any], bytes],
                 split_by: str = "unc") -> dict[int, bytes]:
    """refer's data/<task>/refs(<split_by>).p and instances.json, and images/mscoco/train2014/."""
    folder = source / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(dump([_ref(*ref) for ref in refs]))
    write_json(folder / "instances.json", {
        "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset."}, "licenses": [],
        "images": [{"license": 1, "file_name": _coco_file(image_id), "coco_url": "", "height": 16, "width": 24,
                    "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id}
                   for image_id in (*_COCO_OBJECTS, 6)],
        "annotations": [{"segmentation": [[x, y, x + w, y, x + w, y + h]], "area": w * h, "iscrowd": 0,
                         "image_id": image_id, "bbox": [x, y, w, h], "category_id": 1, "id": ann_id}
                        for image_id, objects in _COCO_OBJECTS.items() for ann_id, (x, y, w, h) in objects],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}]})
    images = {}
    for image_id in (1, 2, 4, 5, 6):
        images[image_id] = write_image(source / "images" / "mscoco" / "train2014" / _coco_file(image_id), image_id,
                                       corrupt=image_id == 4)
    return images


def _expected_refer_rows(images: dict[int, bytes], split: str) -> list[dict[str, Any]]:
    rows = []
    for ref_id, ann_id, image_id, ref_split, sentences in _REFS:
        if ref_split == split and ref_id in (100, 101, 102, 103):
            ids = [object_id for object_id, _ in _COCO_OBJECTS[image_id]]
            rows.append({"image": images[image_id], "sentences": sentences, "labels": ids.index(ann_id),
                         "bboxes": [[float(v) for v in box] for _, box in _COCO_OBJECTS[image_id]]})
    return rows


@pytest.mark.parametrize(("task", "dump"), [("refcoco", _py2_pickle), ("refcoco+", _protocol2)])
def test_refer_one_row_per_ref_with_every_box_of_its_image(tmp_path: Path, task: str,
                                                           dump: Callable[[Any], bytes]) -> None:
    source, out = tmp_path / "refer" / "data", tmp_path / "arrows"
    images = _write_refer(source, task, _REFS, dump)
    assert pickle.loads((source / task / "refs(unc).p").read_bytes(), encoding="utf-8") == [_ref(*r) for r in _REFS]

    output = _ren_prepare(task, source, out)
    columns = ["image", "sentences", "bboxes", "labels"]
    for split in ("train", "val", "testA", "testB"):
        [path] = find_arrow_files(out, task, split)
        assert path.name == f"{task}_unc_{split}.arrow"
        assert arrow_rows(path, task, columns) == _expected_refer_rows(images, split)
    assert arrow_rows(out / f"{task}_unc_train.arrow", task, ["labels", "sentences"]) == [
        {"labels": 1, "sentences": ["man in the middle", "the café guy"]}]
    assert ("Skipped 6 records: 3 missing annotation, 1 unknown split, 1 missing image file, 1 unreadable image"
            in output)
    assert f"{task}: split by unc (refs(unc).p)." in output

    again = prepare(task, source, out)
    assert again.kept == [f"{task}_unc_{split}.arrow" for split in ("train", "val", "testA", "testB")]
    assert again.written == [] and again.skipped == []
    forced = prepare(task, source, out, force=True)
    assert forced.rows == {f"{task}_unc_train.arrow": 1, f"{task}_unc_val.arrow": 1, f"{task}_unc_testA.arrow": 1,
                           f"{task}_unc_testB.arrow": 1}
    assert [output.texts for output in forced.outputs] == [2, 1, 1, 3]
    assert skip_reasons(forced) == sorted([
        ("", "refs[8]", UNKNOWN_SPLIT),
        (f"{task}_unc_train.arrow", f"ref 104 ({_coco_file(3)})", MISSING_IMAGE),
        (f"{task}_unc_train.arrow", "ref 106", MISSING_ANNOTATION),
        (f"{task}_unc_val.arrow", "ref 107", MISSING_ANNOTATION),
        (f"{task}_unc_val.arrow", "ref 109", MISSING_ANNOTATION),
        (f"{task}_unc_testB.arrow", f"ref 105 ({_coco_file(4)})", UNREADABLE_IMAGE)])
    details = {record.record: record.detail for record in forced.skipped}
    assert details["ref 106"] == f"its annotation 99 is not one of image 5's in {source / task / 'instances.json'}"
    assert details[f"ref 104 ({_coco_file(3)})"] == str(source / "images/mscoco/train2014" / _coco_file(3))


def test_python2_byte_strings_are_read_as_utf8_else_latin1(tmp_path: Path) -> None:
    source, out = tmp_path / "data", tmp_path / "arrows"
    _write_refer(source, "refcoco", [(400, 12, 1, "train", ["the café sign", b"caf\xe9 in latin-1"])], _py2_pickle)
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load (ASCII) makes of it
        pickle.loads((source / "refcoco" / "refs(unc).p").read_bytes())
    prepare("refcoco", source, out)
    assert arrow_rows(out / "refcoco_unc_train.arrow", "refcoco", ["sentences"]) == [
        {"sentences": ["the café sign", "café in latin-1"]}]


def test_refcocog_umd_by_default_google_when_it_is_the_only_refs_file(tmp_path: Path) -> None:
    source, out = tmp_path / "data", tmp_path / "arrows"
    umd = [(200, 12, 1, "train", ["a man"]), (201, 21, 2, "val", ["a picture"]), (202, 13, 1, "test", ["a box"])]
    images = _write_refer(source, "refcocog", umd, _protocol2, "umd")
    _ren_prepare("refcocog", source, out)
    assert {split: arrow_rows(find_arrow_files(out, "refcocog", split)[0], "refcocog", ["image", "labels"])
            for split in ("train", "val", "test")} == {
        "train": [{"image": images[1], "labels": 1}], "val": [{"image": images[2], "labels": 0}],
        "test": [{"image": images[1], "labels": 2}]}

    google = tmp_path / "google"
    _write_refer(google, "refcocog", [(300, 11, 1, "train", ["left"]), (301, 12, 1, "val", ["middle"])], _protocol2,
                 "google")
    report = prepare("refcocog", google, tmp_path / "google_arrows")
    assert report.rows == {"refcocog_google_train.arrow": 1, "refcocog_google_val.arrow": 1}
    assert "refcocog: split by google (refs(google).p)." in report.notes
    assert arrow_rows(tmp_path / "google_arrows" / "refcocog_google_val.arrow", "refcocog",
                      ["labels", "sentences"]) == [{"labels": 1, "sentences": ["middle"]}]
    with pytest.raises(RenError, match=r"refcocog: the input file refs\(umd\).p is missing"):
        prepare("refcocog", google, tmp_path / "umd_arrows", split_by="umd")
    with pytest.raises(RenError, match=r"refcocog: there is no split by 'unc'; refcocog is split by umd or google"):
        prepare("refcocog", google, tmp_path / "unc_arrows", split_by="unc")
    with pytest.raises(RenError, match=r"--split-by is an option of refcoco, refcoco\+, refcocog, not of vg"):
        prepare("vg", google, tmp_path / "vg_arrows", split_by="unc")


class _Evaluates:
    """Pickles as a call of the builtin eval: a plain pickle.load of it would create the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return eval, (f"__import__('pathlib').Path({str(self.path)!r}).touch()",)


def test_refs_pickle_that_calls_code_or_is_corrupt_is_refused(tmp_path: Path) -> None:
    source, out = tmp_path / "data", tmp_path / "arrows"
    _write_refer(source, "refcoco", _REFS, _protocol2)
    refs = source / "refcoco" / "refs(unc).p"
    marker = tmp_path / "created-by-unpickling"
    refs.write_bytes(pickle.dumps([_ref(*_REFS[0]), {"hook": _Evaluates(marker)}], protocol=2))
    with pytest.raises(RenError) as caught:
        prepare("refcoco", source, out)
    assert f"refcoco: {refs} refers to __builtin__.eval" in str(caught.value) and "could run code" in str(caught.value)
    assert not marker.exists()

    refs.write_bytes(pickle.dumps({"refs": []}, protocol=2))
    with pytest.raises(RenError, match=r"holds an object, expected a list of refs"):
        prepare("refcoco", source, out)
    refs.write_bytes(_py2_pickle([_ref(*_REFS[0]), {"ref_id": 1}]))
    with pytest.raises(RenError, match=r"refs\[1\] of .*refs\(unc\).p has no key 'split'"):
        prepare("refcoco", source, out)
    assert not list(out.glob("*.arrow"))

    from tests.helpers.cli import ren

    refs.write_bytes(_py2_pickle([_ref(*ref) for ref in _REFS])[:-40])
    result = ren("data", "prepare", "refcoco", "--source", str(source), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "refcoco:" in message and "is not a readable pickle" in message and "refs(unc).p" in message


def test_refer_missing_instances_names_the_file_and_the_release(tmp_path: Path) -> None:
    source = tmp_path / "data"
    _write_refer(source, "refcoco", _REFS, _protocol2)
    (source / "refcoco" / "instances.json").unlink()
    with pytest.raises(RenError) as caught:
        prepare("refcoco", source, tmp_path / "arrows")
    assert "refcoco: the input file instances.json is missing" in str(caught.value)
    assert str(source / "refcoco" / "instances.json") in str(caught.value) and "lichengunc/refer" in str(caught.value)


# --- Visual Genome --------------------------------------------------------------------------------------------------

# image id -> its regions (phrase, width, height, x, y); 3's file is missing, 4's is corrupt, 5 has no regions
_VG = {1: [("a green clock", 82, 139, 421, 57), ("a man walking", 30, 60, 2, 5)],
       2: [("white clouds", 100, 40, 0, 0)],
       3: [("a red bus", 10, 10, 1, 1)],
       4: [("a tree", 12, 30, 4, 0)],
       5: []}


def _write_vg(source: Path, layout: str) -> dict[int, bytes]:
    """Visual Genome as its zips unpack (``layout="release"``) or in ViLT's annotations/ and images/ folders."""
    annotations, images = (source, source) if layout == "release" else (source / "annotations", source / "images")
    write_json(annotations / "region_descriptions.json", [
        {"regions": [{"region_id": image_id * 100 + k, "width": w, "height": h, "image_id": image_id,
                      "phrase": phrase, "y": y, "x": x} for k, (phrase, w, h, x, y) in enumerate(regions)],
         "id": image_id} for image_id, regions in _VG.items()])
    written = {1: write_image(images / "VG_100K" / "1.jpg", 1), 2: write_image(images / "VG_100K_2" / "2.jpg", 2)}
    write_image(images / "VG_100K_2" / "4.jpg", 4, corrupt=True)
    return written


@pytest.mark.parametrize("layout", ["release", "vilt"])
def test_vg_groups_regions_per_image(tmp_path: Path, layout: str) -> None:
    source, out = tmp_path / "vg", tmp_path / "arrows"
    images = _write_vg(source, layout)
    output = _ren_prepare("vg", source, out)
    assert "Skipped 3 records: 1 missing annotation, 1 missing image file, 1 unreadable image" in output
    [path] = find_arrow_files(out, "vg", "train")
    rows = arrow_rows(path, "vg", ["image", "caption", "width", "height", "x", "y", "image_id"])
    assert rows == [{"image": images[image_id], "caption": [r[0] for r in _VG[image_id]],
                     "width": [r[1] for r in _VG[image_id]], "height": [r[2] for r in _VG[image_id]],
                     "x": [r[3] for r in _VG[image_id]], "y": [r[4] for r in _VG[image_id]], "image_id": str(image_id)}
                    for image_id in (1, 2)]
    report = prepare("vg", source, out, force=True)
    assert skip_reasons(report) == sorted([("vg.arrow", "image 5", MISSING_ANNOTATION),
                                           ("vg.arrow", "3.jpg", MISSING_IMAGE),
                                           ("vg.arrow", "4.jpg", UNREADABLE_IMAGE)])
    assert report.rows == {"vg.arrow": 2} and report.outputs[0].texts == 3
    assert prepare("vg", source, out).kept == ["vg.arrow"]


def test_vg_region_without_phrase_names_file_and_region(tmp_path: Path) -> None:
    source = tmp_path / "vg"
    _write_vg(source, "release")
    path = source / "region_descriptions.json"
    content = json.loads(path.read_text())
    del content[0]["regions"][1]["phrase"]
    write_json(path, content)
    with pytest.raises(RenError) as caught:
        prepare("vg", source, tmp_path / "arrows")
    assert f"vg: [0].regions[1] of {path} has no key 'phrase'" in str(caught.value)
    (source / "VG_100K").rename(source / "elsewhere")
    with pytest.raises(RenError, match=r"vg: the image folder VG_100K/ is missing"):
        prepare("vg", source, tmp_path / "arrows")


# --- Conceptual Captions and SBU ------------------------------------------------------------------------------------


def _write_captions(source: Path, annotations: str, folder: str, entries: list[tuple[str, str, str]]
                    ) -> dict[str, bytes]:
    """ViLT's layout: ``annotations`` a JSON list of [image path, caption], images in ``folder``/<first four>/;
    ``entries`` are (file name, caption, "ok" | "missing" | "corrupt")."""
    write_json(source / annotations, [[f"{source}/{folder}/{name[:4]}/{name}", caption]
                                      for name, caption, _ in entries])
    images: dict[str, bytes] = {}
    for index, (name, _, state) in enumerate(entries):
        if state != "missing" and name not in images:
            images[name] = write_image(source / folder / name[:4] / name, index, corrupt=state == "corrupt")
    return images


_CC_TRAIN = [("0000000", "a dog on grass", "ok"), ("0000001", "a cat", "ok"), ("0000002", "a bus", "missing"),
             ("0000003", "a broken picture", "corrupt"), ("0001004", "two birds", "ok"),
             ("0000000", "a brown dog", "ok")]


def test_cc_shards_resume_and_recut(tmp_path: Path) -> None:
    source, out = tmp_path / "cc", tmp_path / "arrows"
    images = _write_captions(source, "train_annot.json", "images_train", _CC_TRAIN)
    images.update(_write_captions(source, "val_annot.json", "images_val", [("0000007", "a red car", "ok")]))
    write_image(source / "images_train" / "0000" / "0000099", 99)  # no caption: not written

    output = _ren_prepare("cc", source, out, "--shard-rows", "2")
    columns = ["image", "caption", "image_id", "split"]
    train = find_arrow_files(out, "cc", "train")
    assert [path.name for path in train] == ["conceptual_caption_train_0.arrow", "conceptual_caption_train_1.arrow"]
    assert [arrow_rows(path, "cc", columns) for path in train] == [
        [{"image": images["0000000"], "caption": ["a dog on grass", "a brown dog"], "image_id": "0000000",
          "split": "train"},
         {"image": images["0000001"], "caption": ["a cat"], "image_id": "0000001", "split": "train"}],
        [{"image": images["0001004"], "caption": ["two birds"], "image_id": "0001004", "split": "train"}]]
    assert arrow_rows(find_arrow_files(out, "cc", "val")[0], "cc", columns) == [
        {"image": images["0000007"], "caption": ["a red car"], "image_id": "0000007", "split": "val"}]
    assert "Skipped 2 records: 1 missing image file, 1 unreadable image" in output
    assert "1 image file in" in output and "had no caption in train_annot.json" in output

    names = ["conceptual_caption_train_0.arrow", "conceptual_caption_train_1.arrow", "conceptual_caption_val_0.arrow"]
    assert "3 written, 0 kept" in output
    assert "0 written, 3 kept" in _ren_prepare("cc", source, out, "--shard-rows", "2")

    recut = prepare("cc", source, out, shard_rows=3)  # train's shards now end elsewhere: both are written again
    assert recut.written == names[:2] and recut.kept == names[2:]
    assert recut.rows == {names[0]: 2, names[1]: 1, names[2]: 1}  # shard 0 held 0000003, which is unreadable
    assert any("conceptual_caption_train_1.arrow existed but was not a complete cc arrow file of images 3-4 of 4 "
               "(schema metadata ren.shard)" in note for note in recut.notes)
    one = prepare("cc", source, out)  # ViLT's 100,000 rows a shard: one train shard, and shard 1 is removed
    assert one.written == names[:1] and one.rows[names[0]] == 3
    assert [path.name for path in find_arrow_files(out, "cc", "train")] == names[:1]
    assert any(note.startswith(f"Removed {out / names[1]}") for note in one.notes)
    assert [row["image_id"] for row in arrow_rows(out / names[0], "cc", ["image_id"])] == [
        "0000000", "0000001", "0001004"]


def test_sbu_shard_and_malformed_annotation(tmp_path: Path) -> None:
    source, out = tmp_path / "sbu", tmp_path / "arrows"
    entries = [("4095_4898927440_5c8800ac69.jpg", "New curtain for window over kitchen sink", "ok"),
               ("1049_1325996189_e99abf6ced.jpg", "Dad and Lukie walking in the water", "ok")]
    images = _write_captions(source, "annot.json", "images_train", entries)
    report = prepare("sbu", source, out)
    assert report.written == ["sbu_0.arrow"] and report.skipped == []
    assert arrow_rows(find_arrow_files(out, "sbu", "train")[0], "sbu", ["image", "caption", "image_id", "split"]) == [
        {"image": images[name], "caption": [caption], "image_id": name, "split": "train"}
        for name, caption, _ in entries]

    write_json(source / "annot.json", [[f"images_train/4095/{entries[0][0]}", entries[0][1]], ["only a path"]])
    with pytest.raises(RenError, match=r"sbu: entry \[1\] of .*annot.json is \"\['only a path'\]\", expected \[image "
                                       r"path, caption\]"):
        prepare("sbu", source, out, force=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RenError, match=r"sbu: the input file annot.json is missing"):
        prepare("sbu", tmp_path / "empty", out)
    with pytest.raises(RenError, match=r"sbu: shard_rows must be at least 1, got 0"):
        prepare("sbu", source, out, shard_rows=0)
