"""Freezing by named parameter groups: pattern semantics, requires_grad, gradients
and train/eval mode of frozen modules."""

from __future__ import annotations

import pytest
import torch

from engine.config import FreezeConfig, config_from_dict
from engine.errors import ConfigError
from engine.freeze import apply_freeze, matches, report
from engine.models import build_model

VOCAB = 60

# ----------------------------------------------------------------------------
# matches
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # exact
        ("vision.embeddings", "vision.embeddings", True),
        ("vision.embeddings", "text.embeddings", False),
        ("heads.itm", "heads.itm", True),
        # prefix at a dot boundary
        ("text", "text.layers[3]", True),
        ("text", "text.embeddings", True),
        ("text", "textual.layers[0]", False),
        ("fusion", "fusion.layers[0]", True),
        ("heads", "heads.mlm", True),
        ("vision", "text.layers[0]", False),
        # a layer-list prefix selects every layer of the list
        ("vision.layers", "vision.layers[3]", True),
        ("vision.layers", "vision.embeddings", False),
        # globs
        ("vision.layers*", "vision.layers[3]", True),
        ("vision.layers*", "text.layers[3]", False),
        ("*.embeddings", "vision.embeddings", True),
        ("*.embeddings", "backbone.text_embeddings", False),
        ("backbone.*_embeddings", "backbone.image_embeddings", True),
        ("*", "pooler", True),
        # slices
        ("text.layers[0:2]", "text.layers[0]", True),
        ("text.layers[0:2]", "text.layers[1]", True),
        ("text.layers[0:2]", "text.layers[2]", False),
        ("text.layers[2:]", "text.layers[1]", False),
        ("text.layers[2:]", "text.layers[2]", True),
        ("text.layers[2:]", "text.layers[10]", True),
        ("text.layers[:3]", "text.layers[2]", True),
        ("text.layers[:3]", "text.layers[3]", False),
        ("text.layers[0:2]", "vision.layers[0]", False),
        ("text.layers[0:2]", "text.embeddings", False),
        ("*.layers[0:1]", "vision.layers[0]", True),
        ("*.layers[0:1]", "fusion.layers[1]", False),
        # an index is exact, never a prefix of a longer index
        ("text.layers[1]", "text.layers[1]", True),
        ("text.layers[1]", "text.layers[10]", False),
        ("text.layers[1]", "text.layers[11]", False),
        ("text.layers[10]", "text.layers[1]", False),
    ],
)
def test_matches(pattern, name, expected):
    assert matches(pattern, name) is expected


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------


def _two_tower(dropout: float = 0.0, layers: int = 2, **extra):
    tower = {"hidden_size": 32, "layers": layers, "heads": 2, "dropout": dropout}
    cfg = config_from_dict({
        "model": {
            "kind": "two_tower",
            "text": {**tower, "max_positions": 16},
            "vision": {**tower, "patch_size": 8, "image_size": 32},
            "fusion": {"hidden_size": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": dropout},
        },
        "objectives": {"mlm": {}, "itm": {}, "itc": {}},
        **extra,
    })
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=VOCAB)


def _one_tower(layers: int = 2, dropout: float = 0.0):
    cfg = config_from_dict({
        "model": {
            "kind": "one_tower",
            "pooler": "double",
            "backbone": {"hidden_size": 32, "layers": layers, "heads": 2, "patch_size": 8,
                         "image_size": 32, "max_text_positions": 16, "dropout": dropout},
        },
        "task": {},
    })
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=VOCAB, num_answers=5)


def _inputs(b: int = 3, length: int = 8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, length - 3:] = 0
    return ids, mask, torch.randn(b, 3, 32, 32, generator=g)


def _loss(model) -> torch.Tensor:
    ids, mask, pix = _inputs()
    heads = model.heads
    if "task" in heads:
        return model(ids, mask, pix, task=True).logits["task"].square().mean()
    pos = torch.zeros_like(mask, dtype=torch.bool)
    pos[:, 1:3] = True
    out = model(ids, mask, pix, mlm_positions=pos, itm_rows=slice(0, 3), itc=True)
    return sum(v.square().mean() for v in out.logits.values())


