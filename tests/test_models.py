"""Model builder: output shapes per architecture, attention masks, parameter groups,
state dicts, loading HF backbones from local directories, load errors and
gradient checkpointing. Every model here is tiny and built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import config_from_dict
from engine.errors import ConfigError, ModelLoadError
from engine.models import build_model
from tests.helpers.models import (
    ALL_KINDS,
    FUSION,
    N_ANSWERS,
    PRETRAIN,
    PRETRAIN_ITC,
    TIMM_VISION,
    TINY,
    VOCAB,
    B,
    L,
    dual_encoder,
    inputs,
    make,
    mlm_positions,
    one_tower,
    two_tower,
)

# ----------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["text", "vision"])
@pytest.mark.parametrize("pooler", ["single", "double"])
def test_one_tower_shapes(modality, pooler):
    model = make(one_tower(modality, pooler))
    enc = model.encoder
    assert enc.modality == modality
    ids, mask, pix = inputs()
    pos = mlm_positions(mask)
    out = model(ids, mask, pix, mlm_positions=pos, itm_rows=slice(0, B))
    f = out.features
    n_patches = 1 + (32 // 8) ** 2
    assert f.text.shape == (B, L, 32)
    assert f.image is None  # no head reads the fused image tokens: the last layer leaves them out
    assert model.encoder(ids, mask, pix).image.shape == (B, n_patches, 32)
    assert f.pooled.shape == (B, 32 * (2 if pooler == "double" else 1))
    assert f.text_cls is None and f.image_cls is None
    # MLM logits only at the masked positions
    assert out.logits["mlm"].shape == (int(pos.sum()), VOCAB)
    assert out.logits["itm"].shape == (B, 2)
    assert "itc" not in out.logits and "task" not in out.logits
    # the MLM head reads exactly the selected token features
    assert torch.allclose(out.logits["mlm"], model.heads["mlm"](f.text[pos]))


def test_one_tower_task_head():
    model = make(one_tower("text", "double"), {"task": {}})
    ids, mask, pix = inputs()
    out = model(ids, mask, pix, task=True)
    assert set(model.heads) == {"task"}
    assert out.logits["task"].shape == (B, N_ANSWERS)
    assert out.features.pooled.shape == (B, 64)


def test_nlvr2_pair_head_sees_both_images_side_by_side():
    stage = {"task": {"name": "nlvr2"}, "data": {"dataset": "nlvr2", "root": "/unused"}}
    model = make(two_tower(), stage).eval()
    ids, mask, pix = inputs()
    other = torch.randn_like(pix)
    logits = model(ids, mask, pix, task=True, pair_pixel_values=other).logits["task"]
    assert logits.shape == (B, 2)
    pooled_a = model(ids, mask, pix).features.pooled
    pooled_b = model(ids, mask, other).features.pooled
    assert torch.allclose(logits, model.heads["task"](torch.cat([pooled_a, pooled_b], dim=1)), atol=1e-5)
    swapped = model(ids, mask, other, task=True, pair_pixel_values=pix).logits["task"]
    assert not torch.allclose(logits, swapped)  # the order of the images matters, as in ViLT


NLVR2 = {"task": {"name": "nlvr2"}, "data": {"dataset": "nlvr2", "root": "/unused"}}
NLVR2_KINDS = {"one_tower": lambda: one_tower("text"), "two_tower": two_tower}


@pytest.mark.parametrize("kind", list(NLVR2_KINDS))
def test_nlvr2_second_image_has_its_own_type_row(kind):
    """ViLT/METER: the second image gets token type 2, a row of its own that starts as the image row
    and is trained apart from it."""
    model = make(NLVR2_KINDS[kind](), NLVR2).eval()
    types = model.encoder.modality_type.weight
    assert types.shape[0] == 3 and torch.equal(types[2], types[1])
    ids, mask, pix = inputs()
    other = torch.randn_like(pix)
    with torch.no_grad():
        types[2].add_(torch.randn_like(types[2]))  # the rows now differ: each image must read its own
        logits = model(ids, mask, pix, task=True, pair_pixel_values=other).logits["task"]
        first = model(ids, mask, pix).features.pooled
        second = model.encoder(ids, mask, other, image_types=torch.full((B,), 2)).pooled
        as_first = model(ids, mask, other).features.pooled
    assert torch.allclose(logits, model.heads["task"](torch.cat([first, second], dim=1)), atol=1e-5)
    assert not torch.allclose(second, as_first, atol=1e-4)
    model.train()
    model(ids, mask, pix, task=True, pair_pixel_values=other).logits["task"].sum().backward()
    grad = model.encoder.modality_type.weight.grad
    assert grad[2].abs().sum() > 0 and not torch.allclose(grad[2], grad[1])


@pytest.mark.parametrize("kind", list(NLVR2_KINDS))
def test_nlvr2_type_row_starts_as_the_pretrained_image_row(kind, ren_home, tmp_path):
    """``train.init_from`` of a pretraining (2 type rows) fills the third row with the pretrained image
    row, as ViLT does when it builds its NLVR2 model after loading; an NLVR2 checkpoint of 2 rows (runs
    before the third row) still loads, and gives both images the image row as it did."""
    from engine.store import Store
    from engine.train import init_weights_from

    pretrained = make(NLVR2_KINDS[kind](), PRETRAIN, seed=1).state_dict()
    save_file(pretrained, str(tmp_path / "model.safetensors"))
    model = make(NLVR2_KINDS[kind](), NLVR2, seed=2)
    _, _, resized = init_weights_from(model, str(tmp_path), Store(ren_home))
    stored = pretrained["encoder.modality_type.weight"]
    assert stored.shape[0] == 2 and "encoder.modality_type.weight" in resized
    assert torch.equal(model.encoder.modality_type.weight, stored[[0, 1, 1]])
    old = {k: v for k, v in make(NLVR2_KINDS[kind](), NLVR2, seed=3).state_dict().items()}
    old["encoder.modality_type.weight"] = stored
    model.load_state_dict(old, strict=True)
    assert torch.equal(model.encoder.modality_type.weight, stored[[0, 1, 1]])


def test_snli_ve_head_has_three_classes():
    model = make(one_tower("text"), {"task": {"name": "snli_ve"}, "data": {"dataset": "snli_ve", "root": "/x"}})
    ids, mask, pix = inputs()
    assert model(ids, mask, pix, task=True).logits["task"].shape == (B, 3)


def test_one_tower_itm_rows_slice():
    model = make(one_tower())
    ids, mask, pix = inputs()
    out = model(ids, mask, pix, itm_rows=slice(1, 3))
    assert out.logits["itm"].shape == (2, 2)
    assert torch.allclose(out.logits["itm"], model.heads["itm"](out.features.pooled[1:3]))


def test_two_tower_shapes():
    model = make(two_tower(), {**PRETRAIN_ITC})
    ids, mask, pix = inputs()
    pos = mlm_positions(mask)
    out = model(ids, mask, pix, mlm_positions=pos, itm_rows=slice(0, B), itc=True)
    f = out.features
    assert f.text.shape == (B, L, 32) and f.image is None
    assert model.encoder(ids, mask, pix).image.shape == (B, 17, 32)
    assert f.pooled.shape == (B, 64)
    assert f.text_cls.shape == (B, 32) and f.image_cls.shape == (B, 32)
    assert out.logits["mlm"].shape == (int(pos.sum()), VOCAB)
    assert out.logits["itm"].shape == (B, 2)
    assert out.logits["itc"].shape == (B, B)


def test_two_tower_task_head():
    model = make(two_tower(), {"task": {}})
    ids, mask, pix = inputs()
    assert model(ids, mask, pix, task=True).logits["task"].shape == (B, N_ANSWERS)


def test_two_tower_with_timm_cnn():
    model = make(two_tower(vision=TIMM_VISION), PRETRAIN_ITC)
    ids, mask, pix = inputs(image_size=64)
    out = model(ids, mask, pix, itm_rows=slice(0, B), itc=True)
    tower = model.encoder.vision
    fmap = tower.model.forward_features(pix)
    assert fmap.ndim == 4
    c, h, w = fmap.shape[1:]
    assert c == tower.hidden_size == 512 and h * w > 1
    assert model.encoder(ids, mask, pix).image.shape == (B, 1 + h * w, 32)
    tokens = tower(pix)
    assert tokens.shape == (B, 1 + h * w, c)
    # first token summarises the map (mean), the rest are its positions in order
    assert torch.allclose(tokens[:, 0], fmap.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(tokens[:, 1:], fmap.flatten(2).transpose(1, 2))
    assert out.features.image_cls.shape == (B, 512)
    assert out.logits["itc"].shape == (B, B) and out.logits["itm"].shape == (B, 2)


def test_dual_encoder_shapes():
    model = make(dual_encoder(), {"objectives": {"itc": {}}})
    ids, mask, pix = inputs()
    out = model(ids, mask, pix, itc=True)
    f = out.features
    assert f.text is None and f.image is None and f.pooled is None
    assert f.text_cls.shape == (B, 32) and f.image_cls.shape == (B, 32)
    assert out.logits["itc"].shape == (B, B)
    assert model.heads["itc"].text_proj.out_features == 16


# ----------------------------------------------------------------------------
# attention masks
# ----------------------------------------------------------------------------


def _pad(ids, mask, extra: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    junk = torch.randint(5, VOCAB, (ids.shape[0], extra), generator=g)
    return torch.cat([ids, junk], 1), torch.cat([mask, torch.zeros_like(mask[:, :extra])], 1)


@pytest.mark.parametrize("kind", ["one_tower_text", "one_tower_vision_double", "two_tower", "dual_encoder"])
def test_padding_never_leaks_into_real_tokens(kind):
    build, stage = ALL_KINDS[kind]
    model = make(build(), stage).eval()
    ids, mask, pix = inputs()
    # row 0 already has padding: give it random ids there instead of 0
    ids[0, L - 3:] = torch.tensor([11, 23, 37])
    with torch.no_grad():
        ref = model.encoder(ids, mask, pix)
        padded_ids, padded_mask = _pad(ids, mask, extra=5, seed=3)
        got = model.encoder(padded_ids, padded_mask, pix)
        other_ids = ids.clone()
        other_ids[0, L - 3:] = torch.tensor([41, 42, 43])
        other = model.encoder(other_ids, mask, pix)
        # control: the same padded input with the mask ignored does change the outputs
        leaky = model.encoder(padded_ids, torch.ones_like(padded_mask), pix)

    real = mask.bool()
    for a, b in ((ref, got), (ref, other)):
        if ref.text is not None:
            assert torch.allclose(a.text[:, :L][real], b.text[:, :L][real], atol=1e-5)
            assert torch.allclose(a.image, b.image, atol=1e-5)
            assert torch.allclose(a.pooled, b.pooled, atol=1e-5)
        if ref.text_cls is not None:
            assert torch.allclose(a.text_cls, b.text_cls, atol=1e-5)
            assert torch.allclose(a.image_cls, b.image_cls, atol=1e-5)
    summary = leaky.pooled if leaky.pooled is not None else leaky.text_cls
    expected = ref.pooled if ref.pooled is not None else ref.text_cls
    assert not torch.allclose(summary, expected, atol=1e-3)


# ----------------------------------------------------------------------------
# parameter groups and state dicts
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_every_parameter_in_exactly_one_group(kind):
    build, stage = ALL_KINDS[kind]
    model = make(build(), stage)
    owner: dict[int, str] = {}
    for name, modules in model.groups().items():
        seen_here: set[int] = set()
        for module in modules:
            for p in module.parameters():
                if id(p) in seen_here:
                    continue
                seen_here.add(id(p))
                assert id(p) not in owner, f"parameter in both {owner[id(p)]} and {name}"
                owner[id(p)] = name
    all_params = {id(p): n for n, p in model.named_parameters()}
    missing = [n for i, n in all_params.items() if i not in owner]
    assert not missing, f"parameters in no group: {missing}"
    group_total = sum(p.numel() for m in model.groups().values() for mod in m for p in mod.parameters())
    assert group_total == sum(p.numel() for p in model.parameters())
    # heads are grouped as heads.<name>
    assert {n for n in model.groups() if n.startswith("heads.")} == {f"heads.{h}" for h in model.heads}


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_state_dict_has_no_aliases_and_round_trips(kind, tmp_path):
    build, stage = ALL_KINDS[kind]
    model = make(build(), stage).eval()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    sd = model.state_dict()
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs)), "state dict holds tensors sharing storage"
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))  # refuses shared tensors
    fresh = make(build(), stage, seed=123).eval()
    first = next(iter(sd))
    assert not torch.equal(fresh.state_dict()[first], sd[first]) or len(sd) == 0
    fresh.load_state_dict(load_file(str(path)), strict=True)
    size = 64 if kind == "two_tower_timm" else 32
    ids, mask, pix = inputs(image_size=size)
    with torch.no_grad():
        a, b = model.encoder(ids, mask, pix), fresh.encoder(ids, mask, pix)
    for x, y in ((a.pooled, b.pooled), (a.text_cls, b.text_cls)):
        if x is not None:
            assert torch.equal(x, y)


def test_fusion_mlp_keeps_the_state_dict_keys_of_earlier_checkpoints():
    """Its second linear is still ``mlp.3`` (a dropout sat at ``mlp.2`` until 2026-11-28): ``init_from``
    keeps only keys this model has, so a renamed key would silently leave that linear untrained."""
    sd = make(two_tower(), {"task": {}}).state_dict()
    mlp = {k.split(".mlp.")[1] for k in sd if k.startswith("encoder.fusion.") and ".mlp." in k}
    assert mlp == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_group_names():
    groups = make(two_tower()).groups()
    assert {"text.embeddings", "text.layers[0]", "text.layers[1]", "text.final",
            "vision.embeddings", "vision.layers[0]", "vision.layers[1]", "vision.final",
            "fusion.proj", "fusion.layers[0]", "fusion.final", "pooler", "heads.mlm", "heads.itm"} == set(groups)
    one = make(one_tower("vision")).groups()
    assert {"backbone.text_embeddings", "backbone.image_embeddings", "backbone.modality_type",
            "backbone.layers[0]", "backbone.layers[1]", "backbone.final"} <= set(one)
    timm_groups = make(two_tower(vision=TIMM_VISION)).groups()
    assert [n for n in timm_groups if n.startswith("vision.layers")] == [f"vision.layers[{i}]" for i in range(4)]


# ----------------------------------------------------------------------------
# pretrained backbones from local directories
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("hf_models")
    torch.manual_seed(42)
    bert = BertModel(BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8))
    with torch.no_grad():  # non-default norms, so "kept" is distinguishable from fresh init
        for model in (bert, vit):
            for name, p in model.named_parameters():
                if "norm" in name.lower():
                    p.normal_()
    bert.save_pretrained(root / "bert")
    vit.save_pretrained(root / "vit")
    return {"bert": root / "bert", "vit": root / "vit",
            "bert_sd": {k: v.clone() for k, v in bert.state_dict().items()},
            "vit_sd": {k: v.clone() for k, v in vit.state_dict().items()}}


def _pretrained_one_tower(path: Path, source: str = "pretrained"):
    return make({"kind": "one_tower", "backbone": {"source": source, "name": str(path), "image_size": 32}},
                {"task": {}})


def _backbone_matches(backbone, saved: dict[str, torch.Tensor]) -> tuple[int, bool]:
    sd = backbone.state_dict()
    assert set(sd) <= set(saved), set(sd) - set(saved)
    assert {k for k in saved if k not in sd} <= {"pooler.dense.weight", "pooler.dense.bias"}
    assert all(sd[k].shape == saved[k].shape for k in sd)
    return len(sd), all(torch.equal(sd[k], saved[k]) for k in sd)


def test_pretrained_text_backbone_from_local_dir(hf_dirs):
    model = _pretrained_one_tower(hf_dirs["bert"])
    enc = model.encoder
    assert enc.modality == "text"
    assert enc.vocab_size == 90  # the backbone's own vocabulary, not the data's
    n, equal = _backbone_matches(enc.backbone, hf_dirs["bert_sd"])
    assert n > 10 and equal
    assert len(enc.layers) == 2
    # its own word embeddings are the text embedding; images get a fresh patch embedding
    assert model.groups()["backbone.text_embeddings"] == [enc.backbone.embeddings]
    assert torch.equal(enc.backbone.embeddings.word_embeddings.weight,
                       hf_dirs["bert_sd"]["embeddings.word_embeddings.weight"])
    ids, mask, pix = inputs()
    ids = ids.clamp(max=89)
    out = model(ids, mask, pix, task=True)
    assert out.logits["task"].shape == (B, N_ANSWERS)
    assert model.encoder(ids, mask, pix).image.shape == (B, 1 + (32 // 16) ** 2, 32)  # default patch 16


def test_pretrained_vision_backbone_keeps_embeddings_and_final_norm(hf_dirs):
    model = _pretrained_one_tower(hf_dirs["vit"])
    enc = model.encoder
    assert enc.modality == "vision"  # inferred from the config
    assert enc.vocab_size == VOCAB  # fresh text embedding sized by the data
    n, equal = _backbone_matches(enc.backbone, hf_dirs["vit_sd"])
    assert n > 10 and equal
    assert enc.norm is enc.backbone.layernorm
    assert torch.equal(enc.norm.weight, hf_dirs["vit_sd"]["layernorm.weight"])
    groups = model.groups()
    assert groups["backbone.final"] == [enc.backbone.layernorm]
    assert groups["backbone.image_embeddings"] == [enc.backbone.embeddings]
    assert groups["backbone.text_embeddings"] == [enc.text_embeddings]

    model.eval()
    ids, mask, pix = inputs()
    # the image embedding is the backbone's own (patches + CLS + positions)
    with torch.no_grad():
        assert torch.allclose(enc.embed_image(pix), enc.backbone.embeddings(pix))
        # the final norm is applied to every output token: with weight 0 and a
        # constant bias, every token comes out as that constant
        enc.norm.weight.zero_()
        enc.norm.bias.fill_(0.5)
        f = enc(ids, mask, pix)
    assert torch.allclose(f.text, torch.full_like(f.text, 0.5))
    assert torch.allclose(f.image, torch.full_like(f.image, 0.5))


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_fresh_embeddings_keep_only_the_encoder_layers(hf_dirs, which):
    """Renaissance's one-tower takes ``model.encoder`` alone: the pretrained layers, none of the backbone's
    embeddings, final norm or pooler; both modalities get fresh embeddings (patch size and vocabulary of
    the preset and the data, not the backbone's)."""
    spec = {"kind": "one_tower", "backbone": {"source": "pretrained", "name": str(hf_dirs[which]), "image_size": 32,
                                              "embeddings": "fresh"}}
    stored = config_from_dict({"model": spec, "task": {}}).to_dict()["model"]  # the fresh patches' size is kept
    assert (stored["backbone"]["embeddings"], stored["backbone"]["patch_size"]) == ("fresh", 16)
    model = make(stored, {"task": {}})
    enc = model.encoder
    sd, saved = enc.backbone.state_dict(), hf_dirs[f"{which}_sd"]
    layer_keys = {k for k in saved if k.split(".")[0] in ("encoder", "layers")}  # BERT: encoder.layer; ViT: layers
    assert len(layer_keys) > 10 and set(sd) == layer_keys
    assert all(torch.equal(sd[k], saved[k]) for k in sd)
    assert enc.norm is None and enc.vocab_size == VOCAB
    groups = model.groups()
    assert groups["backbone.text_embeddings"] == [enc.text_embeddings]
    assert groups["backbone.image_embeddings"] == [enc.image_embeddings]
    assert groups["backbone.final"] == []
    ids, mask, pix = inputs()
    f = enc(ids, mask, pix)
    assert f.image.shape == (B, 1 + (32 // 16) ** 2, 32)  # the preset's (default) 16-pixel patches
    f.pooled.sum().backward()
    assert enc.text_embeddings.word.weight.grad is not None and enc.image_embeddings.proj.weight.grad is not None


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_random_source_same_shapes_fresh_weights(hf_dirs, which):
    model = _pretrained_one_tower(hf_dirs[which], source="random")
    saved = hf_dirs[f"{which}_sd"]
    sd = model.encoder.backbone.state_dict()
    assert set(sd) <= set(saved) and all(sd[k].shape == saved[k].shape for k in sd)
    weights = [k for k in sd if k.endswith("weight") and sd[k].ndim == 2]
    assert weights and not any(torch.equal(sd[k], saved[k]) for k in weights)
    assert model.encoder.modality == ("vision" if which == "vit" else "text")


def test_pretrained_two_tower_towers_from_local_dirs(hf_dirs):
    model = make(two_tower(text={"source": "pretrained", "name": str(hf_dirs["bert"])},
                           vision={"source": "pretrained", "name": str(hf_dirs["vit"]), "image_size": 32}),
                 PRETRAIN)
    assert _backbone_matches(model.encoder.text.model, hf_dirs["bert_sd"])[1]
    assert _backbone_matches(model.encoder.vision.model, hf_dirs["vit_sd"])[1]
    assert model.heads["mlm"].decoder.out_features == 90
    ids, mask, pix = inputs()
    with torch.no_grad():
        f = model.encoder(ids.clamp(max=89), mask, pix)
        # the vision tower returns the ViT's own final-normed tokens
        from transformers import ViTModel

        vit = ViTModel.from_pretrained(str(hf_dirs["vit"]), add_pooling_layer=False).eval()
        model.eval()
        assert torch.allclose(model.encoder.vision(pix), vit(pixel_values=pix).last_hidden_state, atol=1e-5)
    assert f.image.shape == (B, 17, 32)


# ----------------------------------------------------------------------------
# load errors
# ----------------------------------------------------------------------------


def test_unreachable_hub_id_is_a_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "prajjwal1/bert-tiny"
    with pytest.raises(ModelLoadError) as info:
        _pretrained_one_tower(name)  # type: ignore[arg-type]
    msg = str(info.value)
    assert name in msg
    assert "model.backbone.name" in msg
    assert "local-dir" in msg and "directory" in msg


def test_unreachable_hub_id_in_a_tower_names_its_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"model\.text\.name = 'prajjwal1/bert-tiny'"):
        make(two_tower(text={"source": "random", "name": "prajjwal1/bert-tiny"}))


def test_missing_local_directory_is_a_model_load_error():
    with pytest.raises(ModelLoadError) as info:
        _pretrained_one_tower(Path("/nonexistent/model"))
    msg = str(info.value)
    assert "/nonexistent/model" in msg and "does not exist" in msg


def test_directory_without_a_model_is_a_model_load_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load a model"):
        _pretrained_one_tower(tmp_path / "empty")


def test_unknown_timm_model_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="not a timm model"):
        make(two_tower(vision={**TIMM_VISION, "name": "resnet_does_not_exist"}))


# ----------------------------------------------------------------------------
# gradient checkpointing
# ----------------------------------------------------------------------------


def _count_calls(layers) -> list[int]:
    """Calls of each layer's key projection (hooks on a submodule also fire when the backward pass
    recomputes a checkpointed layer; a last layer computed for some rows only still projects keys)."""
    counts = [0] * len(layers)
    for i, layer in enumerate(layers):
        attention = getattr(layer.attention, "self", layer.attention)  # BERT-style or ViT-style
        key = getattr(attention, "key", None) or attention.k_proj
        key.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("kind", ["one_tower", "two_tower"])
def test_gradient_checkpointing_trains_a_step(kind):
    if kind == "one_tower":
        plain_cfg, ckpt_cfg = one_tower(), one_tower(gradient_checkpointing=True)
    else:
        ckpt_tower = {**TINY, "gradient_checkpointing": True}
        plain_cfg = two_tower()
        ckpt_cfg = two_tower(text={**ckpt_tower, "max_positions": 16},
                             vision={**ckpt_tower, "patch_size": 8, "image_size": 32})
    plain, ckpt = make(plain_cfg), make(ckpt_cfg)
    ckpt.load_state_dict(plain.state_dict())
    if kind == "one_tower":
        layers = list(ckpt.encoder.layers)
    else:
        layers = [*ckpt.encoder.text.model.encoder.layer, *ckpt.encoder.vision.model.layers]
    counts = _count_calls(layers)
    plain_layers = list(plain.encoder.layers) if kind == "one_tower" else plain.encoder.text.model.encoder.layer
    plain_counts = _count_calls(plain_layers)

    ids, mask, pix = inputs()
    pos = mlm_positions(mask)
    grads = []
    for model in (plain, ckpt):
        model.train()
        out = model(ids, mask, pix, mlm_positions=pos, itm_rows=slice(0, B))
        loss = out.logits["mlm"].logsumexp(-1).mean() + out.logits["itm"].square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # each checkpointed layer ran again in the backward pass
    assert counts == [2] * len(layers)
    assert set(plain_counts) == {1}
    for n, g in grads[0].items():
        assert grads[1][n] is not None, n
        assert torch.allclose(g, grads[1][n], atol=1e-5), n
    opt = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in layers[0].attention.state_dict().items()}
    opt.step()
    after = layers[0].attention.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_timm_tower(checkpointing):
    """timm's ResNet recomputes each stage's blocks in the backward pass when checkpointing is on, and only then."""
    model = make(two_tower(vision={**TIMM_VISION, "gradient_checkpointing": checkpointing}), PRETRAIN)
    model.train()
    blocks = [stage[0] for stage in (model.encoder.vision.model.layer1, model.encoder.vision.model.layer4)]
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.conv1.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids, mask, pix = inputs(b=2, image_size=64)
    out = model(ids, mask[:2], pix, itm_rows=slice(0, 2))
    assert calls == [1, 1]
    out.logits["itm"].sum().backward()
    assert calls == ([2, 2] if checkpointing else [1, 1])
    assert model.encoder.vision.model.conv1.weight.grad is not None


