"""VQAv2 answers: the official normalisation and accuracy, the answer vocabulary, soft targets, submissions.

Normalisation and accuracy reproduce GT-Vision-Lab/VQA's ``vqaEval.py``; the vocabulary and soft targets
follow ViLT's ``write_vqa.py`` and ``get_score``. Each step, and where ren differs (soft targets normalise
the annotators' answers first): docs/PROTOCOLS.md, "VQA scoring".
"""

from __future__ import annotations

import functools
import gc
import json
import operator
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import RenError
from engine.store import follow_umask

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official table, less its four capitalised keys ("Id've", "I'dve", "Im", "Ive"): the text is
# lowercased before the lookup, so those can never match.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9)
VILT_MIN_COUNT = 9

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" opens with a lookahead (not a lookbehind) that always
# succeeds before a period, so it removes exactly the periods not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = re.UNICODE.value  # 32: the count the official call passes by accident.
_KIND_NAMES = {int: "an integer", str: "a string", list: "a list"}


@dataclass(frozen=True)
class VQAExample:
    """One VQAv2 question; ``answers`` are the annotators' answers as written (empty for test splits)."""

    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] = ()
    multiple_choice_answer: str | None = None
    answer_type: str | None = None


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    remove_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if remove_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _process_digit_article(text: str) -> str:
    words = (NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


@functools.lru_cache(maxsize=1 << 20)
def _normal_form(cleaned: str) -> str:
    """Punctuation, then digits/articles/contractions; cached, as VQAv2 repeats a few hundred thousand answers."""
    return _process_digit_article(_process_punctuation(cleaned))


def normalize_answer(text: str) -> str:
    """The official VQA normalisation of one answer (whitespace, punctuation, then digits/articles/contractions)."""
    return _normal_form(_clean_whitespace(text))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """The official VQA accuracy of ``prediction`` against the annotators' ``gt_answers`` (in [0, 1])."""
    if isinstance(gt_answers, str) or len(gt_answers) == 0:
        raise RenError(f"vqa_accuracy needs the list of annotators' answers (VQAv2 has 10 per question); "
                       f"got {gt_answers!r}.")
    references = [_clean_whitespace(answer) for answer in gt_answers]
    predicted = _clean_whitespace(prediction)
    if len(set(references)) > 1:
        references = [_normal_form(answer) for answer in references]
        predicted = _normal_form(predicted)
    matches = sum(reference == predicted for reference in references)
    per_subset = [min(1.0, (matches - (reference == predicted)) / 3) for reference in references]
    return sum(per_subset) / len(per_subset)


def answer_forms(vocab: Sequence[str]) -> dict[str, list[int]]:
    """The ids of the vocabulary's answers by each answer's whitespace-cleaned and normalised form (what
    :func:`official_targets` looks candidates up in)."""
    forms: dict[str, list[int]] = {}
    for label, answer in enumerate(vocab):
        for form in {_clean_whitespace(answer), normalize_answer(answer)} if answer else ():
            forms.setdefault(form, []).append(label)
    return forms


def official_targets(gt_answers: Sequence[str], vocab: Sequence[str], forms: Mapping[str, Sequence[int]]
                     ) -> torch.Tensor:
    """Each vocabulary answer's official accuracy (:func:`vqa_accuracy`) against the annotators' ``gt_answers``,
    as a float32 vector of length ``len(vocab)``: its entry at the predicted answer is the prediction's official
    score. An answer can score above 0 only when its cleaned form equals an annotator's (annotators agree) or its
    normalised form does (they disagree), so only those (looked up in ``forms``, :func:`answer_forms`) are scored."""
    target = torch.zeros(len(vocab), dtype=torch.float32)
    labels = {label for answer in gt_answers for form in (_clean_whitespace(answer), normalize_answer(answer))
              for label in forms.get(form, ())}
    for label in labels:
        target[label] = vqa_accuracy(vocab[label], gt_answers)
    return target


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], min_count: int = VILT_MIN_COUNT) -> list[str]:
    """The normalised answers seen at least ``min_count`` times over all lists, by count (descending), then
    alphabetically. An answer that normalises to the empty string is left out. ViLT/METER pass one list per
    train2014 + val2014 question holding its ``multiple_choice_answer``, with ``min_count`` 9."""
    if min_count < 1:
        raise RenError(f"build_answer_vocab: min_count must be at least 1, got {min_count}.")
    counts: Counter[str] = Counter()
    for index, answers in enumerate(answer_lists):
        if isinstance(answers, str):
            raise RenError(f"build_answer_vocab: item {index} is the string {answers!r}; each item must be a "
                           "list of answers (e.g. [example.multiple_choice_answer]).")
        counts.update(normalize_answer(answer) for answer in answers)
    kept = [answer for answer, count in counts.items() if count >= min_count and answer]
    return sorted(kept, key=lambda answer: (-counts[answer], answer))