def _group_params(model) -> dict[str, list[torch.nn.Parameter]]:
    return {name: [p for m in mods for p in m.parameters()] for name, mods in model.groups().items()}


# ----------------------------------------------------------------------------
# apply_freeze
# ----------------------------------------------------------------------------


def test_report_matches_requires_grad_per_group():
    model = _two_tower()
    rep = apply_freeze(model, FreezeConfig(groups=("vision", "text.layers[0:1]", "text.embeddings")))
    rows = {g.name: g for g in rep.groups}
    for name, params in _group_params(model).items():
        assert rows[name].total == sum(p.numel() for p in params)
        assert rows[name].trainable == sum(p.numel() for p in params if p.requires_grad)
    assert rows["vision.layers[1]"].trainable == 0 and rows["vision.layers[1]"].total > 0
    assert rows["text.layers[0]"].trainable == 0
    assert rows["text.layers[1]"].trainable == rows["text.layers[1]"].total > 0
    assert rows["fusion.layers[0]"].trainable == rows["fusion.layers[0]"].total > 0
    assert rep.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.total == sum(p.numel() for p in model.parameters())
    assert rep.by_prefix()["vision"][1] == 0
    assert report(model) == rep  # report() reads the model as it stands


def test_unfreeze_exceptions():
    model = _two_tower()
    apply_freeze(model, FreezeConfig(groups=("text", "vision"), unfreeze=("text.layers[1:]", "*.final")))
    params = _group_params(model)
    for name, ps in params.items():
        trainable = {p.requires_grad for p in ps}
        if name in ("text.layers[1]", "fusion.layers[0]", "fusion.proj", "pooler") or name.startswith("heads."):
            assert trainable == {True}, name
        elif name.startswith(("text.", "vision.")) and not name.endswith(".final"):
            assert trainable == {False}, name


def test_refreezing_replaces_the_previous_spec():
    model = _two_tower()
    apply_freeze(model, FreezeConfig(groups=("vision",)))
    rep = apply_freeze(model, FreezeConfig(groups=("text",)))
    assert rep.by_prefix()["vision"][0] == rep.by_prefix()["vision"][1]
    assert rep.by_prefix()["text"][1] == 0


@pytest.mark.parametrize("key", ["groups", "unfreeze"])
def test_pattern_matching_nothing_is_a_config_error(key):
    model = _two_tower()
    spec = {"groups": ("vision",), "unfreeze": ()}
    spec[key] = (*spec[key], "vison.layers[0]")
    with pytest.raises(ConfigError) as info:
        apply_freeze(model, FreezeConfig(**spec))
    msg = str(info.value)
    assert f"freeze.{key}" in msg
    assert "'vison.layers[0]'" in msg
    assert "vision.layers[0]" in msg  # the near miss is suggested
    assert "ren validate" in msg
    # nothing was changed by the failed call when it happens on the first pattern list
    if key == "groups":
        assert all(p.requires_grad for p in model.parameters() if p is not model.heads["itc"].logit_scale)


def test_slice_out_of_range_is_an_error():
    model = _two_tower()
    with pytest.raises(ConfigError, match=r"text\.layers\[5:\]"):
        apply_freeze(model, FreezeConfig(groups=("text.layers[5:]",)))


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------


def _assert_grads_follow_freeze(model):
    model.train()
    model.zero_grad(set_to_none=True)
    _loss(model).backward()
    n_frozen = n_trainable = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            n_trainable += 1
            assert p.grad is not None, f"trainable {name} got no gradient"
        else:
            n_frozen += 1
            assert p.grad is None, f"frozen {name} got a gradient"
    assert n_frozen > 0 and n_trainable > 0


def test_grads_when_the_vision_tower_is_frozen():
    model = _two_tower()
    apply_freeze(model, FreezeConfig(groups=("vision",)))
    _assert_grads_follow_freeze(model)
    assert not any(p.requires_grad for p in model.encoder.vision.parameters())


