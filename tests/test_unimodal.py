"""The small unimodal models ren builds itself (engine/models/unimodal.py) and the base-model study that uses them."""

from __future__ import annotations

import dataclasses
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

from engine import backbones, recipes
from engine.cli import commands
from engine.config import load_preset
from engine.data.easyvqa import CACHE_NAME, load_easy_vqa
from engine.data.pipeline import build_data, build_tokenizer
from engine.data.tokenizer import easy_vqa_word_tokenizer, load_tokenizer
from engine.errors import ModelLoadError
from engine.inspector import model_summary
from engine.models import build_model, unimodal
from engine.study import load_study
from tests.helpers.cli import ren
from tests.helpers.paths import PRESETS, REPO

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
    """Put a recipe's output where a build renames it: ``$REN_HOME/models/<recipe>-v<version>``."""
    target = ren_home / "models" / f"{recipe}-v{recipes.RECIPE_VERSIONS[recipe]}"
    shutil.copytree(built, target)
    return target


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The base model's tensors in the saved task model (the SimMIM ViT, the BERT MLM model), loaded by its
    own class, less the ViT's mask token (pretraining's input, not the encoder's)."""
    from transformers import BertForMaskedLM, ViTForMaskedImageModeling

    if (path / "preprocessor_config.json").exists():
        weights = ViTForMaskedImageModeling.from_pretrained(str(path)).vit.state_dict()
        return {k: v for k, v in weights.items() if k != "embeddings.mask_token"}
    return BertForMaskedLM.from_pretrained(str(path)).bert.state_dict()


# --- the recipes ---------------------------------------------------------------------------------------------