REFCOCO = {"task": {"name": "refcoco"}, "data": {"dataset": "refcoco", "root": "/unused"}}
QUADRANTS = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]])


@pytest.mark.parametrize("model_cfg", [one_tower("vision"), two_tower()], ids=["one_tower", "two_tower"])
def test_refcoco_head_scores_each_box_and_learns_through_the_encoder(model_cfg):
    model = make(model_cfg, REFCOCO)
    ids, mask, pix = inputs()
    boxes = QUADRANTS.expand(B, -1, -1).clone()
    box_mask = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    labels = torch.tensor([3, 0, 1])
    logits = model(ids, mask, pix, task=True, boxes=boxes, box_mask=box_mask).logits["task"]
    assert logits.shape == (B, 4) and logits[2, 3] == float("-inf") and torch.isfinite(logits[:2]).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        out = model(ids, mask, pix, task=True, boxes=boxes, box_mask=box_mask).logits["task"]
        loss = torch.nn.functional.cross_entropy(out, labels)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
    fused = model.encoder.layers if model_cfg["kind"] == "one_tower" else model.encoder.fusion
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fused.parameters())


def test_stored_config_of_a_vision_backbone_builds_again(hf_dirs):
    """The run's stored config (a finetune inherits its [model]) must build the same model: the default
    patch_size (16) is not written for a vision backbone whose own patches are 8 pixels."""
    raw = {"model": {"kind": "one_tower", "backbone": {"source": "pretrained", "name": str(hf_dirs["vit"]),
                                                        "image_size": 32}},
           "objectives": {"mlm": {"weight": 1.0}}, "data": {"dataset": "easy_vqa"}}
    stored = config_from_dict(raw, source="preset").to_dict()
    assert "patch_size" not in stored["model"]["backbone"]
    model = make(config_from_dict(stored, source="stored run config").to_dict()["model"], {"task": {}})
    assert model.encoder.backbone.config.patch_size == 8
    # a patch size the preset does give is kept, and a wrong one is still refused
    raw["model"]["backbone"]["patch_size"] = 16
    stored = config_from_dict(raw, source="preset").to_dict()
    assert stored["model"]["backbone"]["patch_size"] == 16
    with pytest.raises(ConfigError, match="patches of 8"):
        make(stored["model"], {"task": {}})


