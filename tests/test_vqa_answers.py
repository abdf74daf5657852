"""VQAv2 answer processing: the official normalisation and accuracy, vocabulary, soft targets, submission, loading."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import RenError
from engine.vqa_answers import (
    VQAExample,
    answer_forms,
    batch_vqa_score,
    build_answer_vocab,
    load_vqa_json,
    normalize_answer,
    official_targets,
    soft_score,
    soft_targets,
    target_vector,
    vqa_accuracy,
    write_submission,
)

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("raw", "expected"), [
    # punctuation not touching a space becomes a space
    ("Yes!", "yes"),
    ("t-shirt", "t shirt"),
    ("red,white", "red white"),
    ("(left)", "left"),
    ("a/b", "b"),  # "a b", then the article "a" is dropped
    # punctuation touching a space is removed
    ("red, white", "red white"),
    ("yes !", "yes"),
    ("t-shirt - red", "tshirt red"),  # the mark touches a space somewhere, so every occurrence is removed
    # a comma between digits removes every punctuation mark
    ("1,000", "1000"),
    ("1,000 (approx)", "1000 approx"),
    ("2,5-3", "253"),
    ("1,000 t-shirts", "1000 tshirts"),
    # periods: kept before a digit, removed otherwise
    ("3.5", "3.5"),
    (".5", ".5"),
    ("3.", "3"),
    ("e.g.", "eg"),
    ("Mr. Smith.", "mr smith"),
    # number words to digits ("none" and "zero" to 0; only up to ten)
    ("Two", "2"),
    ("none", "0"),
    ("zero", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("one or two", "1 or 2"),
    # articles dropped
    ("the dog", "dog"),
    ("A cat", "cat"),
    ("an apple on the table", "apple on table"),
    ("The", ""),
    ("theater", "theater"),
    # contractions (after lowercasing); apostrophes and colons are not punctuation in the master list
    ("dont", "don't"),
    ("Dont know", "don't know"),
    ("youre", "you're"),
    ("don't", "don't"),
    ("somebody'd", "somebodyd"),
    ("10:30", "10:30"),
    # whitespace, newlines and tabs
    ("  Two\tDogs\n", "2 dogs"),
    ("hot   dog", "hot dog"),
])
def test_normalize_answer_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_strips_at_most_32_periods_like_the_official_call() -> None:
    # The official code passes re.UNICODE (32) as re.sub's count.
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("." * 32) == ""


def test_normalize_answer_is_idempotent_on_typical_answers() -> None:
    for raw in ["Two dogs.", "t-shirt", "1,000", "dont", "the red one"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


# --------------------------------------------------------------------------- official accuracy


def _answers(prediction: str, matches: int, other: str = "blue") -> list[str]:
    return [prediction] * matches + [other] * (10 - matches)


@pytest.mark.parametrize(("matches", "expected"), [
    (0, 0.0),
    (1, 9 * (1 / 3) / 10),  # nine subsets hold the one match, the tenth none
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # = 0.9
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out_mean(matches: int, expected: float) -> None:
    assert vqa_accuracy("red", _answers("red", matches)) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_matches_the_maintainers_worked_example() -> None:
    # GT-Vision-Lab/VQA issue #1: 8 "yes" and 2 "no" give "no" 0.6 and "yes" 1.0.
    gt = ["yes"] * 8 + ["no"] * 2
    assert vqa_accuracy("no", gt) == pytest.approx(0.6)
    assert vqa_accuracy("yes", gt) == 1.0
    assert vqa_accuracy("maybe", gt) == 0.0


@pytest.mark.parametrize("matches", range(11))
def test_vqa_accuracy_with_ten_answers_equals_the_soft_score(matches: int) -> None:
    assert vqa_accuracy("red", _answers("red", matches)) == pytest.approx(soft_score(matches), abs=1e-12)


def test_vqa_accuracy_normalises_both_sides_when_annotators_disagree() -> None:
    gt = ["two", "2", "Two", "2 ", "two.", "three", "3", "3", "Three", "3"]
    assert vqa_accuracy("2", gt) == 1.0  # the ground truth is normalised: five annotators said 2
    assert vqa_accuracy("Two!", gt) == 1.0  # and so is the prediction
    assert vqa_accuracy("the 3", gt) == 1.0
    assert vqa_accuracy("4", gt) == 0.0


def test_vqa_accuracy_compares_verbatim_when_annotators_agree() -> None:
    # The official code skips normalisation when all answers are the same string (after whitespace clean-up).
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("the cat", ["the cat"] * 10) == 1.0
    assert vqa_accuracy("cat", ["the cat"] * 10) == 0.0
    # Whitespace differences alone do not make the annotators disagree.
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yes\t"]) == 0.0


def test_vqa_accuracy_rejects_missing_answers() -> None:
    with pytest.raises(RenError, match="annotators' answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(RenError, match="annotators' answers"):
        vqa_accuracy("yes", "yes")


# --------------------------------------------------------------------------- vocabulary and soft targets


def test_build_answer_vocab_counts_normalised_answers_and_orders_them() -> None:
    lists = ([["yes"]] * 5 + [["Yes."]] * 4 + [["two"]] * 9 + [["2"]] + [["no"]] * 9 + [["cat"]] * 8
             + [["the"]] * 20)
    assert build_answer_vocab(lists) == ["2", "no", "yes"]  # 10, then 9 and 9 alphabetically; "" left out
    assert build_answer_vocab(lists, min_count=8) == ["2", "no", "yes", "cat"]
    assert build_answer_vocab(lists, min_count=11) == []


def test_build_answer_vocab_counts_every_answer_of_every_list() -> None:
    lists = [["red", "red", "Red", "blue"], ["red", "blue", "blue"], ["green"]]
    assert build_answer_vocab(lists, min_count=1) == ["red", "blue", "green"]
    assert build_answer_vocab(lists, min_count=3) == ["red", "blue"]
    assert build_answer_vocab(iter(lists), min_count=4) == ["red"]


def test_build_answer_vocab_rejects_bad_input() -> None:
    with pytest.raises(RenError, match="item 1 is the string 'no'"):
        build_answer_vocab([["yes"], "no"])
    with pytest.raises(RenError, match="min_count must be at least 1"):
        build_answer_vocab([["yes"]], min_count=0)


def test_soft_score_table() -> None:
    assert [soft_score(count) for count in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    assert soft_score(10) == 1.0
    with pytest.raises(RenError, match="negative"):
        soft_score(-1)


def test_soft_targets_counts_normalised_answers_and_drops_unknown_ones() -> None:
    vocab_index = {"2": 0, "3": 1, "cat": 2, "dog": 3}
    answers = ["Two", "2", "two", "3", "cat", "the cat", "bird", "bird", "bird", "bird"]
    labels, scores = soft_targets(answers, vocab_index)
    assert labels == [0, 1, 2]
    assert scores == [0.9, 0.3, 0.6]
    assert soft_targets(["bird"] * 10, vocab_index) == ([], [])
    assert soft_targets(["dog"] * 10, vocab_index) == ([3], [1.0])


def test_target_vector_places_scores_at_labels() -> None:
    vector = target_vector([2, 0], [0.6, 0.9], 4)
    assert vector.dtype == torch.float32
    assert torch.equal(vector, torch.tensor([0.9, 0.0, 0.6, 0.0]))
    assert torch.equal(target_vector([], [], 3), torch.zeros(3))
    with pytest.raises(RenError, match="2 labels but 1 scores"):
        target_vector([0, 1], [0.3], 4)
    with pytest.raises(RenError, match=r"labels \[4\] are outside the answer vocabulary of 4"):
        target_vector([1, 4], [0.3, 0.6], 4)


def test_batch_vqa_score_is_the_target_score_of_the_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.5]], requires_grad=True)
    targets = torch.tensor([[0.3, 0.9, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, 0.3]])
    scores = batch_vqa_score(logits, targets)
    assert scores.shape == (4,)
    assert not scores.requires_grad
    assert torch.allclose(scores, torch.tensor([0.9, 0.0, 1.0, 0.0]))
    with pytest.raises(RenError, match=r"\(4, 3\) and target scores \(4, 2\)"):
        batch_vqa_score(logits, targets[:, :2])
    with pytest.raises(RenError, match="must both be"):
        batch_vqa_score(logits[0], targets[0])


# --------------------------------------------------------------------------- submission


def test_write_submission_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results" / "vqav2_test-dev_results.json"
    write_submission([np.int64(4195880), 4195881, 262148000], ["yes", "2", "red"], path)
    assert json.loads(path.read_text()) == [
        {"question_id": 4195880, "answer": "yes"},
        {"question_id": 4195881, "answer": "2"},
        {"question_id": 262148000, "answer": "red"},
    ]
    write_submission([1], ["no"], path)  # replaces the previous file
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "no"}]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_write_submission_rejects_mismatched_or_repeated_ids(tmp_path: Path) -> None:
    path = tmp_path / "results" / "vqav2_test-dev_results.json"
    with pytest.raises(RenError, match="3 question ids but 2 answers"):
        write_submission([1, 2, 3], ["yes", "no"], path)
    with pytest.raises(RenError, match=r"question ids \[2\] appear more than once"):
        write_submission([1, 2, 2], ["yes", "no", "red"], path)
    assert not path.parent.exists()


# --------------------------------------------------------------------------- loading the original files

QUESTIONS_NAME = "v2_OpenEnded_mscoco_train2014_questions.json"
ANNOTATIONS_NAME = "v2_mscoco_train2014_annotations.json"
INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
        "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0 "
           "International License"}


def _questions_file() -> dict:
    return {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE,
            "data_subtype": "train2014", "questions": [
                {"image_id": 458752, "question": "What is this photo taken looking through?",
                 "question_id": 458752000},
                {"image_id": 458752, "question": "What position is this man playing?", "question_id": 458752001},
                {"image_id": 262146, "question": "How many people are in the photo?", "question_id": 262146000},
            ]}


def _annotation(question_id: int, image_id: int, answers: list[str], majority: str, answer_type: str,
                question_type: str) -> dict:
    confidences = ["yes", "yes", "maybe", "yes", "no", "yes", "yes", "yes", "maybe", "yes"]
    return {"question_type": question_type, "multiple_choice_answer": majority, "answers": [
        {"answer": answer, "answer_confidence": confidences[position], "answer_id": position + 1}
        for position, answer in enumerate(answers)],
        "image_id": image_id, "answer_type": answer_type, "question_id": question_id}


def _annotations_file() -> dict:
    return {"info": INFO, "license": LICENSE, "data_subtype": "train2014", "data_type": "mscoco", "annotations": [
        _annotation(458752000, 458752, ["net"] * 8 + ["netting", "mesh"], "net", "other", "what is this"),
        _annotation(458752001, 458752, ["pitcher"] * 9 + ["catcher"], "pitcher", "other", "what"),
        _annotation(262146000, 262146, ["2", "two", "2", "3", "2", "2", "2", "2", "1", "2"], "2", "number",
                    "how many"),
    ]}


def _write(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_load_vqa_json_reads_questions_and_annotations(tmp_path: Path) -> None:
    examples = load_vqa_json(_write(tmp_path / QUESTIONS_NAME, _questions_file()),
                             _write(tmp_path / ANNOTATIONS_NAME, _annotations_file()))
    assert [example.question_id for example in examples] == [458752000, 458752001, 262146000]
    assert examples[1] == VQAExample(question_id=458752001, image_id=458752,
                                     question="What position is this man playing?",
                                     answers=("pitcher",) * 9 + ("catcher",), multiple_choice_answer="pitcher",
                                     answer_type="other")
    assert examples[2].answers[:4] == ("2", "two", "2", "3")
    # The pieces work together: vocabulary from the majority answers, soft targets from the ten answers.
    vocab = build_answer_vocab([[example.multiple_choice_answer] for example in examples], min_count=1)
    assert vocab == ["2", "net", "pitcher"]
    index = {answer: label for label, answer in enumerate(vocab)}
    assert soft_targets(examples[2].answers, index) == ([0], [1.0])
    assert soft_targets(examples[0].answers, index) == ([1], [1.0])
    assert vqa_accuracy("2", examples[2].answers) == 1.0
    assert vqa_accuracy("3", examples[2].answers) == pytest.approx(0.3)


def test_load_vqa_json_reads_test_dev_questions_only(tmp_path: Path) -> None:
    content = _questions_file() | {"data_subtype": "test-dev2015"}
    examples = load_vqa_json(_write(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json", content), None)
    assert len(examples) == 3
    assert examples[0] == VQAExample(458752000, 458752, "What is this photo taken looking through?")
    assert all(example.answers == () and example.multiple_choice_answer is None for example in examples)


def test_load_vqa_json_missing_files(tmp_path: Path) -> None:
    questions = _write(tmp_path / QUESTIONS_NAME, _questions_file())
    with pytest.raises(RenError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json does not exist"):
        load_vqa_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", None)
    with pytest.raises(RenError, match=rf"{ANNOTATIONS_NAME} does not exist.*'annotations'"):
        load_vqa_json(questions, tmp_path / ANNOTATIONS_NAME)


def test_load_vqa_json_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / QUESTIONS_NAME
    path.write_text('{"questions": [{"image_id": 1,\n "question": }]}', encoding="utf-8")
    with pytest.raises(RenError, match=rf"{QUESTIONS_NAME} is not valid JSON \(line 2, column 14"):
        load_vqa_json(path, None)
    assert gc.isenabled()  # the collector, paused while loading, is back on after a failure


def test_load_vqa_json_missing_top_level_key(tmp_path: Path) -> None:
    content = _questions_file()
    content["question"] = content.pop("questions")
    with pytest.raises(RenError, match=rf"{QUESTIONS_NAME} has no top-level key 'questions'"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, content), None)


@pytest.mark.parametrize("key", ["image_id", "question", "question_id"])
def test_load_vqa_json_question_missing_key(tmp_path: Path, key: str) -> None:
    content = _questions_file()
    del content["questions"][1][key]
    with pytest.raises(RenError, match=rf"{QUESTIONS_NAME}: questions\[1\] has no key '{key}'"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, content), None)


@pytest.mark.parametrize("key", ["question_id", "image_id", "answers", "multiple_choice_answer", "answer_type"])
def test_load_vqa_json_annotation_missing_key(tmp_path: Path, key: str) -> None:
    content = _annotations_file()
    del content["annotations"][2][key]
    with pytest.raises(RenError, match=rf"{ANNOTATIONS_NAME}: annotations\[2\] has no key '{key}'"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, _questions_file()),
                      _write(tmp_path / ANNOTATIONS_NAME, content))


def test_load_vqa_json_answer_missing_key_and_wrong_types(tmp_path: Path) -> None:
    questions = _write(tmp_path / QUESTIONS_NAME, _questions_file())
    content = _annotations_file()
    del content["annotations"][0]["answers"][3]["answer"]
    with pytest.raises(RenError, match=r"annotations\[0\]\.answers\[3\] has no key 'answer'"):
        load_vqa_json(questions, _write(tmp_path / ANNOTATIONS_NAME, content))
    content = _annotations_file()
    content["annotations"][1]["answers"] = []
    with pytest.raises(RenError, match=r"annotations\[1\] \(question 458752001\) has an empty 'answers' list"):
        load_vqa_json(questions, _write(tmp_path / ANNOTATIONS_NAME, content))
    content = _questions_file()
    content["questions"][2]["question_id"] = "262146000"
    with pytest.raises(RenError, match=r"questions\[2\] has 'question_id' = '262146000', expected an integer"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, content), None)


def test_load_vqa_json_annotation_without_question(tmp_path: Path) -> None:
    content = _annotations_file()
    content["annotations"].append(_annotation(393225000, 393225, ["yes"] * 10, "yes", "yes/no", "is the"))
    with pytest.raises(RenError, match=rf"annotations\[3\] annotates question 393225000, which is not in the "
                                       rf"questions file .*{QUESTIONS_NAME}"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, _questions_file()),
                      _write(tmp_path / ANNOTATIONS_NAME, content))


def test_load_vqa_json_question_without_annotation(tmp_path: Path) -> None:
    content = _annotations_file()
    del content["annotations"][1]
    with pytest.raises(RenError, match=r"no annotation for 1 question\(s\) .* \(first: \[458752001\]\)"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, _questions_file()),
                      _write(tmp_path / ANNOTATIONS_NAME, content))


def test_load_vqa_json_inconsistent_records(tmp_path: Path) -> None:
    questions = _write(tmp_path / QUESTIONS_NAME, _questions_file())
    content = _annotations_file()
    content["annotations"][2]["image_id"] = 262147
    with pytest.raises(RenError, match=r"annotations\[2\] gives question 262146000 image_id 262147, but .* gives "
                                       r"image_id 262146"):
        load_vqa_json(questions, _write(tmp_path / ANNOTATIONS_NAME, content))
    content = _annotations_file()
    content["annotations"].append(content["annotations"][0])
    with pytest.raises(RenError, match=r"annotations\[3\] is a second annotation of question 458752000"):
        load_vqa_json(questions, _write(tmp_path / ANNOTATIONS_NAME, content))
    content = _questions_file()
    content["questions"].append(content["questions"][0])
    with pytest.raises(RenError, match=r"questions\[3\] repeats question_id 458752000"):
        load_vqa_json(_write(tmp_path / QUESTIONS_NAME, content), None)


@pytest.mark.parametrize("gt", [["2"] * 3 + ["two"] * 2 + ["yes"] * 5,  # disagree: both sides normalised
                                ["Two"] * 10,  # all agree: compared verbatim, so "two" scores 0
                                ["yes", "Yes.", "no"],  # fewer than ten answers: leave-one-out over three
                                ["a dog", "dog", "dogs", "the dog", "cat"]])
def test_official_targets_give_each_answer_its_official_accuracy(gt: list[str]) -> None:
    vocab = ["yes", "no", "2", "two", "Two", "dog", "dogs", "cat", ""]
    target = official_targets(gt, vocab, answer_forms(vocab))
    assert target.dtype == torch.float32 and target.shape == (len(vocab),)
    assert target.tolist() == pytest.approx([vqa_accuracy(a, gt) if a else 0.0 for a in vocab])