def test_grads_when_the_bottom_half_is_frozen():
    model = _two_tower()
    apply_freeze(model, FreezeConfig(groups=("*.embeddings", "text.layers[:1]", "vision.layers[0:1]")))
    _assert_grads_follow_freeze(model)
    assert model.encoder.text.model.encoder.layer[1].output.dense.weight.grad is not None
    assert model.encoder.text.model.encoder.layer[0].output.dense.weight.grad is None


def test_grads_one_tower_bottom_half_frozen():
    model = _one_tower()
    apply_freeze(model, FreezeConfig(groups=("backbone.layers[:1]",)))
    _assert_grads_follow_freeze(model)
    # gradients still flow *through* the frozen layer to the trainable embeddings
    assert model.encoder.image_embeddings.proj.weight.grad is not None


# ----------------------------------------------------------------------------
# frozen modules: eval mode, no graph
# ----------------------------------------------------------------------------


def test_frozen_tower_stays_in_eval_mode_and_builds_no_graph():
    model = _two_tower(dropout=0.3)
    apply_freeze(model, FreezeConfig(groups=("vision",)))
    model.train()
    vision, text = model.encoder.vision, model.encoder.text
    assert all(not m.training for layer in vision.model.layers for m in layer.modules())
    assert vision.model.embeddings.dropout.training is False
    assert text.model.encoder.training and model.encoder.fusion.training

    _, _, pix = _inputs()
    ids, mask, _ = _inputs()
    a, b = vision(pix), vision(pix)
    assert torch.equal(a, b)  # no dropout in the frozen tower
    assert not a.requires_grad and a.grad_fn is None  # no autograd graph through it
    # control: the trainable text tower still applies dropout in train mode
    t1, t2 = text(ids, mask), text(ids, mask)
    assert not torch.allclose(t1, t2)
    assert t1.requires_grad

    # model.train() / eval() round trips keep the frozen tower in eval
    model.eval()
    model.train()
    assert not vision.model.layers[0].training
    assert torch.equal(vision(pix), a)


def test_partially_frozen_layers_stay_in_eval():
    model = _two_tower(dropout=0.3)
    apply_freeze(model, FreezeConfig(groups=("text.embeddings", "text.layers[0]")))
    model.train()
    layers = model.encoder.text.model.encoder.layer
    assert not layers[0].training and not model.encoder.text.model.embeddings.training
    assert layers[1].training


def test_unfrozen_after_refreeze_trains_again():
    model = _two_tower(dropout=0.3)
    apply_freeze(model, FreezeConfig(groups=("vision",)))
    apply_freeze(model, FreezeConfig())
    model.train()
    _, _, pix = _inputs()
    assert model.encoder.vision.model.layers[0].training
    assert not torch.allclose(model.encoder.vision(pix), model.encoder.vision(pix))


@pytest.mark.parametrize("learn", [True, False])
def test_itc_temperature_trainable_only_when_learned(learn):
    cfg = config_from_dict({
        "model": {"kind": "dual_encoder",
                  "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_positions": 16},
                  "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 8, "image_size": 32},
                  "projection_dim": 16},
        "objectives": {"itc": {"temperature": 0.1, "learn_temperature": learn}},
    })
    model = build_model(cfg, vocab_size=VOCAB)
    head = model.heads["itc"]
    # apply_freeze (always run before training) must not turn a fixed temperature trainable
    apply_freeze(model, FreezeConfig(groups=("vision",)))
    apply_freeze(model, FreezeConfig())
    assert "heads.itc.logit_scale" in model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("heads.itc.logit_scale" in trainable) is learn
    before = head.logit_scale.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids, mask, pix = _inputs()
    model(ids, mask, pix, itc=True).logits["itc"].logsumexp(1).mean().backward()
    opt.step()
    assert torch.allclose(before, torch.tensor(10.0).log())
    assert torch.equal(head.logit_scale.detach(), before) is not learn
