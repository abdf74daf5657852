"""VQAv2 from ViLT-format arrow files, through the data pipeline and `ren run`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine.config import load_preset
from engine.data.arrow import open_arrow
from engine.data.images import image_transform
from engine.data.pipeline import build_data
from engine.data.tokenizer import load_tokenizer
from engine.data.transforms import HALF
from engine.data.vqav2 import ArrowVQADataset, answer_vocabulary
from engine.errors import ConfigError
from engine.store import Store
from tests.helpers.cli import ren
from tests.helpers.paths import REPO

from .arrow_fixtures import WORDS, write_vqav2

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"
TOKENIZER = "google/electra-small-discriminator"  # in the offline hub cache the tests use


@pytest.fixture
def vqa_dir(tmp_path: Path) -> Path:
    root = tmp_path / "arrows"
    root.mkdir()
    write_vqav2(root, "train", n=12)
    write_vqav2(root, "trainable_val", n=4, start=12)
    write_vqav2(root, "rest_val", n=5, start=16, corrupt=(17,))  # the second image
    return root


def preset(tmp_path: Path, root: Path, extra: str = "") -> Path:
    path = tmp_path / "vqav2.toml"
    path.write_text(f'extends = "{ONE_TOWER}"\n[data]\ndataset = "vqav2"\nroot = "{root}"\n'
                    f'tokenizer = "{TOKENIZER}"\n{extra}'
                    "[train]\nmax_steps = 4\nbatch_size = 4\nlog_every = 2\neval_every = 2\ncpu_threads = 1\n")
    return path


def test_items_are_questions_with_vilt_soft_targets(vqa_dir: Path) -> None:
    source = open_arrow([vqa_dir / "vqav2_train.arrow"], "vqav2")
    answers = answer_vocabulary([source])
    first = source.row(0, ("answers", "answer_labels", "answer_scores"))
    assert answers[first["answer_labels"][0][0]] == first["answers"][0][0]
    assert set(answers) <= set(WORDS) | {""}
    dataset = ArrowVQADataset(source, load_tokenizer(TOKENIZER), 16, image_transform(32, train=False), HALF,
                              len(answers))
    assert len(dataset) == 12 * 3  # three questions per image
    batch = dataset.__getitems__([0, 1, 2, 5])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["input_ids"].shape[0] == 4
    labels, scores = first["answer_labels"][1], first["answer_scores"][1]
    expected = torch.zeros(len(answers))
    expected[torch.tensor(labels)] = torch.tensor(scores, dtype=torch.float32)
    assert torch.equal(batch["labels"][1], expected)
    assert batch["question_ids"].tolist() == [0, 1, 2, 1002]


def test_unreadable_images_drop_their_questions_and_are_counted(vqa_dir: Path) -> None:
    source = open_arrow([vqa_dir / "vqav2_rest_val.arrow"], "vqav2")
    dataset = ArrowVQADataset(source, load_tokenizer(TOKENIZER), 16, image_transform(32, train=False), HALF, 7)
    batch = dataset.__getitems__(list(range(len(dataset))))
    assert batch["labels"].shape[0] == 5 * 3 - 3 and source.skipped_images == 1


def test_default_training_images_are_the_evaluation_view(tmp_path: Path, vqa_dir: Path) -> None:
    """augment = "none" (the default) trains on exactly what evaluation sees: no random crop."""
    data = build_data(load_preset(preset(tmp_path, vqa_dir)), cache_dir=tmp_path / "cache")
    batches = []
    for seed in range(3):
        torch.manual_seed(seed)
        batches.append(data.train.__getitems__([0, 3])["pixel_values"])
    assert all(torch.equal(batch, batches[0]) for batch in batches)
    eval_view = ArrowVQADataset(data.train.source, data.tokenizer, 16, data.eval.transform, data.eval.norm,
                                data.num_answers).__getitems__([0, 3])["pixel_values"]
    assert torch.equal(batches[0], eval_view)


def test_the_pipeline_joins_splits_and_explains_bad_input(tmp_path: Path, vqa_dir: Path) -> None:
    cfg = load_preset(preset(tmp_path, vqa_dir))
    assert (cfg.data.train_split, cfg.data.eval_split) == ("train+trainable_val", "rest_val")
    data = build_data(cfg, cache_dir=tmp_path / "cache")
    assert len(data.train) == (12 + 4) * 3 and len(data.eval) == 5 * 3
    assert data.num_answers == len(data.answers)
    with pytest.raises(ConfigError, match="needs 'root'"):
        load_preset(ONE_TOWER, ['data.dataset="vqav2"'])
    missing = load_preset(preset(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(Exception, match="nowhere"):
        build_data(missing, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_ren_run_finetunes_and_evaluates_on_vqav2_arrow_files(tmp_path: Path, vqa_dir: Path, ren_home: Path) -> None:
    result = ren("run", str(preset(tmp_path, vqa_dir, 'augment = "randaugment"\nnum_workers = 1\n')), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = Store(ren_home).list_runs()
    assert record.status == "finished" and record.step == 4
    assert record.final_scores["eval_samples"] == 12  # 5 images x 3 questions, one image unreadable
    assert 0.0 <= record.final_scores["vqa_score"] <= 1.0
    assert [s for s, _ in Store(ren_home).series(record.id, "loss")] == [2, 4]


def test_validate_sizes_the_answer_head_as_the_run_builds_it(tmp_path: Path, vqa_dir: Path) -> None:
    from engine.cli.commands import console, validate
    from engine.freeze import apply_freeze
    from engine.inspector import model_summary
    from engine.models import build_model

    path = preset(tmp_path, vqa_dir)
    cfg = load_preset(path)
    data = build_data(cfg, cache_dir=tmp_path / "cache")
    assert data.num_answers < 3129  # the fixture's files hold a handful of answers, not ViLT's 3,129
    with torch.device("meta"):
        built = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers)
    assert model_summary(cfg) == apply_freeze(built, cfg.freeze).to_dict()
    with console.capture() as captured:
        validate(path, [], as_json=False, all_groups=False)
    assert (f"answer head: {data.num_answers} answers (the answers of the 'train+trainable_val' split's files)"
            in " ".join(captured.get().split()))
    with console.capture() as captured:  # data not readable here: ViLT's size, and why
        validate(preset(tmp_path, tmp_path / "elsewhere"), [], as_json=False, all_groups=False)
    shown = " ".join(captured.get().split())
    assert "answer head: 3129 answers (ViLT's VQAv2 vocabulary; the training data cannot be read here" in shown


def test_auto_tokenizer_on_arrow_data_is_built_from_the_training_text(tmp_path: Path, vqa_dir: Path) -> None:
    from engine.cli.commands import console, show
    from engine.data import pipeline
    from engine.data.tokenizer import SPECIAL_TOKENS

    path = tmp_path / "auto.toml"  # a manual text side: no pretrained tokenizer to take
    path.write_text(preset(tmp_path, vqa_dir).read_text().replace(f'tokenizer = "{TOKENIZER}"\n', ""))
    cfg = load_preset(path)
    assert cfg.data.tokenizer == "auto"
    data = build_data(cfg, cache_dir=tmp_path / "cache")
    questions = [q for split in ("train", "trainable_val")
                 for qs in open_arrow([vqa_dir / f"vqav2_{split}.arrow"], "vqav2").column("questions").to_pylist()
                 for q in qs]
    words = {w for q in questions for w in re.findall(r"\w+|[^\w\s]", q.lower())}
    assert set(data.tokenizer.get_vocab()) == words | set(SPECIAL_TOKENS)  # the train split's words, no more
    pipeline._WORD_TOKENIZERS.clear()  # rebuilt from the same files: the same ids (evaluation relies on it)
    assert pipeline.build_tokenizer(cfg).get_vocab() == data.tokenizer.get_vocab()
    assert data.tokenizer.unk_token_id not in data.tokenizer(questions[0])["input_ids"]
    store = Store()
    record = store.create_run(name="auto", stage="finetune", kind="one_tower", config=cfg.to_dict())
    with console.capture() as captured:
        show(record.id)
    assert ("tokenizer: word-level, built from the text of the 'train+trainable_val' split of vqav2 "
            "(data.tokenizer = \"auto\")") in " ".join(captured.get().split())