# ----------------------------------------------------------------------------
# hidden and attention dropout
# ----------------------------------------------------------------------------


def _dropouts(module: torch.nn.Module) -> set[float]:
    return {m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_attention_dropout_is_set_apart_from_hidden_dropout(modality):
    model = make(one_tower(modality, dropout=0.1, attention_dropout=0.0), {"task": {}})
    config = model.encoder.backbone.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.0)
    layer = model.encoder.layers[0]
    attention = layer.attention.self.dropout.p if modality == "text" else layer.attention.attention_dropout
    assert attention == 0.0 and _dropouts(layer) == {0.1} | ({0.0} if modality == "text" else set())
    same = make(one_tower(modality, dropout=0.1), {"task": {}}).encoder.backbone.config
    assert same.attention_probs_dropout_prob == same.hidden_dropout_prob == 0.1  # unset: follows dropout


def test_attention_dropout_of_a_pretrained_tower_and_of_the_fusion(hf_dirs):
    model = make(two_tower(text={"source": "pretrained", "name": str(hf_dirs["bert"]), "dropout": 0.2,
                                 "attention_dropout": 0.05},
                           vision={**TINY, "patch_size": 8, "image_size": 32, "attention_dropout": 0.3}))
    text, vision = model.encoder.text.model.config, model.encoder.vision.model.config
    assert (text.hidden_dropout_prob, text.attention_probs_dropout_prob) == (0.2, 0.05)
    assert (vision.hidden_dropout_prob, vision.attention_probs_dropout_prob) == (0.0, 0.3)
    fusion = make(two_tower() | {"fusion": {**FUSION, "dropout": 0.1, "attention_dropout": 0.0}}).encoder.fusion[0]
    assert fusion.text.self_attn.dropout == fusion.image.cross_attn.dropout == 0.0
    assert fusion.text.drop.p == 0.1
    default = make(two_tower() | {"fusion": {**FUSION, "dropout": 0.1}}).encoder.fusion[0]
    assert default.text.self_attn.dropout == default.image.cross_attn.dropout == 0.1


