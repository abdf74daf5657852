"""`ren eval task`: a finished finetuning run scored on any split of its data set, stored with the run,
and the VQAv2 submission file of its predictions."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict, load_preset
from engine.data.arrow import open_split
from engine.data.vqav2 import answer_vocabulary
from engine.errors import RenError
from engine.predictions import kept_predictions
from engine.runs import create_run
from engine.store import RunRecord, Store
from tests.helpers.cli import cli_streams, json_document, ren
from tests.helpers.paths import REPO

from .arrow_fixtures import write_nlvr2, write_refcoco, write_snli_ve, write_vqav2

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"
TOKENIZER = "google/electra-small-discriminator"  # in the test hub cache


def _preset(tmp_path: Path, task: str, dataset: str, root: Path, data: str = "") -> Path:
    path = tmp_path / f"{dataset}.toml"
    path.write_text(
        f'extends = "{ONE_TOWER}"\n[task]\nname = "{task}"\n'
        f'[data]\ndataset = "{dataset}"\nroot = "{root}"\ntokenizer = "{TOKENIZER}"\n{data}'
        "[train]\nmax_steps = 3\nbatch_size = 4\nlog_every = 1\neval_every = 100\ncpu_threads = 1\n"
    )
    return path


def _train(preset: Path) -> RunRecord:
    result = ren("run", str(preset), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = Store().list_runs()
    assert record.status == "finished"
    return record


def _model(record: RunRecord):
    """The run's model and tokenizer, built here from its stored config and weights file."""
    from safetensors.torch import load_file

    from engine.data.pipeline import build_tokenizer
    from engine.models import build_model

    cfg = config_from_dict(record.config)
    tokenizer = build_tokenizer(cfg)
    answers_file = Store().run_dir(record.id) / "answers.json"
    answers = json.loads(answers_file.read_text()) if cfg.task.name == "vqa" else None
    model = build_model(cfg, vocab_size=len(tokenizer), num_answers=len(answers) if answers else None)
    model.load_state_dict(load_file(str(Store().run_dir(record.id) / "model.safetensors")))
    return cfg, model.eval(), tokenizer


def _reference_score(record: RunRecord, dataset) -> float:
    """The split's score by the training loop's own evaluate() on a loader built here."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from engine.data.datasets import identity_collate
    from engine.tasks import METRICS
    from engine.train import evaluate

    cfg, model, _ = _model(record)
    loader = DataLoader(dataset, batch_size=256, collate_fn=identity_collate)
    return evaluate(model, loader, Accelerator(cpu=True), None, cfg.task.name)[METRICS[cfg.task.name]]


def _eval_set(record: RunRecord, root: Path, split: str):
    """Split ``split`` of the run's data, built here with the data set classes (evaluation transform)."""
    from engine.data import nlvr2, refcoco, snli_ve
    from engine.data.images import image_transform, whole_image_transform
    from engine.data.pipeline import build_tokenizer, image_size_of
    from engine.data.transforms import resolve_normalization

    cfg = config_from_dict(record.config)
    tokenizer, size, norm = build_tokenizer(cfg), image_size_of(cfg), resolve_normalization(cfg)
    max_len = cfg.data.max_text_len
    if cfg.data.dataset == "refcoco":
        return refcoco.ArrowRefCOCODataset(open_split(root, "refcoco", split), tokenizer, max_len,
                                           whole_image_transform(size), norm)
    cls = nlvr2.ArrowNLVR2Dataset if cfg.data.dataset == "nlvr2" else snli_ve.ArrowSNLIVEDataset
    return cls(open_split(root, cfg.data.dataset, split), tokenizer, max_len, image_transform(size, train=False),
               norm)


def _task(run_id: str, **options) -> None:
    from engine.cli.evaluate import task

    task(run_id, **{"split": None, "root": None, "submission": None, "batch_size": 4, "device": "cpu", **options})


