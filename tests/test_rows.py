"""The last layer computed only for the rows the heads read (``engine.models.rows``): the kept rows and
every gradient equal the full layer's, for each registered Hugging Face family and for ren's fusion
layers, and the work really shrinks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.models import rows as R
from engine.models.layers import additive_mask
from tests.helpers.models import PRETRAIN, inputs, make, mlm_positions, one_tower, two_tower


def _family_layers() -> dict[str, torch.nn.Module]:
    """Layer 0 of a tiny random model of each registered family, as ren builds them (SDPA attention)."""
    from transformers import AutoModel, BertConfig, DeiTConfig, ElectraConfig, RobertaConfig, ViTConfig

    from engine.models.hf import encoder_layers

    text = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                  image_size=16, patch_size=8)
    configs = {"BertLayer": BertConfig(**text), "RobertaLayer": RobertaConfig(**text),
               "ElectraLayer": ElectraConfig(**text, embedding_size=16),
               "ViTLayer": ViTConfig(**vision), "DeiTLayer": DeiTConfig(**vision)}
    torch.manual_seed(0)
    layers = {}
    for name, config in configs.items():
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        model = AutoModel.from_config(config, attn_implementation="sdpa")
        layers[name] = encoder_layers(model, name)[0]
    return layers


LAYERS = _family_layers()


def test_every_registered_family_is_covered():
    assert set(LAYERS) == set(R.LAYOUTS)
    assert all(R.supports_rows(layer) for layer in LAYERS.values())


@pytest.mark.parametrize("family", sorted(R.LAYOUTS))
@pytest.mark.parametrize("rows", [slice(0, 1), slice(0, 5), torch.tensor([0, 6])], ids=["cls", "prefix", "index"])
@pytest.mark.parametrize("train", [False, True])
def test_kept_rows_and_gradients_equal_the_full_layer(family, rows, train):
    layer = LAYERS[family].train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 32, generator=g, requires_grad=True)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    attn = additive_mask(mask, x.dtype)
    weight = torch.randn(3, x[:, rows].shape[1], 32, generator=g)  # a loss that weighs every kept value

    full = R.run_layer(layer, x, attn)[:, rows]
    (full * weight).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()

    part = R.layer_rows(layer, x, attn, rows)
    (part * weight).sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    layer.zero_grad()


def test_an_unregistered_layer_runs_whole_and_is_sliced():
    class Scale(torch.nn.Module):  # not a registered family: the fallback must still be right
        def forward(self, x, attention_mask=None):
            return (x * 2,)

    x = torch.randn(2, 5, 4)
    assert not R.supports_rows(Scale())
    torch.testing.assert_close(R.layer_rows(Scale(), x, None, slice(0, 2)), x[:, :2] * 2)


def test_a_layer_with_an_fsdp_unit_inside_runs_whole():
    import copy

    class FullyShardedDataParallel(torch.nn.Module):  # FSDP1's wrapper, as size-based wrapping places it
        def __init__(self, module):
            super().__init__()
            self._fsdp_wrapped_module = module

        def forward(self, *args, **kwargs):
            return self._fsdp_wrapped_module(*args, **kwargs)

    layer = copy.deepcopy(LAYERS["ViTLayer"]).eval()
    layer.mlp = FullyShardedDataParallel(layer.mlp)
    assert not R.supports_rows(layer)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(R.layer_rows(layer, x, None, slice(0, 1)), R.run_layer(layer, x, None)[:, :1])


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", sorted(R.LAYOUTS))
def test_one_row_costs_a_fraction_of_the_layer(family):
    layer = LAYERS[family].eval()
    x = torch.randn(2, 64, 32)
    full = _flops(lambda: R.run_layer(layer, x, None))
    one = _flops(lambda: R.layer_rows(layer, x, None, slice(0, 1)))
    # keys and values of 64 rows (2 of the 12 D^2 per row at MLP x1.5: 2 / 8) plus one row's worth
    assert one < 0.3 * full, (one, full)


MODELS = {
    "one_tower_vision": lambda: one_tower("vision"),
    "one_tower_text": lambda: one_tower("text"),
    "one_tower_vision_double": lambda: one_tower("vision", "double"),
    "one_tower_text_double": lambda: one_tower("text", "double"),
    "two_tower": two_tower,
}


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_task_logits_and_gradients_equal_the_full_encoder(kind):
    model = make(MODELS[kind](), {"task": {}}).train()
    ids, mask, pix = inputs()
    head = model.heads["task"]
    full = head(model.encoder(ids, mask, pix, tokens=("text", "image")).pooled)
    full.square().sum().backward()
    want = _grads(model)
    out = model(ids, mask, pix, task=True)
    assert out.features.text is None and out.features.image is None
    out.logits["task"].square().sum().backward()
    got = _grads(model)
    torch.testing.assert_close(out.logits["task"], full, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pretraining_heads_read_the_same_values(kind):
    model = make(MODELS[kind](), PRETRAIN).eval()
    ids, mask, pix = inputs()
    positions = mlm_positions(mask)
    with torch.no_grad():
        full = model.encoder(ids, mask, pix)
        out = model(ids, mask, pix, mlm_positions=positions, itm_rows=slice(0, 2))
    assert out.features.image is None and out.features.text.shape == full.text.shape
    torch.testing.assert_close(out.features.text, full.text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits["mlm"], model.heads["mlm"](full.text[positions]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits["itm"], model.heads["itm"](full.pooled[:2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["one_tower_vision", "two_tower"])
def test_a_classifier_step_does_less_work(kind):
    model = make(MODELS[kind](), {"task": {}}).train()
    ids, mask, pix = inputs()
    full = _flops(lambda: model.heads["task"](model.encoder(ids, mask, pix).pooled).sum().backward())
    part = _flops(lambda: model(ids, mask, pix, task=True).logits["task"].sum().backward())
    assert part < 0.9 * full, (part, full)