def test_attention_dropout_is_stored_only_when_set_and_checked():
    stored = config_from_dict({"model": one_tower(), **PRETRAIN}).to_dict()
    assert "attention_dropout" not in stored["model"]["backbone"]
    cfg = config_from_dict({"model": one_tower(attention_dropout=0.0), **PRETRAIN})
    assert config_from_dict(cfg.to_dict()) == cfg and cfg.model.backbone.attention_p == 0.0
    with pytest.raises(ConfigError, match="attention_dropout"):
        config_from_dict({"model": one_tower(attention_dropout=1.5), **PRETRAIN})


# ----------------------------------------------------------------------------
# learning-rate multipliers
# ----------------------------------------------------------------------------


def _lr_of(model, modules) -> set[float]:
    from engine.train import param_groups

    lr = {id(p): g["lr"] for g in param_groups(model, lr=1.0, weight_decay=0.01, head_lr_mult=10.0,
                                                     fusion_lr_mult=5.0) for p in g["params"]}
    return {lr[id(p)] for m in modules for p in m.parameters()}


def test_poolers_learn_at_their_reference_rate():
    """METER's cross-modal poolers take the cross-modal multiplier, ViLT's pooler the base rate; the task
    head takes the head multiplier in both."""
    two = make(two_tower(), {"task": {}})
    assert _lr_of(two, two.groups()["pooler"]) == {5.0}
    assert _lr_of(two, two.groups()["fusion.layers[0]"]) == {5.0}
    assert _lr_of(two, [two.heads["task"]]) == {10.0}
    one = make(one_tower("text", "double"), {"task": {}})
    assert _lr_of(one, one.groups()["pooler"]) == {1.0}
    assert _lr_of(one, [one.heads["task"]]) == {10.0}