def test_vit_recipe_learns_to_reconstruct_masked_patches(vit_dir, data_cache: Path) -> None:
    from transformers import AutoModel, ViTForMaskedImageModeling

    from engine.data.transforms import HALF

    path, report = vit_dir
    assert report.steps == VIT_STEPS and report.batch_size == 64
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "preprocessor_config.json", "recipe.json"]
    m = report.metrics
    # the held-out reconstruction error falls well below the same ViT's at its random initialisation
    assert m["masked_l1"] < 0.5 * m["random_init_masked_l1"] and report.train_loss < 0.5 * m["random_init_masked_l1"]
    assert {"knn_colour_accuracy", "knn_shape_accuracy", "random_init_knn_shape_accuracy"} <= set(m)
    # The saved model is the one that scored: reload it and score the test images under the same masks.
    model = ViTForMaskedImageModeling.from_pretrained(str(path)).eval()
    masks = unimodal._block_masks(1000, torch.Generator().manual_seed(unimodal.SEED + 1))
    assert masks.shape == (1000, 64) and (masks.sum(1) == 40).all()  # 10 of 16 blocks of 2x2 patches
    pixels = HALF.apply(torch.from_numpy(load_easy_vqa(data_cache).test.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        l1 = sum(float(model(pixel_values=x, bool_masked_pos=b).loss) * len(x)
                 for x, b in zip(pixels.split(250), masks.split(250), strict=True)) / 1000
    assert l1 == pytest.approx(m["masked_l1"], rel=1e-5)
    # a standard HF ViT directory: AutoModel gives the plain encoder with the trained weights
    encoder = AutoModel.from_pretrained(str(path))
    assert type(encoder).__name__ == "ViTModel"
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in _weights(path).items())


def test_vit_build_never_sees_the_labels(vit_dir, data_cache: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image's colour and shape (what easy-VQA's answers say) permuted: the same weights, to the bit;
    only the k-NN scores, which read the labels after training, may change."""
    import numpy as np

    from engine.data import easyvqa

    real = easyvqa.easy_vqa_captions

    def permuted(data, split):
        corpus = real(data, split)
        order = np.random.default_rng(1).permutation(len(corpus.colours))
        return dataclasses.replace(corpus, colours=[corpus.colours[i] for i in order],
                                   shapes=[corpus.shapes[i] for i in order])

    monkeypatch.setattr(easyvqa, "easy_vqa_captions", permuted)
    unimodal.train_recipe("easyvqa-vit", tmp_path, steps=VIT_STEPS, cache_dir=data_cache)
    a, b = load_file(vit_dir[0] / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bert_recipe_learns_the_questions_and_saves_the_word_tokenizer(bert_dir) -> None:
    path, report = bert_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= set(os.listdir(path))
    assert report.metrics["masked_accuracy"] > 2 * report.metrics["most_common_word_accuracy"]
    assert report.metrics["masked_accuracy"] > 0.4
    assert load_tokenizer(str(path)).get_vocab() == easy_vqa_word_tokenizer().get_vocab()


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
    assert encoder.modality == modality and len(encoder.layers) == recipes.LAYERS
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


def test_recipe_directories_load_as_two_tower_towers(vit_dir, bert_dir) -> None:
    cfg = load_preset(STUDIES / "easyvqa_two_tower_pretrain_short.toml",
                      [f'model.vision.name="{vit_dir[0]}"', f'model.text.name="{bert_dir[0]}"'])
    model = build_model(cfg, vocab_size=len(build_tokenizer(cfg)))
    for tower, path in ((model.encoder.vision.model, vit_dir[0]), (model.encoder.text.model, bert_dir[0])):
        weights = tower.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in _weights(path).items())


# --- names: ren:easyvqa-vit, ren:easyvqa-bert ----------------------------------------------------------------


def test_ren_names_resolve_to_the_build_in_ren_home(vit_dir, ren_home: Path) -> None:
    installed = _install(vit_dir[0], ren_home, "easyvqa-vit")
    messages: list[str] = []
    assert unimodal.ensure_built("ren:easyvqa-vit", log=messages.append) == installed and messages == []
    cfg = load_preset(PRETRAIN)
    assert cfg.model.backbone.name == "ren:easyvqa-vit"
    model = build_model(cfg, vocab_size=len(build_tokenizer(cfg)))
    saved = _weights(installed)
    kept = model.encoder.backbone.state_dict()  # the study's protocol (fresh embeddings): the encoder layers only
    assert set(kept) == {k for k in saved if k.split(".")[0] in ("encoder", "layers")} and kept  # BERT, ViT names
    assert all(torch.equal(v, saved[k]) for k, v in kept.items())


def test_concurrent_first_uses_build_once(ren_home: Path, data_cache: Path, tmp_path: Path) -> None:
    (ren_home / "cache").mkdir(parents=True)
    shutil.copy(data_cache / CACHE_NAME, ren_home / "cache" / CACHE_NAME)
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from engine.models import unimodal
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
    target = ren_home / "models" / "easyvqa-bert-v2"
    assert {out.strip().splitlines()[-1] for out, _ in outs} == {str(target)}
    logs = "".join(err for _, err in outs)
    assert logs.count("building ren:easyvqa-bert in ") == 1
    assert logs.count("another process is building ren:easyvqa-bert; waiting") == 1
    assert unimodal.read_report(target).steps == 5
    assert not list((ren_home / "models").glob(".easyvqa-bert-v2.tmp-*"))  # no temporary directory left
    record = (target / "recipe.json").read_bytes()
    messages: list[str] = []
    assert unimodal.ensure_built("ren:easyvqa-bert", log=messages.append) == target
    assert messages == [] and (target / "recipe.json").read_bytes() == record


def test_unknown_names_and_stale_builds_are_named(ren_home: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model.backbone.name = 'ren:easyvqa-vgg' is not a model ren builds.*"
                                             r"ren:easyvqa-vit, ren:easyvqa-bert"):
        build_model(load_preset(PRETRAIN, ['model.backbone.name="ren:easyvqa-vgg"']), vocab_size=35)
    stale = ren_home / "models" / "easyvqa-vit-v2"
    stale.mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="not a complete build.*--force"):
        backbones.load_hf_config("ren:easyvqa-vit", "model.backbone.name")
    (stale / "recipe.json").write_text('{"version": 0}')
    with pytest.raises(ModelLoadError, match="version 0 of the easyvqa-vit recipe.*ren models build easyvqa-vit "
                                             "--force"):
        unimodal.ensure_built("ren:easyvqa-vit")
    with pytest.raises(ModelLoadError, match="'ren:easyvqa-vit' is a vision model and has no tokenizer"):
        load_tokenizer("ren:easyvqa-vit")


def test_a_build_of_the_supervised_vit_is_not_reused(vit_dir, ren_home: Path) -> None:
    """Version 1 of easyvqa-vit (a colour x shape classifier) lived in models/easyvqa-vit: a ren that builds
    version 2 looks elsewhere, so the old weights never start a run."""
    old = ren_home / "models" / "easyvqa-vit"
    shutil.copytree(vit_dir[0], old)
    record = json.loads((old / "recipe.json").read_text())
    (old / "recipe.json").write_text(json.dumps({**record, "version": 1}))
    assert recipes.built_dir("ren:easyvqa-vit") is None
    assert recipes.model_dir("ren:easyvqa-vit") == ren_home / "models" / "easyvqa-vit-v2"
    config = backbones.load_hf_config("ren:easyvqa-vit", "model.backbone.name")
    assert config.architectures == ["ViTForMaskedImageModeling"]


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
    assert study.seeds == (0, 1, 2)
    assert [(p.variant, p.seed, p.stage) for p in planned] == [
        (v, seed, s) for v in variants for seed in study.seeds for s in ("pretrain", "finetune")]
    starts = {p.variant.split(",")[0]: (p.config.model.backbone.source, p.config.model.backbone.name)
              for p in planned}
    assert starts == {"start=vision": ("pretrained", "ren:easyvqa-vit"),
                      "start=text": ("pretrained", "ren:easyvqa-bert"), "start=random": ("random", "ren:easyvqa-vit")}
    for pre, fine in zip(planned[::2], planned[1::2], strict=True):
        assert fine.config.model == pre.config.model  # the finetuning takes its pretraining's encoder
    vocab = easy_vqa_word_tokenizer().get_vocab()
    sizes = set()
    for run in planned[::2]:
        assert build_tokenizer(run.config).get_vocab() == vocab
        summary = model_summary(run.config)
        sizes.add(sum(g["total"] for name, g in summary["groups"].items() if name.startswith("backbone.layers")))
    assert len(sizes) == 1  # the same encoder layers, whatever their start
    assert not (ren_home / "models").exists()


def test_validating_a_preset_that_names_a_ren_model_loads_no_torch(vit_dir, ren_home: Path, tmp_path: Path) -> None:
    """The config reads a ren: model's dropout from its build's config.json (or the recipe's, unbuilt) without
    torch, so `ren validate` and the TUI's Compose screen stay light."""
    preset = tmp_path / "unset_dropout.toml"  # the study's preset, its dropout left to the checkpoint
    preset.write_text(PRETRAIN.read_text().replace("dropout = 0.0\n", ""))
    code = ("from engine.config import load_preset\n"
            f"cfg = load_preset({str(preset)!r})\n"
            "print('dropout', cfg.model.backbone.dropout)\n"
            "import sys; print(sorted(m for m in ('torch', 'transformers', 'timm') if m in sys.modules))")
    for built in (False, True):
        if built:
            installed = _install(vit_dir[0], ren_home, "easyvqa-vit")
            config = json.loads((installed / "config.json").read_text())
            (installed / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.25}))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                             env={**os.environ}).stdout.splitlines()
        assert out == [f"dropout {0.25 if built else 0.0}", "[]"]