def soft_score(count: int) -> float:
    """ViLT's ``get_score``: the target score of an answer given by ``count`` annotators."""
    if count < 0:
        raise RenError(f"soft_score: an answer count cannot be negative, got {count}.")
    return SOFT_SCORES[count] if count < len(SOFT_SCORES) else 1.0


def soft_targets(answers: Sequence[str], vocab_index: Mapping[str, int]) -> tuple[list[int], list[float]]:
    """The labels and soft scores of one question's annotator answers, in first-seen order; answers outside
    ``vocab_index`` (keyed by normalised answer) are dropped."""
    counts: dict[str, int] = {}
    for answer in answers:
        normal = normalize_answer(answer)
        counts[normal] = counts.get(normal, 0) + 1
    labels: list[int] = []
    scores: list[float] = []
    for answer, count in counts.items():
        label = vocab_index.get(answer)
        if label is not None:
            labels.append(label)
            scores.append(soft_score(count))
    return labels, scores


def target_vector(labels: Sequence[int], scores: Sequence[float], num_answers: int) -> torch.Tensor:
    """A float32 vector of length ``num_answers`` holding ``scores`` at ``labels`` and 0 elsewhere (BCE target)."""
    if len(labels) != len(scores):
        raise RenError(f"target_vector: {len(labels)} labels but {len(scores)} scores; they must pair up.")
    bad = [label for label in labels if not 0 <= label < num_answers]
    if bad:
        raise RenError(f"target_vector: labels {bad} are outside the answer vocabulary of {num_answers} answers.")
    target = torch.zeros(num_answers, dtype=torch.float32)
    if labels:
        target[torch.as_tensor(list(labels), dtype=torch.long)] = torch.as_tensor(list(scores), dtype=torch.float32)
    return target


