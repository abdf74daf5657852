"""`ren export`: the exported towers load with plain transformers and timm and compute what ren's towers
compute, the whole model rebuilds from the folder (docs/export.md's snippet, run as written) and a finetune
starts from it, the model card, and the refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from engine.config import config_from_dict
from engine.data.pipeline import num_answers
from engine.errors import ConfigError
from engine.evaluate import load_run_model
from engine.export import buildable_config, export_run, rebuild_config
from engine.models import build_model
from engine.runs import check_init_from
from engine.store import Store
from engine.train import FINAL_WEIGHTS, init_weights_from, train
from tests.helpers.cli import cli
from tests.helpers.paths import REPO
from tests.helpers.training import finished_run, start, tiny_pretrain

TOLERANCE = 1e-5
TINY = {"hidden_size": 32, "layers": 2, "heads": 2, "mlp_ratio": 2.0}
TEXT = {**TINY, "max_positions": 32}
VISION = {**TINY, "patch_size": 8, "image_size": 32}
FUSION = {"hidden_size": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0}
PRETRAIN = {"objectives": {"mlm": {}, "itm": {}, "itc": {}}}
VQA = {"task": {"name": "vqa"}}
TEXTS = ["what color is the shape?", "is there a circle in the image?"]

KINDS = {
    "two_tower": ({"kind": "two_tower", "text": TEXT, "vision": VISION, "fusion": FUSION}, PRETRAIN),
    "two_tower_electra": ({"kind": "two_tower", "fusion": FUSION, "vision": VISION,
                           "text": {"source": "random", "name": "google/electra-small-discriminator"}}, VQA),
    "dual_encoder": ({"kind": "dual_encoder", "text": TEXT, "vision": VISION, "projection_dim": 16},
                     {"objectives": {"itc": {}}}),
    "one_tower_text": ({"kind": "one_tower", "backbone": {**TINY, "modality": "text", "patch_size": 8,
                                                          "image_size": 32}}, VQA),
    "one_tower_vision": ({"kind": "one_tower", "backbone": {**TINY, "modality": "vision", "patch_size": 8,
                                                            "image_size": 32}}, VQA),
}


def _config(model: dict, stage: dict) -> dict:
    return {"run": {"name": "exported", "seed": 0}, "model": model, **stage, "data": {"max_text_len": 16}}


def _ren_model(store: Store, run_id: str):  # noqa: ANN202 - (config, model, tokenizer) as ren loads the run
    _, cfg, model, tokenizer = load_run_model(store, run_id, check=lambda cfg, where: None)
    return cfg, model, tokenizer


def _image(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_exported_towers_load_with_plain_transformers_and_match_rens_towers(kind: str, tmp_path: Path,
                                                                           ren_home: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from engine.data.transforms import resolve_normalization

    store = Store(ren_home)
    run_id = finished_run(store, _config(*KINDS[kind]))
    done = export_run(store, run_id, tmp_path / "export")
    cfg, model, tokenizer = _ren_model(store, run_id)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    images = [_image(0), _image(1)]
    ren_pixels = resolve_normalization(cfg).apply(torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1)
                                                                for i in images]))
    encoder = model.encoder
    expected = {"one_tower_text": ["model.backbone"], "one_tower_vision": ["model.backbone"]}
    assert list(done.towers) == expected.get(kind, ["model.text", "model.vision"])
    for key, folder in done.towers.items():
        path = tmp_path / "export" / folder
        loaded = AutoModel.from_pretrained(path).eval()
        reads_text = key == "model.text" or (key == "model.backbone" and encoder.modality == "text")
        with torch.no_grad():
            if reads_text:
                exported = AutoTokenizer.from_pretrained(path)(TEXTS, return_tensors="pt", padding=True)
                assert exported.input_ids.tolist() == batch.input_ids.tolist()
                theirs = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
                ours = (encoder.text(batch.input_ids, batch.attention_mask) if key == "model.text" else
                        encoder.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                        .last_hidden_state)
            else:
                pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt").pixel_values
                assert _max_diff(pixels, ren_pixels) <= TOLERANCE  # the same resize, crop and statistics
                theirs = loaded(pixel_values=pixels).last_hidden_state
                ours = encoder.vision(pixels) if key == "model.vision" else encoder.backbone(pixels).last_hidden_state
        assert ours.abs().max() > 0.1  # a real output, not a degenerate one that anything would match
        assert _max_diff(ours, theirs) <= TOLERANCE, key


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_an_exported_timm_tower_loads_with_timm_and_matches_rens_tower(arch: str, tmp_path: Path,
                                                                      ren_home: Path) -> None:
    import timm
    from timm.data import resolve_data_config

    store = Store(ren_home)
    vision = {"library": "timm", "source": "random", "name": arch, "image_size": 32}
    run_id = finished_run(store, _config({"kind": "two_tower", "text": TEXT, "vision": vision, "fusion": FUSION},
                                         PRETRAIN))
    export_run(store, run_id, tmp_path / "export")
    _, model, _ = _ren_model(store, run_id)
    folder = tmp_path / "export" / "vision"
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    model_args = json.loads((folder / "config.json").read_text())["model_args"]
    by_file = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(folder / FINAL_WEIGHTS)},
                                **model_args).eval()
    data = resolve_data_config({}, model=by_folder)
    assert data["input_size"] == (3, 32, 32) and tuple(data["mean"]) == tuple(data["std"]) == (0.5, 0.5, 0.5)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encoder.vision.model.forward_features(pixels)
        assert ours.abs().max() > 0.1
        for loaded in (by_folder, by_file):
            assert _max_diff(ours, loaded.forward_features(pixels)) <= TOLERANCE


def _docs_snippet() -> str:
    """The loading snippet of docs/export.md: the first Python block under "Loading the whole model"."""
    page = (REPO / "docs" / "export.md").read_text(encoding="utf-8")
    section = page.split("## Loading the whole model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_docs_snippet_rebuilds_the_exported_model_from_the_folder_alone(tmp_path: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    vision = {"library": "timm", "source": "random", "name": "test_resnet", "image_size": 32}
    run_id = finished_run(store, _config({"kind": "two_tower", "text": TEXT, "vision": vision, "fusion": FUSION}, VQA))
    export_run(store, run_id, tmp_path / "export")
    _image(2).save(tmp_path / "shape.png")
    snippet = _docs_snippet()
    assert len(snippet.splitlines()) <= 25
    code = snippet.replace('"exports/quickstart"', repr(str(tmp_path / "export")))
    code = code.replace('"shape.png"', repr(str(tmp_path / "shape.png")))
    names: dict = {}
    exec(compile(code, "docs/export.md", "exec"), names)  # noqa: S102 - the documented code, as a reader runs it

    _, model, _ = _ren_model(store, run_id)
    with torch.no_grad():
        ours = model(names["text"].input_ids, names["text"].attention_mask, names["image"].pixel_values, task=True)
    theirs = names["out"].logits["task"]
    assert theirs.shape == (1, 13)  # easy-VQA's answers
    assert _max_diff(ours.logits["task"], theirs) <= TOLERANCE


def test_a_finetune_starts_from_the_exported_folder(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    pre_cfg, pre_id = start(store, tiny_pretrain(data_cache))
    train(pre_cfg, store, pre_id)
    folder = tmp_path / "export"
    export_run(store, pre_id, folder)
    exported = load_file(str(folder / FINAL_WEIGHTS))
    trained = load_file(str(store.run_dir(pre_id) / FINAL_WEIGHTS))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)

    raw = tiny_pretrain(data_cache)
    raw.pop("objectives")
    raw["run"]["seed"] = 1  # its own initial weights differ from the pretraining's
    raw["task"] = {"name": "vqa"}
    raw["train"] = {**raw["train"], "init_from": str(folder), "max_steps": 1}
    raw["optim"] = {"lr": 1e-12, "warmup_ratio": 0.0}  # (almost) no update: weights stay the exported ones
    cfg = config_from_dict(raw)
    check_init_from(store, cfg)  # what `ren run` checks before creating the run

    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    fresh = build_model(cfg, vocab_size=vocab_size, num_answers=num_answers(cfg))
    missing, skipped, _ = init_weights_from(fresh, str(folder), store)
    assert not [k for k in missing if k.startswith("encoder.")]
    assert not [k for k in skipped if k.startswith("encoder.")] and any(k.startswith("heads.mlm") for k in skipped)

    cfg, run_id = start(store, raw)
    train(cfg, store, run_id)
    fine = load_file(str(store.run_dir(run_id) / FINAL_WEIGHTS))
    encoder = [k for k in exported if k.startswith("encoder.")]
    assert encoder and all(torch.allclose(exported[k], fine[k], atol=1e-6) for k in encoder)


def test_named_towers_are_rebuilt_from_the_export_without_their_weights() -> None:
    """A tower named by a hub id (or a ``ren:`` model, or local weights) is rebuilt from the exported folder's
    config, a timm tower from its architecture: nothing is downloaded or trained to load an export."""
    vision = {"library": "timm", "source": "pretrained", "name": "resnet18@/weights/resnet18.safetensors"}
    raw = config_from_dict(_config({"kind": "two_tower", "fusion": FUSION, "vision": vision,
                                    "text": {"source": "pretrained", "name": "google/electra-small-discriminator"}},
                                   VQA)).to_dict()
    cfg = buildable_config(raw, {"model.text": Path("/exports/x/text"), "model.vision": Path("/exports/x/vision")},
                           "test")
    assert (cfg.model.text.source, cfg.model.text.name) == ("random", "/exports/x/text")
    assert (cfg.model.vision.source, cfg.model.vision.name) == ("random", "resnet18")
    assert cfg.model.text.dropout == 0.1  # the checkpoint's, as the run recorded it
    assert raw["model"]["text"]["source"] == "pretrained"  # the stored config is left as it was


def test_init_from_refuses_an_export_of_another_architecture(tmp_path: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    run_id = finished_run(store, _config(*KINDS["two_tower"]))
    export_run(store, run_id, tmp_path / "export")
    other = _config({"kind": "two_tower", "text": {**TEXT, "hidden_size": 64}, "vision": VISION, "fusion": FUSION},
                    VQA)
    other["train"] = {"init_from": str(tmp_path / "export")}
    differs = r"\(model\.text\.hidden_size 32 there, 64 here\)"
    with pytest.raises(ConfigError, match=rf"the export of run {run_id} in .* is another architecture {differs}"):
        check_init_from(store, config_from_dict(other))


def test_the_model_card_names_data_scores_with_their_splits_compute_and_the_paper(tmp_path: Path,
                                                                                 ren_home: Path) -> None:
    store = Store(ren_home)
    run_id = finished_run(store, _config(KINDS["two_tower"][0], VQA))
    store.update_run(run_id, eval_split="val", best_scores={"eval/vqa_score": 0.91},
                     final_scores={"vqa_score": 0.9, "eval_samples": 3892.0, "easy_vqa/test/vqa_score": 0.88},
                     test_scores={"test/vqa_score": 0.87},
                     compute={"device": "cpu: test", "dtype": "fp32", "processes": 1, "pflops": 0.0123,
                              "train_seconds": 90.0, "device_hours": 0.025, "peak_memory_mb": 512.0,
                              "flops_per_sample": {"train": 3.2e9}})
    export_run(store, run_id, tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    front, body = card.split("---\n", 2)[1:]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "ren"
    assert {"ren", "two_tower", "finetuning", "vqa"} <= set(meta["tags"])
    assert meta["datasets"] == ["easy_vqa"] and meta["metrics"] == ["vqa_score"]
    for row in ("| `val` | best during training | vqa_score | 0.9100 |", "| `val` | final | vqa_score | 0.9000 |",
                "| `easy_vqa test` | final (`ren eval`) | vqa_score | 0.8800 |",
                "| `test` | final, scored once | vqa_score | 0.8700 |"):
        assert row in body
    assert "eval_samples" not in body
    for line in ("- device: cpu: test, 1 process(es), fp32", "- training time: 1m30s (0.025 device-hours)",
                 "- 0.0123 PFLOPs of training", "- 3.2 GFLOP per training sample", "- peak memory: 512 MiB"):
        assert line in body
    assert "arXiv 2411.06657" in body
    assert "title   = {Renaissance: Investigating the Pretraining of Vision-Language Encoders}" in body
    assert '[model.text]\nsource = "manual"' in body  # the preset, resolved


def _one_paragraph(err: str) -> str:
    assert err.startswith("error: ") and "Traceback" not in err
    return " ".join(err.split())


def test_an_unfinished_run_or_one_without_weights_is_refused(tmp_path: Path, ren_home: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(ren_home)
    _, created = start(store, _config(*KINDS["two_tower"]))
    store.mark_ended(created, "failed", error="boom")
    code, err = cli(["export", created, "--out", str(tmp_path / "a")], monkeypatch, capsys)
    assert code == 2 and f"run {created} is failed, not finished" in _one_paragraph(err)

    gone = finished_run(store, _config(*KINDS["two_tower"]))
    (store.run_dir(gone) / FINAL_WEIGHTS).unlink()
    code, err = cli(["export", gone, "--out", str(tmp_path / "b")], monkeypatch, capsys)
    assert code == 2 and f"run {gone} finished, but its final weights are gone" in _one_paragraph(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_non_empty_out_is_refused_unless_forced(tmp_path: Path, ren_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(ren_home)
    run_id = finished_run(store, _config(*KINDS["two_tower"]))
    out = tmp_path / "export"
    (out / "text").mkdir(parents=True)
    (out / "text" / "stale.bin").write_text("old")
    (out / "notes.txt").write_text("mine")
    code, err = cli(["export", run_id, "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and f"--out {out} exists and is not empty (notes.txt, text)" in _one_paragraph(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "text"]

    code, err = cli(["export", run_id, "--out", str(out), "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # not the export's: left alone
    assert not (out / "text" / "stale.bin").exists() and (out / "text" / FINAL_WEIGHTS).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # no staging folder left


def test_a_fresh_embedding_one_tower_is_exported_only_whole(tmp_path: Path, ren_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(ren_home)
    model = {"kind": "one_tower", "backbone": {**TINY, "modality": "vision", "patch_size": 8, "image_size": 32,
                                               "embeddings": "fresh"}}
    run_id = finished_run(store, _config(model, VQA))
    out = tmp_path / "export"
    code, err = cli(["export", run_id, "--out", str(out)], monkeypatch, capsys)
    message = _one_paragraph(err)
    assert code == 2 and f"run {run_id} cannot be exported with its towers" in message
    assert "model.backbone" in message and "--no-towers" in message and not out.exists()

    code, err = cli(["export", run_id, "--out", str(out), "--no-towers"], monkeypatch, capsys)
    assert code == 0, err
    assert not (out / "backbone").exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["towers"] == {} and meta["answers"][:2] and meta["num_answers"] == 13
    rebuilt = build_model(rebuild_config(out), vocab_size=meta["vocab_size"], num_answers=meta["num_answers"])
    rebuilt.load_state_dict(load_file(str(out / FINAL_WEIGHTS)))  # strict: every tensor has its place
