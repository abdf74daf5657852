"""The small unimodal models ren builds itself (engine/unimodal.py) and the base-model study that uses them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import unimodal
from engine.cli import commands
from engine.cli.commands import model_summary
from engine.config import load_preset
from engine.data.easyvqa import CACHE_NAME, load_easy_vqa
from engine.data.pipeline import _easy_vqa_word_tokenizer, build_data, build_tokenizer
from engine.data.tokenizer import load_tokenizer
from engine.errors import ModelLoadError
from engine.models import build_model
from engine.study import load_study

from .conftest import PRESETS, REPO
from .test_cli import ren

STUDIES = PRESETS / "studies"
PRETRAIN = STUDIES / "easyvqa_one_tower_pretrain.toml"
FINETUNE = STUDIES / "easyvqa_one_tower_vqa_finetune.toml"
STUDY = STUDIES / "base-model-easyvqa.toml"
VIT_STEPS, BERT_STEPS = 40, 60


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> tuple[Path, unimodal.BuildReport]:
    out = tmp_path_factory.mktemp("easyvqa-vit")
    return out, unimodal.train_recipe("easyvqa-vit", out, steps=VIT_STEPS, cache_dir=data_cache)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> tuple[Path, unimodal.BuildReport]:
    out = tmp_path_factory.mktemp("easyvqa-bert")
    return out, unimodal.train_recipe("easyvqa-bert", out, steps=BERT_STEPS, cache_dir=data_cache)


def _install(built: Path, ren_home: Path, recipe: str) -> Path:
    """Put a recipe's output where a build renames it: ``$REN_HOME/models/<recipe>``."""
    target = ren_home / "models" / recipe
    shutil.copytree(built, target)
    return target


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The base model's tensors in the saved task model (the ViT classifier, the BERT MLM model), loaded
    by its own class: the classifier whose test accuracy the ViT test checks."""
    from transformers import BertForMaskedLM, ViTForImageClassification

    if (path / "preprocessor_config.json").exists():
        return ViTForImageClassification.from_pretrained(str(path)).vit.state_dict()
    return BertForMaskedLM.from_pretrained(str(path)).bert.state_dict()


# --- the recipes ---------------------------------------------------------------------------------------------


def test_vit_recipe_learns_colour_and_shape_from_training_images(vit_dir, data_cache: Path) -> None:
    from transformers import ViTForImageClassification

    from engine.data.easyvqa import easy_vqa_captions
    from engine.data.transforms import HALF

    path, report = vit_dir
    assert report.steps == VIT_STEPS and report.batch_size == 64
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "preprocessor_config.json", "recipe.json"]
    # 24 colour x shape classes: guessing scores 1/24, the most common training class 4.3%, colour alone 1/8.
    assert report.metrics["majority_class_accuracy"] < 0.06
    assert report.metrics["accuracy"] > 0.15
    assert report.metrics["colour_accuracy"] > 0.4
    # The saved classifier is the one that scored: reload it and score the test images again.
    model = ViTForImageClassification.from_pretrained(str(path)).eval()
    data = load_easy_vqa(data_cache)
    corpus = easy_vqa_captions(data, "test")
    truth = [model.config.label2id[f"{c} {s}"] for c, s in zip(corpus.colours, corpus.shapes, strict=True)]
    pixels = HALF.apply(torch.from_numpy(data.test.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        predicted = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in pixels.split(250)])
    assert float((predicted == torch.tensor(truth)).float().mean()) == pytest.approx(report.metrics["accuracy"])


def test_bert_recipe_learns_the_questions_and_saves_the_word_tokenizer(bert_dir) -> None:
    path, report = bert_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= set(os.listdir(path))
    assert report.metrics["masked_accuracy"] > 2 * report.metrics["most_common_word_accuracy"]
    assert report.metrics["masked_accuracy"] > 0.4
    assert load_tokenizer(str(path)).get_vocab() == _easy_vqa_word_tokenizer().get_vocab()


def test_a_build_is_repeatable_and_leaves_the_callers_rng_alone(tmp_path: Path, data_cache: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    reports = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        reports.append(unimodal.train_recipe("easyvqa-bert", tmp_path / name, steps=3, cache_dir=data_cache))
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
    assert reports[0].metrics == reports[1].metrics
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_recipe_directories_load_as_one_tower_backbones(modality: str, vit_dir, bert_dir, data_cache: Path) -> None:
    path = (vit_dir if modality == "vision" else bert_dir)[0]
    cfg = load_preset(FINETUNE, [f'model.backbone.name="{path}"'])
    data = build_data(cfg, cache_dir=data_cache)
    model = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers).eval()
    encoder = model.encoder
    assert encoder.modality == modality and len(encoder.layers) == unimodal.LAYERS
    saved = _weights(path)
    backbone = encoder.backbone.state_dict()
    kept = {k for k in saved if k.split(".")[0] in ("encoder", "layers")}  # embeddings = "fresh": the layers only
    assert kept and backbone.keys() == kept
    assert all(torch.equal(backbone[k], saved[k]) for k in kept)
    if modality == "vision":  # pixels normalised with the statistics the ViT was trained with
        assert data.train.norm.source == str(path / "preprocessor_config.json")
    batch = data.eval.__getitems__(list(range(8)))
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], task=True)
    assert out.logits["task"].shape == (8, 13) and torch.isfinite(out.logits["task"]).all()


# --- names: ren:easyvqa-vit, ren:easyvqa-bert ----------------------------------------------------------------


def test_ren_names_resolve_to_the_build_in_ren_home(vit_dir, ren_home: Path) -> None:
    installed = _install(vit_dir[0], ren_home, "easyvqa-vit")
    messages: list[str] = []
    assert unimodal.ensure_built("ren:easyvqa-vit", log=messages.append) == installed and messages == []
    cfg = load_preset(PRETRAIN)
    assert cfg.model.backbone.name == "ren:easyvqa-vit"
    model = build_model(cfg, vocab_size=len(build_tokenizer(cfg)))
    saved = _weights(installed)
    assert all(torch.equal(model.encoder.backbone.state_dict()[k], saved[k]) for k in saved)


def test_concurrent_first_uses_build_once(ren_home: Path, data_cache: Path, tmp_path: Path) -> None:
    (ren_home / "cache").mkdir(parents=True)
    shutil.copy(data_cache / CACHE_NAME, ren_home / "cache" / CACHE_NAME)
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from engine import unimodal
        ready = Path(sys.argv[1])
        (ready / sys.argv[2]).touch()
        while len(list(ready.iterdir())) < 2:  # start together
            time.sleep(0.01)
        print(unimodal.ensure_built("ren:easyvqa-bert", steps=5))
    """)
    (tmp_path / "ready").mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "ready"), str(i)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ}) for i in range(2)]
    outs = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outs]
    target = ren_home / "models" / "easyvqa-bert"
    assert {out.strip().splitlines()[-1] for out, _ in outs} == {str(target)}
    logs = "".join(err for _, err in outs)
    assert logs.count("building ren:easyvqa-bert in ") == 1
    assert logs.count("another process is building ren:easyvqa-bert; waiting") == 1
    assert unimodal.read_report(target).steps == 5
    assert not list((ren_home / "models").glob(".easyvqa-bert.tmp-*"))  # no temporary directory left
    record = (target / "recipe.json").read_bytes()
    messages: list[str] = []
    assert unimodal.ensure_built("ren:easyvqa-bert", log=messages.append) == target
    assert messages == [] and (target / "recipe.json").read_bytes() == record