# ----------------------------------------------------------------------------
# a pretrained tower's own dropout
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory) -> Path:
    """A tiny BERT whose config says hidden dropout 0.1 and attention dropout 0.05."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("dropout_bert") / "bert"
    BertModel(BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.05)).save_pretrained(path)
    return path


@pytest.mark.parametrize("source", ["pretrained", "random"])
def test_a_named_tower_keeps_its_checkpoints_dropout(dropout_bert, source):
    """Unset, the dropout is the checkpoint's own, and the stored config says so; a preset's value wins;
    manual towers keep 0.0."""
    tower = {"source": source, "name": str(dropout_bert)}
    cfg = config_from_dict({"model": two_tower(text=tower), **PRETRAIN})
    assert (cfg.model.text.dropout, cfg.model.text.attention_p) == (0.1, 0.05)
    stored = cfg.to_dict()["model"]["text"]
    assert (stored["dropout"], stored["attention_dropout"]) == (0.1, 0.05)
    assert config_from_dict(cfg.to_dict()) == cfg
    built = build_model(cfg, vocab_size=VOCAB).encoder.text.model
    assert (built.config.hidden_dropout_prob, built.config.attention_probs_dropout_prob) == (0.1, 0.05)
    assert _dropouts(built.encoder) == {0.1, 0.05}
    backbone = config_from_dict({"model": {"kind": "one_tower", "backbone": tower}, **PRETRAIN}).model.backbone
    assert (backbone.dropout, backbone.attention_p) == (0.1, 0.05)
    chosen = config_from_dict({"model": two_tower(text={**tower, "dropout": 0.0}), **PRETRAIN}).model.text
    assert (chosen.dropout, chosen.attention_p) == (0.0, 0.0)
    manual = config_from_dict({"model": two_tower(), **PRETRAIN}).model.text
    assert (manual.dropout, manual.attention_p) == (0.0, 0.0)


def test_reading_a_checkpoints_dropout_loads_no_torch():
    """Validating a preset stays light (the TUI validates in its own process): the dropout comes from the
    checkpoint's config.json (here ELECTRA-small's, 0.1, in the tests' hub cache)."""
    import subprocess
    import sys

    code = ("import sys; from engine.config import config_from_dict\n"
            "cfg = config_from_dict({'model': {'kind': 'one_tower', 'backbone': {'source': 'pretrained', "
            "'name': 'google/electra-small-discriminator'}}, 'objectives': {'mlm': {}}})\n"
            "print(cfg.model.backbone.dropout, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["0.1", "False", "False"]
