"""Position tables across image sizes: bicubic grid resizing that keeps prefix tokens,
agreement with HF's and timm's own interpolation, adapting real model state dicts
(one-tower text and vision backbones, two-tower ViT, DeiT and timm towers) and
finetuning from a stored run trained at a smaller image size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import config_from_dict
from engine.errors import RenError
from engine.models import VLModel, build_model
from engine.models.resize import adapt_state_dict, resize_position_table
from engine.store import Store
from engine.train import FINAL_WEIGHTS, describe_init, init_weights_from, train
from tests.helpers.training import Messages

VOCAB = 60
TINY = {"hidden_size": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0}
FUSION = {"hidden_size": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0}


# ----------------------------------------------------------------------------
# resize_position_table
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_prefix_tokens_are_kept_exactly(prefix: int) -> None:
    table = torch.randn(1, prefix + 16, 8)
    out = resize_position_table(table, prefix + 49, prefix_tokens=prefix)
    assert out.shape == (1, prefix + 49, 8)
    assert torch.equal(out[:, :prefix], table[:, :prefix])
    flat = resize_position_table(table[0], prefix + 49, prefix_tokens=prefix)  # (N, D) tables too
    assert torch.equal(flat, out[0])


def test_resizing_to_its_own_size_changes_nothing() -> None:
    table = torch.randn(1, 2 + 36, 8)
    assert torch.allclose(resize_position_table(table, 2 + 36, prefix_tokens=2), table)


def test_a_linear_grid_stays_near_linear_after_upsampling() -> None:
    g, new_g, dim = 6, 15, 3
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    grid = torch.stack([xs, ys, 2.0 * xs - 3.0 * ys + 1.0], dim=-1).reshape(g * g, dim)
    table = torch.cat([torch.full((1, dim), 7.0), grid])[None]
    out = resize_position_table(table, 1 + new_g * new_g, prefix_tokens=1)[0, 1:].reshape(new_g, new_g, dim)
    # align_corners=False: output cell j samples the input at (j + 0.5) * g / new_g - 0.5
    src = (torch.arange(new_g, dtype=torch.float32) + 0.5) * g / new_g - 0.5
    sy, sx = torch.meshgrid(src, src, indexing="ij")
    expected = torch.stack([sx, sy, 2.0 * sx - 3.0 * sy + 1.0], dim=-1)
    inner = (src >= 1) & (src < g - 2)  # all four bicubic taps inside the grid
    assert inner.sum() >= 5
    # PyTorch's cubic kernel (a = -0.75) ripples by under 5% of a grid step per unit slope
    err = (out - expected)[inner][:, inner].abs().amax(dim=(0, 1))
    assert (err <= 0.06 * torch.tensor([1.0, 1.0, 5.0])).all(), err
    # separable and monotone: x positions grow along each row and do not change down a column
    assert (out[:, 1:, 0] - out[:, :-1, 0]).min() > 0.1
    assert torch.allclose(out[:, :, 0], out[:1, :, 0].expand(new_g, -1), atol=1e-5)
    assert out[..., 0].min() > -0.15 and out[..., 0].max() < g - 1 + 0.15  # small overshoot at the border


def test_matches_hf_vit_interpolation_at_run_time() -> None:
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    emb = ViTEmbeddings(ViTConfig(hidden_size=16, patch_size=8, image_size=32))
    with torch.no_grad():
        emb.position_embeddings.normal_()
        expected = emb.interpolate_pos_encoding(torch.zeros(1, 1 + 100, 16), 80, 80)
    assert torch.allclose(resize_position_table(emb.position_embeddings.detach(), 101, prefix_tokens=1), expected,
                          atol=1e-6)


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("new_g", [12, 4])
def test_antialiased_resizing_matches_timm(prefix: int, new_g: int) -> None:
    from timm.layers import resample_abs_pos_embed

    table = torch.randn(1, prefix + 49, 12)
    expected = resample_abs_pos_embed(table, [new_g, new_g], num_prefix_tokens=prefix)
    got = resize_position_table(table, prefix + new_g**2, prefix_tokens=prefix, antialias=True)
    assert torch.allclose(got, expected, atol=1e-5)
    # timm's antialiased kernel is not HF's plain bicubic, even when upsampling
    plain = resize_position_table(table, prefix + new_g**2, prefix_tokens=prefix)
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_non_square_grids_are_refused() -> None:
    with pytest.raises(RenError, match="20 - 1 = 19 is not a square grid"):
        resize_position_table(torch.randn(1, 20, 4), 37, prefix_tokens=1)
    with pytest.raises(RenError, match="30 - 1 = 29 is not a square grid"):
        resize_position_table(torch.randn(1, 17, 4), 30, prefix_tokens=1)
    with pytest.raises(RenError, match=r"\(1, N, D\) or \(N, D\)"):
        resize_position_table(torch.randn(2, 17, 4), 37, prefix_tokens=1)


# ----------------------------------------------------------------------------
# adapt_state_dict on real models
# ----------------------------------------------------------------------------


def _deit_dir(root: Path, image_size: int) -> str:
    """A real DeiT config.json (cls + distillation token) of a tiny size, in its own directory."""
    from transformers import DeiTConfig

    path = root / f"deit-{image_size}"
    DeiTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(path)
    return str(path)


def _model(kind: str, size: int, root: Path) -> dict:
    if kind.startswith("one_tower"):
        modality, _, stem = kind.removeprefix("one_tower_").partition("_")
        extra = {"image_embedding": stem} if stem else {}
        return {"kind": "one_tower", "backbone": {**TINY, "modality": modality, "patch_size": 8, "image_size": size,
                                                  "max_text_positions": 16, **extra}}
    vision = {
        "two_tower": {**TINY, "patch_size": 8, "image_size": size},
        "two_tower_deit": {"source": "random", "name": _deit_dir(root, size), "image_size": size},
        "two_tower_timm": {"library": "timm", "source": "random", "name": "vit_tiny_patch16_224", "image_size": size},
    }[kind]
    return {"kind": "two_tower", "text": {**TINY, "max_positions": 16}, "vision": vision, "fusion": FUSION}


def _build(kind: str, size: int, root: Path, seed: int) -> VLModel:
    cfg = config_from_dict({"model": _model(kind, size, root), "objectives": {"mlm": {}, "itm": {}}})
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=VOCAB).eval()


# kind -> (the image position table, the text position table, prefix tokens)
CASES = {
    "one_tower_vision": ("encoder.backbone.embeddings.position_embeddings",
                         "encoder.text_embeddings.position.weight", 1),
    "one_tower_text": ("encoder.image_embeddings.position",
                       "encoder.backbone.embeddings.position_embeddings.weight", 1),
    "one_tower_text_conv": ("encoder.image_embeddings.position",
                            "encoder.backbone.embeddings.position_embeddings.weight", 1),
    "two_tower": ("encoder.vision.model.embeddings.position_embeddings",
                  "encoder.text.model.embeddings.position_embeddings.weight", 1),
    "two_tower_deit": ("encoder.vision.model.embeddings.position_embeddings",
                       "encoder.text.model.embeddings.position_embeddings.weight", 2),
    "two_tower_timm": ("encoder.vision.model.pos_embed",
                       "encoder.text.model.embeddings.position_embeddings.weight", 1),
}


def _inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return ids, mask, torch.randn(2, 3, size, size, generator=g)


@pytest.mark.parametrize("kind", list(CASES))
def test_a_small_image_state_dict_loads_into_a_large_image_model(kind: str, tmp_path: Path) -> None:
    key, text_key, prefix = CASES[kind]
    small, large = _build(kind, 32, tmp_path, seed=0), _build(kind, 64, tmp_path, seed=1)
    stored = {k: v.clone() for k, v in small.state_dict().items()}
    own = large.state_dict()
    grid_32, grid_64 = 32 // (16 if kind == "two_tower_timm" else 8), 64 // (16 if kind == "two_tower_timm" else 8)
    assert stored[key].shape[1] == prefix + grid_32**2 and own[key].shape[1] == prefix + grid_64**2

    adapted, resized = adapt_state_dict(stored, own)
    assert resized == [key]
    assert torch.equal(adapted[key][:, :prefix], stored[key][:, :prefix])
    assert all(torch.equal(adapted[k], stored[k]) for k in stored if k != key)
    assert text_key in stored and stored[text_key].shape == own[text_key].shape
    large.load_state_dict(adapted, strict=True)

    # the small model fed 64 px images resamples its own table at run time (HF, our patch
    # embedding) or when told its new input size (timm): exactly what the large model now holds
    if kind == "two_tower_timm":
        small.encoder.vision.model.set_input_size(img_size=64)
        assert torch.allclose(small.state_dict()[key], adapted[key], atol=1e-6)
    ids, mask, pix = _inputs(64)
    with torch.no_grad():
        out = large(ids, mask, pix, itm_rows=slice(0, 2))
        ref = small(ids, mask, pix, itm_rows=slice(0, 2))
    assert out.logits["itm"].shape == (2, 2)
    assert torch.allclose(out.features.pooled, ref.features.pooled, atol=1e-5)


def test_text_position_tables_of_another_length_are_left_alone(tmp_path: Path) -> None:
    model = _model("two_tower", 32, tmp_path)
    longer = {**model, "text": {**model["text"], "max_positions": 25}}
    stored = _build("two_tower", 32, tmp_path, seed=0).state_dict()
    own = build_model(config_from_dict({"model": longer, "objectives": {"mlm": {}}}), vocab_size=VOCAB).state_dict()
    key = "encoder.text.model.embeddings.position_embeddings.weight"
    assert stored[key].shape != own[key].shape
    adapted, resized = adapt_state_dict(stored, own)
    assert resized == [] and adapted[key] is stored[key]


def test_a_table_whose_prefix_cannot_be_told_is_an_error() -> None:
    key = "encoder.vision.model.pos_embed"
    with pytest.raises(RenError, match=r"'encoder\.vision\.model\.pos_embed' from 27 to 50 positions"):
        adapt_state_dict({key: torch.randn(1, 27, 4)}, {key: torch.randn(1, 50, 4)})


# ----------------------------------------------------------------------------
# init_weights_from and train
# ----------------------------------------------------------------------------


def _stored_run(store: Store, kind: str, size: int, root: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A finished pretraining run at ``size`` px whose final weights are on disk, as train() writes them."""
    cfg = config_from_dict({"run": {"name": "pre"}, "model": _model(kind, size, root),
                            "objectives": {"mlm": {}, "itm": {}}})
    record = store.create_run(name="pre", stage=cfg.stage, kind=cfg.model.kind, config=cfg.to_dict())
    torch.manual_seed(0)
    weights = {k: v.detach().contiguous() for k, v in build_model(cfg, vocab_size=VOCAB).state_dict().items()}
    save_file(weights, str(store.run_dir(record.id) / FINAL_WEIGHTS))
    store.mark_ended(record.id, "finished")
    return record.id, weights