def test_unknown_names_and_stale_builds_are_named(ren_home: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model.backbone.name = 'ren:easyvqa-vgg' is not a model ren builds.*"
                                             r"ren:easyvqa-vit, ren:easyvqa-bert"):
        build_model(load_preset(PRETRAIN, ['model.backbone.name="ren:easyvqa-vgg"']), vocab_size=35)
    stale = ren_home / "models" / "easyvqa-vit"
    stale.mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="not a complete build.*--force"):
        unimodal.load_config("ren:easyvqa-vit")
    (stale / "recipe.json").write_text('{"version": 0}')
    with pytest.raises(ModelLoadError, match="version 0 of the easyvqa-vit recipe.*ren models build easyvqa-vit "
                                             "--force"):
        unimodal.ensure_built("ren:easyvqa-vit")
    with pytest.raises(ModelLoadError, match="'ren:easyvqa-vit' is a vision model and has no tokenizer"):
        load_tokenizer("ren:easyvqa-vit")


def test_models_build_cli_reuses_a_build_and_names_bad_models(bert_dir, ren_home: Path) -> None:
    installed = _install(bert_dir[0], ren_home, "easyvqa-bert")
    record = (installed / "recipe.json").read_bytes()
    done = ren("models", "build", "easyvqa-bert")
    assert done.returncode == 0, done.stderr
    assert f"ren:easyvqa-bert is built already in {installed}" in done.stdout
    assert f"{BERT_STEPS} steps of batch 128" in done.stdout
    assert (installed / "recipe.json").read_bytes() == record
    bad = ren("models", "build", "easyvqa-gpt")
    assert bad.returncode == 2 and "'easyvqa-gpt' is not a model ren builds" in bad.stderr