# task, writer, eval split (trained on), another split, items in the other split (4 rows)
TASKS = [("nlvr2", write_nlvr2, "dev", "test1", 4 * 2), ("snli_ve", write_snli_ve, "dev", "test", 4 * 3),
         ("refcoco", write_refcoco, "val", "testA", 4 * 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "writer", "eval_split", "other", "items"), TASKS, ids=[t[0] for t in TASKS])
def test_eval_task_scores_any_split_as_training_does(task: str, writer, eval_split: str, other: str, items: int,
                                                     tmp_path: Path, ren_home: Path) -> None:
    root = tmp_path / "arrows"
    writer(root, "train", n=8)
    writer(root, eval_split, n=3, start=8)
    other_file = writer(root, other, n=4, start=20).path
    record = _train(_preset(tmp_path, task, task, root))
    metric = "accuracy"
    key = f"{task}/{other}/{metric}"

    result = ren("eval", "task", record.id[:20], "--split", other, "--batch-size", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    stored = Store().get_run(record.id).final_scores
    assert stored[key] == pytest.approx(_reference_score(record, _eval_set(record, root, other)), abs=1e-6)
    assert re.search(rf"{metric} {stored[key]:.4f} on {items} samples", result.stdout), result.stdout
    assert f"stored in the run's final scores as {key}" in result.stdout

    # the default split is the run's eval split: the same score as training's final evaluation
    _task(record.id, batch_size=2)
    scores = Store().get_run(record.id).final_scores
    assert scores[f"{task}/{eval_split}/{metric}"] == pytest.approx(record.final_scores[metric], abs=1e-6)
    assert scores[key] == stored[key] and scores[metric] == record.final_scores[metric]  # the others are kept

    other_file.unlink()
    with pytest.raises(RenError, match=rf"run {record.id} \({task} on {task}\): No {task} arrow file for the split "
                                       rf"'{other}' .*If the data moved, point --root"):
        _task(record.id, split=other)
    with pytest.raises(RenError, match=rf"--submission writes the VQAv2 result file.*finetuned {task} on {task}"):
        _task(record.id, submission=tmp_path / "sub.json")


@pytest.mark.slow
def test_eval_task_vqav2_scores_and_submissions(tmp_path: Path, ren_home: Path) -> None:
    root = tmp_path / "arrows"
    write_vqav2(root, "train", n=6)
    rest_val = write_vqav2(root, "rest_val", n=3, start=6)
    test_dev = write_vqav2(root, "test-dev", n=3, start=20)
    assert all(row["answers"] == [] for row in test_dev.rows)  # ViLT's answerless test rows
    record = _train(_preset(tmp_path, "vqa", "vqav2", root, 'train_split = "train"\n'))
    run_dir = Store().run_dir(record.id)
    vocabulary = answer_vocabulary([open_split(root, "vqav2", "train")])
    assert json.loads((run_dir / "answers.json").read_text()) == vocabulary  # stored by training

    moved = tmp_path / "moved"
    shutil.move(root, moved)
    with pytest.raises(RenError, match=rf"run {record.id} \(vqa on vqav2\): .*does not exist.*point --root"):
        _task(record.id)

    # the eval split through the CLI, with a submission for local checking
    val_json = tmp_path / "val.json"
    result = ren("eval", "task", record.id, "--root", str(moved), "--submission", str(val_json), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    score = Store().get_run(record.id).final_scores["vqav2/rest_val/vqa_score"]
    assert score == pytest.approx(record.final_scores["vqa_score"], abs=1e-6)
    submitted = json.loads(val_json.read_text())
    assert [entry["question_id"] for entry in submitted] == [q for row in rest_val.rows for q in row["question_id"]]
    soft = {q: dict(zip(labels, scores)) for row in rest_val.rows
            for q, labels, scores in zip(row["question_id"], row["answer_labels"], row["answer_scores"])}
    label_of = {answer: label for label, answer in enumerate(vocabulary) if answer}
    recomputed = sum(soft[e["question_id"]].get(label_of[e["answer"]], 0.0) for e in submitted) / len(submitted)
    assert score == pytest.approx(recomputed, abs=1e-6)

    # test-dev has no answers: nothing to score, a submission is required
    with pytest.raises(RenError, match=r"split 'test-dev' has no answers \(a test split\).*--submission FILE"):
        _task(record.id, root=moved, split="test-dev")
    out = tmp_path / "out" / "test-dev.json"
    result = ren("eval", "task", record.id, "--root", str(moved), "--split", "test-dev", "--submission", str(out),
                 "--batch-size", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submission: 9 answers written" in result.stdout
    with pytest.raises(RenError, match=r"--examples 3: the vqav2 split 'test-dev' has no answers .*--split rest_val"):
        _task(record.id, root=moved, split="test-dev", submission=out, examples=3)
    kept = kept_predictions(Store(), record.id)  # the rest_val evaluation above kept its breakdown by answer type
    assert [(p.key, p.category_kind) for p in kept] == [("vqav2/rest_val", "answer type")]
    assert kept[0].breakdown[-1].n == 9 and len(kept[0].examples) == 9  # the 20 asked for by default: all 9
    submitted = json.loads(out.read_text())
    assert all(set(entry) == {"question_id", "answer"} and type(entry["question_id"]) is int
               and isinstance(entry["answer"], str) for entry in submitted)
    question_ids = [q for row in test_dev.rows for q in row["question_id"]]
    assert [entry["question_id"] for entry in submitted] == question_ids
    assert not any("test-dev" in key for key in Store().get_run(record.id).final_scores)
    # each answer is the vocabulary entry of the model's argmax, recomputed here question by question
    cfg, model, tokenizer = _model(record)
    from engine.data.images import image_transform
    from engine.data.pipeline import image_size_of
    from engine.data.transforms import resolve_normalization

    norm, transform = resolve_normalization(cfg), image_transform(image_size_of(cfg), train=False)
    source = open_split(moved, "vqav2", "test-dev")
    expected = []
    with torch.no_grad():
        for i, row in enumerate(test_dev.rows):
            pixels = norm.apply(transform(source.image(i))[None])
            for question in row["questions"]:
                enc = tokenizer([question], truncation=True, max_length=40, return_tensors="pt")
                logits = model(enc["input_ids"], enc["attention_mask"], pixels, task=True).logits["task"]
                expected.append(vocabulary[int(logits.argmax())])
    assert [entry["answer"] for entry in submitted] == expected

    with pytest.raises(RenError, match=r"mix answered \(train, val\) and answerless \(test, test-dev\) VQAv2 rows"):
        _task(record.id, root=moved, split="rest_val+test-dev", submission=tmp_path / "mixed.json")

    # a run without a stored vocabulary (trained before runs kept it) rebuilds it from its train split
    (run_dir / "answers.json").unlink()
    store = Store()
    store.update_run(record.id, final_scores={})
    _task(record.id, root=moved, batch_size=5)
    assert Store().get_run(record.id).final_scores["vqav2/rest_val/vqa_score"] == pytest.approx(score, abs=1e-6)
    other = tmp_path / "other"
    write_vqav2(other, "train", n=1, questions_per_image=1)  # a one-answer vocabulary
    shutil.copy(moved / "vqav2_rest_val.arrow", other)
    with pytest.raises(RenError, match=r"vocabulary \(1 answers, rebuilt from the train split 'train' of .*other\) "
                                       r"does not fit the answer head"):
        _task(record.id, root=other)


def test_eval_task_refuses_runs_it_cannot_score(tmp_path: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    root = tmp_path / "arrows"
    write_snli_ve(root, "dev", n=2)
    pretrain = tmp_path / "pre.toml"
    pretrain.write_text(f'extends = "{REPO / "presets" / "base" / "easyvqa_two_tower.toml"}"\n[run]\nname = "pre"\n'
                        "[objectives.mlm]\n[objectives.itm]\n")
    pre = create_run(store, load_preset(pretrain), None)
    result = ren("eval", "task", pre.id)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert f"run {pre.id} is a pretraining run (no [task])" in message and "ren eval retrieval" in message

    created = create_run(store, load_preset(_preset(tmp_path, "snli_ve", "snli_ve", root)), None)
    with pytest.raises(RenError, match=rf"run {created.id} has no final weights: it is created, not finished.*"
                                       rf"`ren run --resume {created.id}`"):
        _task(created.id)
    store.mark_ended(created.id, "finished")
    with pytest.raises(RenError, match=rf"run {created.id} finished, but its final weights are gone: .*"
                                       r"model.safetensors does not exist"):
        _task(created.id)
    with pytest.raises(RenError, match="--batch-size must be a positive integer, got 0"):
        _task(created.id, batch_size=0)

    easy = tmp_path / "easy.toml"
    easy.write_text(f'extends = "{ONE_TOWER}"\n[run]\nname = "easy"\n')
    quick = create_run(store, load_preset(easy), None)
    with pytest.raises(RenError, match=rf"--root: run {quick.id} reads the embedded easy_vqa data"):
        _task(quick.id, root=root)
    assert all(store.get_run(r.id).final_scores == {} for r in (pre, created, quick))


def test_eval_task_scores_an_easy_vqa_run_on_each_split_as_training_did(ren_home: Path, data_cache: Path) -> None:
    from engine.train import train
    from tests.helpers.training import start, tiny_finetune

    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache, max_steps=4, eval_every=4, checkpoint_every=4))
    train(cfg, store, run_id)
    trained = store.get_run(run_id)
    for split in ("val", "test", "train"):
        _task(run_id, split=split, batch_size=512)
    scores = store.get_run(run_id).final_scores
    assert scores["easy_vqa/val/vqa_score"] == pytest.approx(trained.final_scores["vqa_score"], abs=1e-6)
    assert scores["easy_vqa/test/vqa_score"] == pytest.approx(trained.test_scores["test/vqa_score"], abs=1e-6)
    assert 0.0 < scores["easy_vqa/train/vqa_score"] <= 1.0
    with pytest.raises(RenError, match=rf"run {run_id} \(vqa on easy_vqa\): easy_vqa has the splits train, val, "
                                       "test; there is no split 'dev'"):
        _task(run_id, split="dev")


def test_eval_task_json_prints_the_score_it_stored(ren_home: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`ren eval task --json` through the real entry point: one document on stdout (schema ren.eval-task/1),
    its score the one stored and the one training's final evaluation gave; what it says besides on stderr."""
    from engine.train import train
    from tests.helpers.training import start, tiny_finetune

    store = Store(ren_home)
    cfg, run_id = start(store, tiny_finetune(data_cache, max_steps=4, eval_every=4, checkpoint_every=4))
    train(cfg, store, run_id)
    code, out, err = cli_streams(["eval", "task", run_id[:20], "--json", "--batch-size", "512", "--device", "cpu"],
                                 monkeypatch, capsys)
    assert code == 0, err
    doc = json_document(out)
    assert doc["schema"] == "ren.eval-task/1"
    assert (doc["run_id"], doc["task"], doc["dataset"], doc["split"]) == (run_id, "vqa", "easy_vqa", "val")
    stored = store.get_run(run_id).final_scores
    assert doc["stored_as"] == "easy_vqa/val/vqa_score" and doc["metric"] == "vqa_score"
    assert doc["score"] == stored["easy_vqa/val/vqa_score"]
    assert doc["score"] == pytest.approx(stored["vqa_score"], abs=1e-6)  # training's final evaluation
    assert doc["samples"] == doc["items"] == stored["eval_samples"] and doc["files"] is None
    assert doc["submission"] is None and doc["seconds"] > 0
    assert "stored in the run's final scores as easy_vqa/val/vqa_score" in err
