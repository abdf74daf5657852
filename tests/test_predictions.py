"""Looking at the predictions: the categories of each data set, the score per category, which examples are kept
(the most confident errors and a sample), how they are stored, and `ren eval task --examples` end to end."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.errors import RenError
from engine.predictions import (
    CategoryScore,
    Example,
    SplitPredictions,
    breakdown,
    category_of,
    kept_predictions,
    load_predictions,
    pick_examples,
    save_predictions,
)
from engine.store import Store
from tests.helpers.cli import cli_streams, json_document

from .arrow_fixtures import write_nlvr2, write_snli_ve, write_vqav2

# --- categories ------------------------------------------------------------------------------------------------


def test_every_easy_vqa_answer_has_its_question_type() -> None:
    import easy_vqa

    from engine.data.easyvqa import PALETTE, SHAPES

    kinds = {answer: category_of("easy_vqa", answer) for answer in easy_vqa.get_answers()}
    assert Counter(kinds.values()) == {"colour": len(PALETTE), "shape": len(SHAPES), "yes/no": 2}
    assert kinds["circle"] == "shape" and kinds["teal"] == "colour" and kinds["no"] == "yes/no"
    # the package's own questions agree: every colour answer answers a question about colour, and so on
    questions, answers, _ = easy_vqa.get_test_questions()
    for question, answer in zip(questions, answers):
        if kinds[answer] == "colour":
            assert question.startswith("what") and "color" in question, question
        elif kinds[answer] == "shape":
            assert question.startswith("what") and "color" not in question, question


@pytest.mark.parametrize(("answer", "kind"), [
    ("yes", "yes/no"), ("No", "yes/no"), ("2", "number"), ("10", "number"), ("1,000", "number"),
    ("3.5", "number"), ("two", "number"), ("red", "other"), ("2 people", "other"), ("yes and no", "other"),
    ("", None),
])
def test_vqav2_answer_types(answer: str, kind: str | None) -> None:
    assert category_of("vqav2", answer) == kind


def test_labels_are_the_categories_of_the_classification_tasks() -> None:
    assert category_of("snli_ve", "entailment") == "entailment"
    assert category_of("nlvr2", "False") == "False"
    assert category_of("refcoco", "box 2") is None


# --- the score per category ------------------------------------------------------------------------------------


def test_breakdown_means_errors_and_order() -> None:
    categories = ["yes/no", "colour", None, "shape", "colour", "yes/no", "zebra"]
    scores = [1.0, 0.0, 0.0, 0.3, 1.0, 0.0, 0.6]
    rows = breakdown(categories, scores)
    assert [r.category for r in rows] == ["colour", "shape", "yes/no", "zebra", "all"]
    by = {r.category: r for r in rows}
    assert by["colour"] == CategoryScore("colour", 2, 0.5, 1)
    assert by["shape"] == CategoryScore("shape", 1, 0.3, 0)  # a partly right VQA answer is not an error
    assert by["yes/no"] == CategoryScore("yes/no", 2, 0.5, 1)
    assert by["all"].n == 7 and by["all"].errors == 3  # the item without a category counts in "all" only
    assert by["all"].score == pytest.approx(sum(scores) / 7)
    assert breakdown([], []) == ()
    with pytest.raises(ValueError, match="3 categories for 2 scores"):
        breakdown([None] * 3, [0.0] * 2)


# --- which examples are kept -----------------------------------------------------------------------------------


def test_kept_examples_are_the_most_confident_errors_then_a_sample() -> None:
    scores = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.3, 1.0, 0.0, 1.0]
    confidence = [0.9, 0.99, 0.2, 0.95, 0.5, 0.9, 0.1, 0.6, 0.4, 0.7]
    picked = pick_examples(scores, confidence, 5)
    assert picked[:3] == [(3, "confident error"), (0, "confident error"), (5, "confident error")]  # 0 before 5: tie
    sample = [i for i, why in picked[3:]]
    assert [why for _, why in picked[3:]] == ["sample", "sample"] and sample == sorted(sample)
    assert not set(sample) & {0, 3, 5} and len(set(sample)) == 2
    assert pick_examples(scores, confidence, 5) == picked  # the same items every time
    assert pick_examples(scores, confidence, 4)[:2] == [(3, "confident error"), (0, "confident error")]
    assert pick_examples(scores, confidence, 0) == []
    everything = pick_examples(scores, confidence, 50)
    assert sorted(i for i, _ in everything) == list(range(10))  # fewer items than asked: each once
    assert [i for i, why in everything if why == "confident error"] == [3, 0, 5, 8, 2]  # all errors, surest first
    # no errors at all: a sample of n
    assert [why for _, why in pick_examples([1.0] * 8, [0.5] * 8, 3)] == ["sample"] * 3
    with pytest.raises(ValueError):
        pick_examples(scores, confidence, -1)


def test_the_sample_draws_every_other_item_alike() -> None:
    """Over many seeds, each item that is not a confident error is sampled about as often as any other (a
    chi-square test at the 0.1% level), and the confident errors never are."""
    scores = [0.0 if i % 4 == 0 else 1.0 for i in range(40)]
    confidence = [(i * 7919 % 101) / 101 for i in range(40)]
    counts: Counter[int] = Counter()
    seeds = 2000
    for seed in range(seeds):
        picked = pick_examples(scores, confidence, 8, seed=seed)
        counts.update(i for i, why in picked if why == "sample")
    confident = {i for i, why in pick_examples(scores, confidence, 8) if why == "confident error"}
    assert len(confident) == 4 and not confident & set(counts)
    others = [i for i in range(40) if i not in confident]
    expected = seeds * 4 / len(others)
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in others)
    assert chi2 < 67.0, chi2  # 35 degrees of freedom: the 99.9% quantile is 66.6


# --- storing them ----------------------------------------------------------------------------------------------


def _png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def _predictions(run_id: str, split: str, n: int) -> SplitPredictions:
    examples = tuple(Example(i, f"question {i}?", f"file.arrow row {i}", f"{i}.png", "red", "blue" if i else "red",
                             0.0 if i else 1.0, 0.5, "colour", "sample") for i in range(n))
    return SplitPredictions(run_id, "vqa", "easy_vqa", split, "vqa_score", 0.25, 4, "question type",
                            (CategoryScore("colour", 4, 0.25, 3), CategoryScore("all", 4, 0.25, 3)), examples, 1.0)


def test_predictions_round_trip_and_replace_whole(tmp_path: Path) -> None:
    kept = _predictions("r1", "val", 3)
    folder = save_predictions(tmp_path, kept, {f"{i}.png": _png("red") for i in range(3)})
    (loaded,) = load_predictions(tmp_path)
    assert loaded == kept and loaded.directory == folder and loaded.key == "easy_vqa/val"
    assert [e.error for e in loaded.examples] == [False, True, True]
    assert Image.open(loaded.thumbnail_path(loaded.examples[2])).getpixel((0, 0)) == (255, 0, 0)
    assert json.loads((folder / "examples.json").read_text())["schema"] == "ren.predictions/1"

    again = _predictions("r1", "val", 1)  # a second evaluation of the split replaces the first, pictures too
    save_predictions(tmp_path, again, {"0.png": _png("blue")})
    save_predictions(tmp_path, _predictions("r1", "test", 2), {"0.png": _png("red"), "1.png": _png("red")})
    val, test = sorted(load_predictions(tmp_path), key=lambda p: p.split, reverse=True)
    assert (val.split, len(val.examples), test.split, len(test.examples)) == ("val", 1, "test", 2)
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "examples.json"]
    assert Image.open(val.thumbnail_path(val.examples[0])).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["easy_vqa-test", "easy_vqa-val"]


def test_a_half_written_folder_is_not_read_and_a_damaged_file_is_named(tmp_path: Path) -> None:
    save_predictions(tmp_path, _predictions("r1", "val", 1), {"0.png": _png("red")})
    killed = tmp_path / "predictions" / ".easy_vqa-val.1234abcd"  # a kill before examples.json was written
    killed.mkdir()
    (killed / "0.png").write_bytes(b"\x89PNG")
    assert [p.split for p in load_predictions(tmp_path)] == ["val"]
    assert load_predictions(tmp_path / "nowhere") == []
    damaged = tmp_path / "predictions" / "easy_vqa-val" / "examples.json"
    damaged.write_text("{")
    with pytest.raises(RenError, match=rf"Cannot read the kept predictions {damaged}: .*ren eval task RUN"):
        load_predictions(tmp_path)


# --- what each data set shows of an item -----------------------------------------------------------------------


def _arrow_set(kind: str, root: Path):
    from engine.data.arrow import open_split
    from engine.data.images import image_transform
    from engine.data.nlvr2 import ArrowNLVR2Dataset
    from engine.data.snli_ve import ArrowSNLIVEDataset
    from engine.data.tokenizer import build_word_tokenizer
    from engine.data.transforms import HALF
    from engine.data.vqav2 import ArrowVQADataset

    from .arrow_fixtures import WORDS

    tokenizer, transform = build_word_tokenizer(WORDS), image_transform(32, train=False)
    source = open_split(root, kind, "train")
    if kind == "nlvr2":
        return ArrowNLVR2Dataset(source, tokenizer, 24, transform, HALF)
    if kind == "snli_ve":
        return ArrowSNLIVEDataset(source, tokenizer, 24, transform, HALF)
    return ArrowVQADataset(source, tokenizer, 24, transform, HALF, num_answers=64)


def test_an_item_is_described_by_its_own_text_file_row_and_images(tmp_path: Path) -> None:
    written = write_nlvr2(tmp_path, "train", n=3)
    dataset = _arrow_set("nlvr2", tmp_path)
    view = dataset.describe(3)  # row 1, second sentence
    row = dataset.source.row(1, ("questions",))
    assert view.text == row["questions"][1] and view.image == f"{written.path} row 1"
    pair = [dataset.source.image(1, column).tobytes() for column in ("image_0", "image_1")]
    assert [p.tobytes() for p in view.pictures] == pair

    write_snli_ve(tmp_path, "train", n=2)
    snli = _arrow_set("snli_ve", tmp_path)
    view = snli.describe(4)  # row 1, second pair: the hypothesis, not the premise
    assert view.text == snli.source.row(1, ("sentences",))["sentences"][1][1].strip() and len(view.pictures) == 1


def test_batches_name_the_items_they_kept(tmp_path: Path) -> None:
    """An item whose image cannot be decoded is left out of its batch; ``items`` says which items remain, so
    each score is matched with its own item."""
    write_vqav2(tmp_path, "train", n=4, questions_per_image=2, corrupt=(1,))
    dataset = _arrow_set("vqav2", tmp_path)
    batch = dataset.__getitems__([0, 2, 3, 5, 6])  # 2 and 3 are the questions of the unreadable row 1
    assert batch["items"].tolist() == [0, 5, 6]
    assert batch["question_ids"].tolist() == [dataset.source.row(int(dataset.rows[i]), ("question_id",))[
        "question_id"][int(dataset.slots[i])] for i in (0, 5, 6)]
    assert dataset.describe(2).pictures == ()


# --- ren eval task --examples, end to end ----------------------------------------------------------------------


def test_eval_task_keeps_the_breakdown_and_the_most_confident_errors(
        ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny easy-VQA finetune evaluated with --examples 6: the per-category scores and the kept examples agree
    with the model's outputs computed here, item by item, and with the easy_vqa package's own questions."""
    import easy_vqa

    from engine.evaluate import load_task_eval
    from engine.train import task_logits, train
    from tests.helpers.training import start, tiny_finetune

    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache, max_steps=6, eval_every=6, checkpoint_every=6))
    train(cfg, store, run_id)
    code, out, err = cli_streams(["eval", "task", run_id, "--json", "--examples", "6", "--batch-size", "512",
                                  "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, err
    doc = json_document(out)

    # the model's outputs, item by item, computed here
    run = load_task_eval(store, run_id, "val")
    dataset, answers = run.data.dataset, run.data.answers
    batch = dataset.__getitems__(list(range(len(dataset))))
    with torch.no_grad():
        logits = task_logits(run.model, batch).float()
    predicted = logits.argmax(1)
    confidence = torch.sigmoid(logits.max(1).values)  # a VQA head trained with BCE: independent outputs
    truth = batch["answer_ids"]
    right = (predicted == truth).double()
    kinds = {"yes": "yes/no", "no": "yes/no", **{s: "shape" for s in ("circle", "rectangle", "triangle")}}
    category = [kinds.get(answers[t], "colour") for t in truth.tolist()]

    expected = {}
    for name in ("colour", "shape", "yes/no"):
        rows = [i for i, c in enumerate(category) if c == name]
        expected[name] = (len(rows), float(right[rows].mean()), sum(1 for i in rows if right[i] == 0))
    expected["all"] = (len(dataset), float(right.mean()), int((right == 0).sum()))
    got = {c["category"]: (c["n"], c["score"], c["errors"]) for c in doc["breakdown"]["categories"]}
    assert doc["breakdown"]["kind"] == "question type" and list(got) == ["colour", "shape", "yes/no", "all"]
    for name, (n, score, errors) in expected.items():
        assert got[name][0] == n and got[name][2] == errors and got[name][1] == pytest.approx(score, abs=1e-9)
    assert got["all"][1] == pytest.approx(doc["score"], abs=1e-9)

    (kept,) = kept_predictions(store, run_id)
    assert doc["examples"] == {"kept": 6, "path": str(kept.directory)}
    assert (kept.key, kept.metric, kept.samples) == ("easy_vqa/val", "vqa_score", len(dataset))
    errors = [i for i in range(len(dataset)) if right[i] == 0]
    assert len(errors) >= 3, "the tiny model should still be wrong often"
    surest = sorted(errors, key=lambda i: (-float(confidence[i]), i))[:3]
    assert [e.index for e in kept.examples[:3]] == surest
    assert [e.why for e in kept.examples] == ["confident error"] * 3 + ["sample"] * 3
    train_questions = list(zip(*easy_vqa.get_train_questions()))  # (question, answer, image id)
    for example in kept.examples:
        i = example.index
        assert example.prediction == answers[predicted[i]] and example.truth == answers[truth[i]]
        assert example.score == float(right[i]) and example.category == category[i]
        assert math.isclose(example.confidence, float(confidence[i]), rel_tol=1e-5)
        image_id = int(example.image.removeprefix("easy_vqa train/images/").removesuffix(".png"))
        assert (example.text, example.truth, image_id) in train_questions
        assert image_id % 10 == 9  # easy-VQA's val split: every 10th training image
        picture = Image.open(kept.thumbnail_path(example))
        assert picture.tobytes() == dataset.describe(i).pictures[0].tobytes()

    # --examples 0 keeps the breakdown alone, and replaces the pictures kept before
    code, out, err = cli_streams(["eval", "task", run_id, "--examples", "0", "--batch-size", "512", "--device", "cpu"],
                                 monkeypatch, capsys)
    assert code == 0, err
    assert "question type" in out and "yes/no" in out
    (kept,) = kept_predictions(store, run_id)
    assert kept.examples == () and [p.name for p in kept.directory.iterdir()] == ["examples.json"]
    assert [row.category for row in kept.breakdown] == ["colour", "shape", "yes/no", "all"]

    code, out, err = cli_streams(["eval", "task", run_id, "--examples", "-1"], monkeypatch, capsys)
    assert code == 2 and "--examples must be 0 or more, got -1" in err


def test_the_sample_is_random_over_the_split_not_its_first_items() -> None:
    """A guard on pick_examples' use of positions: with 10,000 right items, the sampled positions spread over the
    whole range."""
    picked = pick_examples([1.0] * 10_000, [0.5] * 10_000, 200)
    positions = [i for i, _ in picked]
    assert max(positions) > 9_000 and min(positions) < 1_000
    assert sum(p < 5_000 for p in positions) == pytest.approx(100, abs=30)