# --- presets and the study: reading them trains nothing ------------------------------------------------------


def test_validate_reads_only_configs(ren_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = ren("validate", str(PRETRAIN), "--set", 'model.backbone.name="ren:easyvqa-bert"', "--json")
    assert text.returncode == 0, text.stderr
    report = json.loads(text.stdout)
    assert report["config"]["model"]["backbone"]["name"] == "ren:easyvqa-bert"
    # fresh (the study's protocol): (35 words + 32 positions) x 128 + a LayerNorm; BERT's own had 2 token types more
    assert report["params"]["groups"]["backbone.text_embeddings"]["total"] == (35 + 32) * 128 + 2 * 128
    commands.validate(FINETUNE, [], as_json=True, all_groups=False)
    assert json.loads(capsys.readouterr().out)["params"]["groups"]["heads.task"]["total"] > 0
    assert not (ren_home / "models").exists()


def test_study_plans_three_starts_that_share_one_tokenizer(ren_home: Path) -> None:
    study = load_study(STUDY)
    variants = [f"start={v},embeddings={e}" for v in ("vision", "text", "random") for e in ("fresh", "backbone")]
    assert study.baseline == "start=random,embeddings=fresh" and list(study.variants) == variants
    planned = study.expand()
    assert [(p.variant, p.stage) for p in planned] == [(v, s) for v in variants for s in ("pretrain", "finetune")]
    starts = {p.variant.split(",")[0]: (p.config.model.backbone.source, p.config.model.backbone.name)
              for p in planned}
    assert starts == {"start=vision": ("pretrained", "ren:easyvqa-vit"),
                      "start=text": ("pretrained", "ren:easyvqa-bert"), "start=random": ("random", "ren:easyvqa-vit")}
    for pre, fine in zip(planned[::2], planned[1::2], strict=True):
        assert fine.config.model == pre.config.model  # the finetuning takes its pretraining's encoder
    vocab = _easy_vqa_word_tokenizer().get_vocab()
    sizes = set()
    for run in planned[::2]:
        assert build_tokenizer(run.config).get_vocab() == vocab
        summary = model_summary(run.config)
        sizes.add(sum(g["total"] for name, g in summary["groups"].items() if name.startswith("backbone.layers")))
    assert len(sizes) == 1  # the same encoder layers, whatever their start
    assert not (ren_home / "models").exists()
