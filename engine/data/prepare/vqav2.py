"""VQAv2: the questions and annotations JSON and the COCO image folders -> ``vqav2_{train,val,test,test-dev}.arrow``,
with val cut into ``trainable_val`` and ``rest_val``; the answer vocabulary follows ViLT's rule. See
docs/tasks-and-data.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from engine.data.prepare import read, writer
from engine.errors import RenError
from engine.vqa_answers import build_answer_vocab, load_vqa_json, soft_targets

VQAV2_REST_VAL_IMAGES = 1000  # ViLT's rest_val: the last 1,000 images of vqav2_val.arrow

VQAV2_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("questions", writer.LIST_STRING),
        ("answers", pa.list_(writer.LIST_STRING)),
        ("answer_labels", pa.list_(writer.LIST_INT)),
        ("answer_scores", pa.list_(pa.list_(pa.float64()))),
        ("image_id", pa.int64()),
        ("question_id", writer.LIST_INT),
        ("split", writer.STRING),
        ("raw_answers", pa.list_(writer.LIST_STRING)),
    ]
)

_VQAV2_SPLITS = {  # split -> questions file, annotations file (None for test splits), image folder
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
}
_VQAV2_FROM = ("the VQAv2 release from visualqa.org (the questions and annotations zips, unpacked into the source "
               "folder) and the COCO image folders train2014/, val2014/ and test2015/ from cocodataset.org")


def prepare_vqav2(source: Path, out: Path, *, progress: writer.Progress | None = None, force: bool = False,
                  rest_val_images: int = VQAV2_REST_VAL_IMAGES) -> writer.PrepareReport:
    """VQAv2 (see docs/tasks-and-data.md); ``vqav2_rest_val.arrow`` gets the last ``rest_val_images`` rows of val."""
    if rest_val_images < 0:
        raise RenError(f"vqav2: rest_val_images must be at least 0, got {rest_val_images}.")
    with writer.Job("vqav2", source, out, progress, force) as job:
        names = {split: f"vqav2_{split}.arrow" for split in (*_VQAV2_SPLITS, "trainable_val", "rest_val")}
        pending = [split for split in _VQAV2_SPLITS if not job.complete(names[split])]
        derived = {split: names[split] if not job.complete(names[split]) or "val" in pending else None
                   for split in ("trainable_val", "rest_val")}
        if pending:
            job.write(_vqav2_outputs(job.source, pending, names))
        if any(derived.values()):
            job.split_tail(names["val"], rest_val_images, derived["trainable_val"], derived["rest_val"])
        return job.finish(list(names.values()))


def _vqav2_outputs(source: Path, splits: Sequence[str], names: dict[str, str]) -> list[writer.Output]:
    """The outputs of the VQAv2 ``splits``; train and val need the vocabulary, so both are read for either."""
    needed = {*splits, "train", "val"} if {"train", "val"} & set(splits) else set(splits)
    files: dict[str, tuple[Path, Path | None, Path]] = {}
    for split in (split for split in _VQAV2_SPLITS if split in needed):
        questions, annotations, folder = _VQAV2_SPLITS[split]
        files[split] = (read.find(source, "vqav2", (questions,), _VQAV2_FROM),
                        None if annotations is None else read.find(source, "vqav2", (annotations,), _VQAV2_FROM),
                        read.find(source, "vqav2", (folder,), _VQAV2_FROM, folder=True))
    examples = {split: load_vqa_json(questions, annotations) for split, (questions, annotations, _) in files.items()}
    vocab = build_answer_vocab([example.multiple_choice_answer] for split in ("train", "val") if split in examples
                               for example in examples[split])
    vocab_index = {answer: label for label, answer in enumerate(vocab)}
    outputs = []
    for split in splits:
        name, (_, annotations, folder) = names[split], files[split]
        output = writer.Output(name, VQAV2_SCHEMA)
        # image id -> question ids, questions, answers, labels, scores, raw answers (the last four stay empty for
        # test splits)
        images: dict[int, tuple[list[int], list[str], list[list[str]], list[list[int]], list[list[float]],
                                list[list[str]]]] = {}
        for example in examples[split]:
            if annotations is not None:
                labels, scores = soft_targets(example.answers, vocab_index)
                if not labels:
                    output.skipped.append(writer.SkippedRecord(
                        name, f"question {example.question_id}", writer.NO_VOCAB_ANSWER,
                        f"multiple_choice_answer {example.multiple_choice_answer!r}"))
                    continue
            question_ids, questions, answers, label_lists, score_lists, raw_lists = images.setdefault(
                example.image_id, ([], [], [], [], [], []))
            question_ids.append(example.question_id)
            questions.append(example.question)
            if annotations is not None:
                answers.append([vocab[label] for label in labels])
                label_lists.append(labels)
                score_lists.append(scores)
                raw_lists.append(list(example.answers))
        for image_id, (question_ids, questions, answers, label_lists, score_lists, raw_lists) in images.items():
            image = folder / f"COCO_{folder.name}_{image_id:012d}.jpg"
            cells = (questions, answers, label_lists, score_lists, image_id, question_ids, split, raw_lists)
            output.rows.append(
                writer.Row(
                    f"image {image_id} ({writer.plural(len(questions), 'question')})", (image,), cells, len(questions)
                )
            )
        outputs.append(output)
    return outputs