def batch_vqa_score(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Per example, the target score of the arg-max answer (ViLT's training-time VQA score); shape ``(batch,)``."""
    if logits.dim() != 2 or logits.shape != target_scores.shape:
        raise RenError(f"batch_vqa_score: logits {tuple(logits.shape)} and target scores "
                       f"{tuple(target_scores.shape)} must both be (batch, answers).")
    best = logits.detach().argmax(dim=1, keepdim=True)
    return target_scores.detach().gather(1, best).squeeze(1).float()


def write_submission(question_ids: Sequence[int], answers: Sequence[str], path: Path) -> None:
    """Write the EvalAI result file ``[{"question_id": int, "answer": str}, ...]`` atomically."""
    if len(question_ids) != len(answers):
        raise RenError(f"Cannot write the VQA submission {path}: {len(question_ids)} question ids but "
                       f"{len(answers)} answers; there must be one answer per question.")
    ids = [operator.index(question_id) for question_id in question_ids]
    duplicates = sorted(question_id for question_id, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise RenError(f"Cannot write the VQA submission {path}: question ids {duplicates[:5]} appear more than "
                       "once; the evaluation server expects one answer per question.")
    records = [{"question_id": question_id, "answer": str(answer)} for question_id, answer in zip(ids, answers)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(records, file)
        follow_umask(Path(temporary))  # mkstemp creates 0600; a submission file is as readable as any other
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_records(path: Path, list_key: str) -> list[Any]:
    """The list under ``list_key`` of the VQAv2 JSON file ``path``."""
    if not path.is_file():
        raise RenError(f"VQAv2 file {path} does not exist; expected an original VQAv2 JSON file "
                       f"(an object with a {list_key!r} list).")
    try:
        with path.open(encoding="utf-8") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise RenError(f"VQAv2 file {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                       f"{error.msg}).") from error
    except UnicodeDecodeError as error:
        raise RenError(f"VQAv2 file {path} is not UTF-8 text ({error}).") from error
    if not isinstance(content, dict) or list_key not in content:
        raise RenError(f"VQAv2 file {path} has no top-level key {list_key!r}; expected the original layout "
                       f"{{{list_key!r}: [...], ...}}.")
    if not isinstance(content[list_key], list):
        raise RenError(f"VQAv2 file {path}: {list_key!r} is a {type(content[list_key]).__name__}, expected a list.")
    return content[list_key]


def _field(record: Any, key: str, kind: type, path: Path, where: str) -> Any:
    """``record[key]``, checked to exist and to be a ``kind``; ``where`` names the record in messages."""
    if not isinstance(record, dict):
        raise RenError(f"VQAv2 file {path}: {where} is a {type(record).__name__}, expected an object.")
    if key not in record:
        raise RenError(f"VQAv2 file {path}: {where} has no key {key!r}.")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RenError(f"VQAv2 file {path}: {where} has {key!r} = {value!r}, expected {_KIND_NAMES[kind]}.")
    return value


def load_vqa_json(questions_path: Path, annotations_path: Path | None) -> list[VQAExample]:
    """The questions of an original VQAv2 questions file, in file order, with their annotations when
    ``annotations_path`` is given (train/val); test-dev and test have questions only (``None``).

    The cyclic garbage collector is paused meanwhile: parsing makes millions of acyclic objects, and on files
    of train2014's size (443,757 questions, 353 MB of annotations) its passes raised the time from 5.5 s to 9 s."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_vqa_json(Path(questions_path), None if annotations_path is None else Path(annotations_path))
    finally:
        if enabled:
            gc.enable()


def _load_vqa_json(questions_path: Path, annotations_path: Path | None) -> list[VQAExample]:
    questions: dict[int, tuple[int, str]] = {}
    for index, record in enumerate(_read_records(questions_path, "questions")):
        where = f"questions[{index}]"
        question_id = _field(record, "question_id", int, questions_path, where)
        image_id = _field(record, "image_id", int, questions_path, where)
        text = _field(record, "question", str, questions_path, where)
        if question_id in questions:
            raise RenError(f"VQAv2 file {questions_path}: {where} repeats question_id {question_id}.")
        questions[question_id] = (image_id, text)
    if annotations_path is None:
        return [VQAExample(question_id, image_id, text) for question_id, (image_id, text) in questions.items()]

    annotated: dict[int, tuple[tuple[str, ...], str, str]] = {}
    for index, record in enumerate(_read_records(annotations_path, "annotations")):
        where = f"annotations[{index}]"
        question_id = _field(record, "question_id", int, annotations_path, where)
        image_id = _field(record, "image_id", int, annotations_path, where)
        answer_records = _field(record, "answers", list, annotations_path, where)
        if not answer_records:
            raise RenError(f"VQAv2 file {annotations_path}: {where} (question {question_id}) has an empty "
                           "'answers' list; VQAv2 has 10 annotator answers per question.")
        answers = tuple(_field(answer, "answer", str, annotations_path, f"{where}.answers[{position}]")
                        for position, answer in enumerate(answer_records))
        majority = _field(record, "multiple_choice_answer", str, annotations_path, where)
        answer_type = _field(record, "answer_type", str, annotations_path, where)
        if question_id not in questions:
            raise RenError(f"VQAv2 file {annotations_path}: {where} annotates question {question_id}, which is not "
                           f"in the questions file {questions_path}; are the two files of the same split?")
        if question_id in annotated:
            raise RenError(f"VQAv2 file {annotations_path}: {where} is a second annotation of question "
                           f"{question_id}.")
        if image_id != questions[question_id][0]:
            raise RenError(f"VQAv2 file {annotations_path}: {where} gives question {question_id} image_id "
                           f"{image_id}, but {questions_path} gives image_id {questions[question_id][0]}.")
        annotated[question_id] = (answers, majority, answer_type)
    missing = [question_id for question_id in questions if question_id not in annotated]
    if missing:
        raise RenError(f"VQAv2 file {annotations_path} has no annotation for {len(missing)} question(s) of "
                       f"{questions_path} (first: {missing[:5]}); are the two files of the same split?")
    return [VQAExample(question_id, image_id, text, *annotated[question_id])
            for question_id, (image_id, text) in questions.items()]
