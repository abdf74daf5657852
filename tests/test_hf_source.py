"""Hugging Face ``datasets`` as a data source: the local formats, the column mapping, VQAv2's derived
answers, errors, corrupt images and an end-to-end run. Fixtures are real ``datasets`` data sets (Image()
features holding PIL-encoded bytes) written with ``save_to_disk``, ``to_parquet`` and as an imagefolder."""

from __future__ import annotations

import json
import pickle
from io import BytesIO
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from engine.config import HF_COLUMNS, HFDataConfig, config_from_dict, load_preset
from engine.data.arrow import ArrowSource
from engine.data.hf_source import HFSource, detect_format, open_hf
from engine.data.images import image_transform
from engine.data.pipeline import build_data, open_source
from engine.data.tokenizer import load_tokenizer
from engine.data.transforms import HALF
from engine.errors import ConfigError, RenError
from engine.store import Store
from engine.vqa_answers import build_answer_vocab, soft_score, soft_targets
from tests.helpers.cli import ren
from tests.helpers.paths import REPO

from .arrow_fixtures import corrupt_bytes, image_bytes, write_vqav2

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"
TOKENIZER = "google/electra-small-discriminator"  # in the offline hub cache the tests use

# Annotators' answers per question, cycled; the majority answers are yes, 2, yes, no, (none: a test question).
ANSWERS = (["yes"] * 4 + ["no"] * 2, ["Two", "2", "two", "3"], ["yes", "Yes.", "no"], ["no"] * 3 + ["dog"], [])
VQA_FEATURES = datasets.Features({  # HuggingFaceM4/VQAv2's features
    "question_type": datasets.Value("string"), "multiple_choice_answer": datasets.Value("string"),
    "answers": datasets.List({"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                              "answer_id": datasets.Value("int64")}),
    "image_id": datasets.Value("int64"), "answer_type": datasets.Value("string"),
    "question_id": datasets.Value("int64"), "question": datasets.Value("string"), "image": datasets.Image()})


def answers_of(i: int) -> list[str]:
    return ANSWERS[i % len(ANSWERS)]


def vqa_rows(n: int, start: int = 0, corrupt: tuple[int, ...] = ()) -> dict[str, list]:
    """HuggingFaceM4/VQAv2 rows: one question each, two questions per image."""
    rows = range(start, start + n)
    return {
        "question_type": ["what"] * n,
        "multiple_choice_answer": [(answers_of(i) or [None])[0] for i in rows],
        "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers_of(i))]
                    for i in rows],
        "image_id": [i // 2 for i in rows], "answer_type": ["other"] * n,
        "question_id": [1000 + i for i in rows], "question": [f"what is in picture {i}?" for i in rows],
        "image": [{"bytes": corrupt_bytes(i) if i in corrupt else image_bytes(i // 2), "path": None} for i in rows]}


def vqa_split(n: int, start: int = 0, corrupt: tuple[int, ...] = ()) -> datasets.Dataset:
    return datasets.Dataset.from_dict(vqa_rows(n, start, corrupt), features=VQA_FEATURES)


def write_disk(directory: Path, **splits: datasets.Dataset) -> Path:
    datasets.DatasetDict(splits).save_to_disk(str(directory))
    return directory


def write_parquet(directory: Path, **splits: datasets.Dataset) -> Path:
    """The hub's parquet layout: ``data/{split}-00000-of-00001.parquet``."""
    (directory / "data").mkdir(parents=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(directory / "data" / f"{split}-00000-of-00001.parquet"))
    return directory


def write_imagefolder(directory: Path, **splits: dict[str, list]) -> Path:
    """One folder per split: the images as JPEG files and a metadata.jsonl row per question."""
    for split, rows in splits.items():
        folder = directory / split
        folder.mkdir(parents=True)
        with (folder / "metadata.jsonl").open("w") as metadata:
            for k, image in enumerate(rows["image"]):
                name = f"{rows['image_id'][k]:06d}.jpg"
                (folder / name).write_bytes(image["bytes"])
                metadata.write(json.dumps({"file_name": name, "question": rows["question"][k],
                                           "answers": [a["answer"] for a in rows["answers"][k]],
                                           "question_id": rows["question_id"][k],
                                           "image_id": rows["image_id"][k]}) + "\n")
    return directory


def hf(path: Path, **keys: object) -> HFDataConfig:
    return HFDataConfig(path=str(path), **keys)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("fmt", ["disk", "parquet", "imagefolder"])
def test_each_local_format_reads_one_question_per_row(fmt: str, tmp_path: Path) -> None:
    root = tmp_path / fmt
    if fmt == "disk":
        write_disk(root, train=vqa_split(10), validation=vqa_split(5, start=10))
    elif fmt == "parquet":
        write_parquet(root, train=vqa_split(10), validation=vqa_split(5, start=10))
    else:
        write_imagefolder(root, train=vqa_rows(10), validation=vqa_rows(5, start=10))
    assert detect_format(str(root)) == fmt
    source = open_hf(hf(root, answer_min_count=2), "vqav2", "train+validation", cache_dir=tmp_path / "cache")
    assert len(source) == 15 and source.kind.name == "vqav2"
    assert source.paths == (f"{root} [train]", f"{root} [validation]")
    assert source.locate(12) == (f"{root} [validation]", 2)
    cells = source.row(12, ("questions", "question_id", "image_id"))
    assert cells == {"questions": ["what is in picture 12?"], "question_id": [1012], "image_id": 6}
    assert np.array_equal(np.asarray(source.image(12)), pixels(image_bytes(6)))
    assert source.column("questions").to_pylist()[:2] == [["what is in picture 0?"], ["what is in picture 1?"]]
    assert source.skipped_images == 0


def test_a_hub_id_is_loaded_with_load_dataset_and_other_paths_are_recognised(tmp_path: Path) -> None:
    root = write_parquet(tmp_path / "parquet", train=vqa_split(6))
    source = open_hf(hf(root, format="hub", answer_min_count=1), "vqav2", "train", cache_dir=tmp_path / "cache")
    assert source.row(3, ("questions",)) == {"questions": ["what is in picture 3?"]}
    assert detect_format("HuggingFaceM4/VQAv2") == "hub"
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "notes.txt").write_text("x")
    with pytest.raises(RenError, match="does not recognise.*notes.txt"):
        detect_format(str(tmp_path / "loose"))
    with pytest.raises(RenError, match="is not a directory"):
        detect_format(str(tmp_path / "absent"))
    with pytest.raises(RenError, match=r"no split 'test'; its splits are train"):
        open_hf(hf(write_disk(tmp_path / "disk", train=vqa_split(2))), "vqav2", "test")


def test_vqa_vocabulary_and_soft_scores_are_vilts(tmp_path: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(10), validation=vqa_split(5, start=10))
    train = open_hf(hf(root, answer_min_count=2), "vqav2", "train")
    majority = [[a] for a in vqa_rows(10)["multiple_choice_answer"] if a is not None]
    assert train.answers == build_answer_vocab(majority, 2) == ["yes", "2", "no"]  # 4, 2 and 2 questions
    index = {answer: i for i, answer in enumerate(train.answers)}
    for i in range(10):
        cells = train.row(i, ("answers", "answer_labels", "answer_scores"))
        if not answers_of(i):  # a question without answers has no list, as in ViLT's test files
            assert cells == {"answers": [], "answer_labels": [], "answer_scores": []}
            continue
        labels, scores = soft_targets(answers_of(i), index)
        assert cells == {"answers": [[train.answers[k] for k in labels]], "answer_labels": [labels],
                         "answer_scores": [scores]}
    # by hand: "Two", "2", "two" are three 2s (0.9), "3" is not in the vocabulary; "Yes." is a second yes
    assert train.row(1, ("answer_labels", "answer_scores")) == {"answer_labels": [[1]], "answer_scores": [[0.9]]}
    assert train.row(2, ("answer_labels", "answer_scores")) == {"answer_labels": [[0, 2]],
                                                                "answer_scores": [[0.6, 0.3]]}
    assert soft_score(4) == 1.0 and train.row(0, ("answer_scores",))["answer_scores"] == [[1.0, 0.6]]
    # an eval split is labelled with the training vocabulary
    evaluate = open_hf(hf(root), "vqav2", "validation", answers=["no", "yes"])
    assert evaluate.answers == ["no", "yes"]
    assert evaluate.row(0, ("answer_labels", "answer_scores")) == {"answer_labels": [[1, 0]],
                                                                   "answer_scores": [[1.0, 0.6]]}
    assert evaluate.row(1, ("answer_labels",)) == {"answer_labels": [[]]}  # answered, but none in the vocabulary


def test_without_multiple_choice_answer_the_vocabulary_counts_each_questions_commonest_answer(tmp_path: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(10).remove_columns("multiple_choice_answer"))
    source = open_hf(hf(root, answer_min_count=2), "vqav2", "train")
    assert source.answers == ["yes", "2", "no"]  # question 1's commonest normalised answer is "2", not "Two"
    with pytest.raises(RenError, match="vocabulary is empty.*answer_min_count"):
        open_hf(hf(root, answer_min_count=5), "vqav2", "train")


def test_the_vqa_dataset_reads_an_hf_source(tmp_path: Path) -> None:
    from engine.data.vqav2 import ArrowVQADataset

    root = write_disk(tmp_path / "disk", train=vqa_split(10, corrupt=(3,)))
    source = open_hf(hf(root, answer_min_count=2), "vqav2", "train")
    dataset = ArrowVQADataset(source, load_tokenizer(TOKENIZER), 16, image_transform(32, train=False), HALF, 3)
    assert len(dataset) == 10
    batch = dataset.__getitems__([0, 1, 2, 3])
    assert batch["question_ids"].tolist() == [1000, 1001, 1002]  # question 3's image is unreadable
    assert batch["labels"][0].tolist() == pytest.approx([1.0, 0.0, 0.6])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert source.skipped_images == 1
    clone = pickle.loads(pickle.dumps(source))  # as a spawned DataLoader worker receives it
    assert clone.row(5, ("questions", "answer_labels")) == source.row(5, ("questions", "answer_labels"))
    assert np.array_equal(np.asarray(clone.image(5)), np.asarray(source.image(5)))


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(6, corrupt=(2, 5)))
    source = open_hf(hf(root, answer_min_count=1), "vqav2", "train")
    assert [source.image(i) is None for i in range(6)] == [False, False, True, False, False, True]
    assert source.skipped_images == 2
    folder = write_imagefolder(tmp_path / "folder", train=vqa_rows(4))
    (folder / "train" / "000001.jpg").unlink()  # rows 2 and 3 show image 1
    source = open_hf(hf(folder, answer_min_count=1), "vqav2", "train", cache_dir=tmp_path / "cache")
    assert source.image(2) is None and source.image(0) is not None and source.skipped_images == 1


def test_the_column_mapping_and_snli_ve_label_names(tmp_path: Path) -> None:
    from engine.data.snli_ve import LABELS, ArrowSNLIVEDataset

    names = ["entailment", "neutral", "contradiction"]  # the order of SNLI's ClassLabel, not METER's ids
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string"),
                                  "claim": datasets.Value("string"), "gold": datasets.ClassLabel(names=names)})
    split = datasets.Dataset.from_dict({
        "picture": [{"bytes": image_bytes(i), "path": None} for i in range(3)],
        "caption": [f"premise {i}" for i in range(3)], "claim": [f"  hypothesis {i} " for i in range(3)],
        "gold": [0, 1, 2]}, features=features)
    columns = {"image": "picture", "premise": "caption", "hypothesis": "claim", "labels": "gold"}
    source = open_hf(hf(write_disk(tmp_path / "disk", train=split), columns=columns), "snli_ve", "train")
    assert source.row(0, ("sentences", "labels")) == {"sentences": [["premise 0", "  hypothesis 0 "]],
                                                      "labels": [LABELS.index("entailment")]}
    assert [LABELS[row[0]] for row in source.column("labels").to_pylist()] == names
    dataset = ArrowSNLIVEDataset(source, load_tokenizer(TOKENIZER), 16, image_transform(32, train=False), HALF)
    assert dataset.__getitems__([0, 1, 2])["labels"].tolist() == [2, 1, 0]
    # string labels, no premise column: an empty premise
    strings = datasets.Dataset.from_dict({"image": [image_bytes(0), image_bytes(1)], "hypothesis": ["a", "b"],
                                          "label": ["Contradiction", "entailment"]})
    source = open_hf(hf(write_disk(tmp_path / "strings", train=strings)), "snli_ve", "train")
    assert source.column("sentences").to_pylist() == [[["", "a"]], [["", "b"]]]
    assert source.column("labels").to_pylist() == [[0], [2]]
    assert source.image(1) is not None  # raw binary image column
    bad = datasets.Dataset.from_dict({"image": [image_bytes(0)], "hypothesis": ["a"], "label": ["maybe"]})
    with pytest.raises(RenError, match="holds 'maybe'.*'contradiction', 'neutral', 'entailment'"):
        open_hf(hf(write_disk(tmp_path / "bad", train=bad)), "snli_ve", "train")


def test_nlvr2_boolean_answers_and_generated_identifiers(tmp_path: Path) -> None:
    split = datasets.Dataset.from_dict({
        "left_image": [{"bytes": image_bytes(i, "PNG"), "path": None} for i in range(3)],
        "right_image": [{"bytes": image_bytes(i + 5, "PNG"), "path": None} for i in range(3)],
        "sentence": ["one", "two", "three"], "label": [True, False, True]},
        features=datasets.Features({"left_image": datasets.Image(), "right_image": datasets.Image(),
                                    "sentence": datasets.Value("string"), "label": datasets.Value("bool")}))
    source = open_hf(hf(write_disk(tmp_path / "disk", dev=split)), "nlvr2", "dev")
    assert source.row(1, ("questions", "answers", "identifier")) == {"questions": ["two"], "answers": ["False"],
                                                                    "identifier": "dev-1"}
    assert np.array_equal(np.asarray(source.image(2, "image_1")), pixels(image_bytes(7, "PNG")))


def test_one_caption_rows_are_grouped_by_image(tmp_path: Path) -> None:
    from engine.data.captions import ArrowCaptionDataset

    split = datasets.Dataset.from_dict({
        "image": [{"bytes": image_bytes(i // 2), "path": None} for i in range(5)],
        "caption": [f"caption {i}" for i in range(5)], "image_id": [7, 7, 9, 9, 8]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "image_id": datasets.Value("int64")}))
    source = open_hf(hf(write_disk(tmp_path / "disk", train=split)), "coco_caption", "train")
    assert len(source) == 3
    assert source.column("caption").to_pylist() == [["caption 0", "caption 1"], ["caption 2", "caption 3"],
                                                    ["caption 4"]]
    assert source.column("image_id").to_pylist() == ["7", "9", "8"] and source.locate(2) == (source.paths[0], 4)
    assert np.array_equal(np.asarray(source.image(1)), pixels(image_bytes(1)))
    dataset = ArrowCaptionDataset([source], load_tokenizer(TOKENIZER), 16, image_transform(32, train=False), HALF)
    assert dataset.__getitems__(list(range(5)))["image_ids"].tolist() == [0, 0, 1, 1, 2]


def test_a_caption_corpus_pretrains_from_hf_splits(tmp_path: Path) -> None:
    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": [image_bytes(i) for i in range(n)],
                                           "caption": [[f"a dog {i}", f"a cat {i}"] for i in range(n)]})

    root = write_disk(tmp_path / "disk", train=split(3), validation=split(2))
    cfg = config_from_dict({"model": {"kind": "one_tower", "backbone": {"modality": "vision"}},
                            "objectives": {"mlm": {}},
                            "data": {"dataset": "captions", "corpora": ["f30k_caption"], "tokenizer": TOKENIZER,
                                     "hf": {"path": str(root)}}})
    data = build_data(cfg, cache_dir=tmp_path / "cache")
    assert len(data.train) == 3 * 2 and len(data.eval) == 2 * 2  # lists of captions are kept, one row per image
    assert data.train.__getitems__([0, 1, 2])["image_ids"].tolist() == [0, 0, 1]


def test_refcoco_rows_of_one_sentence(tmp_path: Path) -> None:
    from engine.data.images import whole_image_transform
    from engine.data.refcoco import ArrowRefCOCODataset

    split = datasets.Dataset.from_dict({
        "image": [{"bytes": image_bytes(i), "path": None} for i in range(3)],
        "sentence": ["the left dog", "the red cat", "a bus"],
        "boxes": [[[1.0, 2.0, 6.0, 4.0], [8.0, 1.0, 5.0, 5.0]], [[0.0, 0.0, 4.0, 4.0]], [[2.0, 2.0, 3.0, 3.0]] * 3],
        "ref": [1, 0, 2]}, features=datasets.Features({
            "image": datasets.Image(), "sentence": datasets.Value("string"),
            "boxes": datasets.List(datasets.List(datasets.Value("float32"))), "ref": datasets.Value("int64")}))
    columns = {"sentences": "sentence", "bboxes": "boxes", "labels": "ref"}
    source = open_hf(hf(write_disk(tmp_path / "disk", val=split), columns=columns), "refcoco+", "val")
    assert source.row(0, ("sentences", "bboxes", "labels")) == {
        "sentences": ["the left dog"], "bboxes": [[1.0, 2.0, 6.0, 4.0], [8.0, 1.0, 5.0, 5.0]], "labels": 1}
    dataset = ArrowRefCOCODataset(source, load_tokenizer(TOKENIZER), 16, whole_image_transform(32), HALF)
    batch = dataset.__getitems__([0, 1, 2])
    assert batch["labels"].tolist() == [1, 0, 2] and batch["box_mask"].sum(1).tolist() == [2, 1, 3]


def test_missing_and_mistyped_columns_are_explained(tmp_path: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(4).rename_column("question", "query"))
    with pytest.raises(RenError) as error:
        open_hf(hf(root), "vqav2", "train")
    message = str(error.value)
    for part in (f"{root} [train]", "no column 'question'", "data.hf.columns.questions", "query (string)"):
        assert part in message
    source = open_hf(hf(root, columns={"questions": "query"}, answer_min_count=1), "vqav2", "train")
    assert source.row(0, ("questions",)) == {"questions": ["what is in picture 0?"]}
    with pytest.raises(RenError, match=r"column 'question_type' \(data.hf.columns.image\) has type string"):
        open_hf(hf(root, columns={"questions": "query", "image": "question_type"}), "vqav2", "train")
    with pytest.raises(RenError, match="data.hf.columns.image_id names"):  # mapped explicitly: no longer optional
        open_hf(hf(root, columns={"questions": "query", "image_id": "img"}, answer_min_count=1), "vqav2", "train")


def test_the_preset_section_is_validated(tmp_path: Path) -> None:
    base = {"model": {"kind": "one_tower", "backbone": {"modality": "vision"}}, "task": {"name": "vqa"}}
    cfg = config_from_dict({**base, "data": {"dataset": "vqav2", "hf": {"path": "HuggingFaceM4/VQAv2"}}})
    assert (cfg.data.train_split, cfg.data.eval_split) == ("train", "validation")
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as error:
        config_from_dict({**base, "data": {"dataset": "vqav2", "hf": {"path": "x", "columns": {"question": "q"}}}})
    assert "data.hf.columns.question" in str(error.value)
    assert ", ".join(HF_COLUMNS["vqav2"]) in str(error.value)
    for data, problem in (({"dataset": "vqav2", "root": "/data", "hf": {"path": "x"}}, "two sources"),
                          ({"dataset": "easy_vqa", "hf": {"path": "x"}}, "easy_vqa is embedded"),
                          ({"dataset": "vqav2", "hf": {"path": "x", "format": "disk", "subset": "v2"}}, "subset")):
        with pytest.raises(ConfigError, match=problem):
            config_from_dict({**base, "data": data})
    with pytest.raises(ConfigError, match="names one corpus"):
        config_from_dict({"model": base["model"], "objectives": {"mlm": {}},
                          "data": {"dataset": "captions", "corpora": ["coco_caption", "vg"], "hf": {"path": "x"}}})
    snli = {**base, "task": {"name": "snli_ve"}}
    with pytest.raises(ConfigError, match="answer_min_count applies to dataset = \"vqav2\""):
        config_from_dict({**snli, "data": {"dataset": "snli_ve", "hf": {"path": "x", "answer_min_count": 2}}})
    stored = config_from_dict({**snli, "data": {"dataset": "snli_ve", "hf": {"path": "x"}}})
    assert config_from_dict(stored.to_dict()) == stored


def test_open_source_routes_by_the_preset(tmp_path: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(4))
    arrows = tmp_path / "arrows"
    write_vqav2(arrows, "train", n=2)
    base = {"model": {"kind": "one_tower", "backbone": {"modality": "vision"}}, "task": {"name": "vqa"}}
    from_hf = config_from_dict({**base, "data": {"dataset": "vqav2", "hf": {"path": str(root),
                                                                             "answer_min_count": 1}}})
    from_arrow = config_from_dict({**base, "data": {"dataset": "vqav2", "root": str(arrows)}})
    assert isinstance(open_source(from_hf, "vqav2", "train"), HFSource)
    assert isinstance(open_source(from_arrow, "vqav2", "train"), ArrowSource)


def vqa_preset(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "vqav2_hf.toml"
    path.write_text(f'extends = "{ONE_TOWER}"\n[data]\ndataset = "vqav2"\ntokenizer = "{TOKENIZER}"\n'
                    f'[data.hf]\npath = "{root}"\nanswer_min_count = 2\n'
                    "[train]\nmax_steps = 3\nbatch_size = 4\nlog_every = 1\neval_every = 2\ncpu_threads = 1\n")
    return path


def test_build_data_labels_the_eval_split_with_the_training_vocabulary(tmp_path: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(10), validation=vqa_split(5, start=10))
    data = build_data(load_preset(vqa_preset(tmp_path, root)), cache_dir=tmp_path / "cache")
    assert data.answers == ["yes", "2", "no"] and data.num_answers == 3
    assert len(data.train) == 10 and len(data.eval) == 5
    assert data.eval.source.answers == data.answers


@pytest.mark.slow
def test_ren_run_finetunes_and_evaluates_on_an_hf_vqav2_data_set(tmp_path: Path, ren_home: Path) -> None:
    root = write_disk(tmp_path / "disk", train=vqa_split(12), validation=vqa_split(6, start=12, corrupt=(14,)))
    result = ren("run", str(vqa_preset(tmp_path, root)), timeout=300,
                 env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(ren_home)
    (record,) = store.list_runs()
    assert record.status == "finished" and record.step == 3
    assert record.final_scores["eval_samples"] == 5  # 6 questions, one image unreadable
    assert 0.0 <= record.final_scores["vqa_accuracy"] <= 1.0  # the official scorer: HF rows keep raw answers
    assert [s for s, _ in store.series(record.id, "eval/vqa_accuracy")] == [2, 3]


def test_hf_vqav2_is_scored_with_the_official_vqa_accuracy(tmp_path: Path) -> None:
    import torch

    from engine.data.pipeline import build_tokenizer, eval_dataset
    from engine.evaluate import task_scores
    from engine.models import build_model
    from engine.vqa_answers import vqa_accuracy

    root = write_disk(tmp_path / "disk", train=vqa_split(10), validation=vqa_split(4, start=15))
    cfg = load_preset(vqa_preset(tmp_path, root))
    split = eval_dataset(cfg, "validation")
    assert split.answers == ["yes", "2", "no"]
    batch = split.dataset.__getitems__([0, 1, 2, 3])
    # question 16's annotators: "Two", "2", "two", "3": three 2s of four answers. ViLT's soft target for "2"
    # is 0.9 (its table assumes ten answers); the official leave-one-out mean is (3 x 2/3 + 1) / 4 = 0.75.
    assert batch["question_ids"][1] == 1016
    assert batch["labels"][1].tolist() == pytest.approx([0.0, 0.9, 0.0])
    assert batch["official_scores"][1].tolist() == pytest.approx([0.0, 0.75, 0.0])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=len(build_tokenizer(cfg)), num_answers=3).eval()
    result = task_scores(model, split.dataset, "vqa", batch_size=3, keep_predictions=True)
    assert result.metric == "vqa_accuracy" and result.samples == 4
    expected = [vqa_accuracy(split.answers[p], answers_of(q - 1000))
                for p, q in zip(result.predictions, result.question_ids, strict=True)]
    assert result.score == pytest.approx(sum(expected) / 4)