def test_init_from_a_run_at_a_smaller_image_size_reports_the_resized_table(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    run_id, weights = _stored_run(store, "two_tower", 32, tmp_path)
    model = _build("two_tower", 64, tmp_path, seed=1)
    missing, skipped, resized = init_weights_from(model, f"run:{run_id}", store)
    key = "encoder.vision.model.embeddings.position_embeddings"
    assert resized == [key] and skipped == [] and missing == []
    loaded = model.state_dict()
    assert torch.equal(loaded[key], resize_position_table(weights[key], 65, prefix_tokens=1))
    text_key = "encoder.text.model.embeddings.position_embeddings.weight"
    assert torch.equal(loaded[text_key], weights[text_key])


def test_init_from_names_encoder_tensors_that_did_not_load(ren_home: Path, tmp_path: Path) -> None:
    """Heads coming and going is expected; an encoder tensor that stays as built is named."""
    store = Store(ren_home)
    run_id, weights = _stored_run(store, "two_tower", 32, tmp_path)
    fusion_key = next(k for k in weights if k.startswith("encoder.fusion.") and k.endswith("mlp.3.weight"))
    renamed = {(k.replace("mlp.3.", "mlp.2.") if k == fusion_key else k): v for k, v in weights.items()}
    save_file(renamed, str(store.run_dir(run_id) / FINAL_WEIGHTS))
    model = _build("two_tower", 32, tmp_path, seed=1)
    missing, skipped, resized = init_weights_from(model, f"run:{run_id}", store)
    assert missing == [fusion_key] and skipped == [fusion_key.replace("mlp.3.", "mlp.2.")]
    line = describe_init(f"run:{run_id}", missing, skipped, resized)
    assert f"WARNING: 1 encoder tensor(s) not in the weights, left as initialised: {fusion_key}" in line
    assert "not fitting this model, ignored: " + fusion_key.replace("mlp.3.", "mlp.2.") in line
    # the usual pretraining -> finetuning swap of heads is not a warning
    heads = describe_init("run:x", ["heads.task.0.weight"], ["heads.mlm.decoder.weight"], [])
    assert heads == "initialised from run:x (1 new, 1 skipped, 0 resized tensors)"
    many = describe_init("run:x", [f"encoder.t{i}" for i in range(9)], [], [])
    assert "9 encoder tensor(s)" in many and many.endswith("encoder.t5 and 3 more")


def test_finetuning_at_a_larger_image_size_starts_from_the_resized_table(
        ren_home: Path, tmp_path: Path, data_cache: Path) -> None:
    store = Store(ren_home)
    run_id, weights = _stored_run(store, "one_tower_vision", 32, tmp_path)
    raw = {"run": {"name": "ft", "seed": 0}, "model": _model("one_tower_vision", 64, tmp_path), "task": {"name": "vqa"},
           "data": {"max_text_len": 16, "cache_dir": str(data_cache)},
           "optim": {"lr": 1e-12, "warmup_ratio": 0.0},  # (almost) no update: the table stays the resized one
           "train": {"max_steps": 1, "batch_size": 8, "eval_every": 1000, "cpu_threads": 1,
                     "init_from": f"run:{run_id}"}}
    cfg = config_from_dict(raw)
    ft = store.create_run(name="ft", stage=cfg.stage, kind=cfg.model.kind, config=cfg.to_dict())
    messages = Messages()
    train(cfg, store, ft.id, reporter=messages)
    key = "encoder.backbone.embeddings.position_embeddings"
    assert any(line.startswith(f"initialised from run:{run_id} (") and f"1 resized tensors: {key})" in line
               for line in messages.lines), messages.lines
    fine = load_file(str(store.run_dir(ft.id) / FINAL_WEIGHTS))
    assert fine[key].shape == (1, 65, 32)
    assert torch.allclose(fine[key], resize_position_table(weights[key], 65, prefix_tokens=1), atol=1e-6)
