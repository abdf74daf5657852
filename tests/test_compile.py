"""``train.compile``: the model under torch.compile trains as eager training does, with freezing, gradient
checkpointing, the last layer's rows and a resume; the blocks it compiles, and the names it keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import config_from_dict
from engine.errors import ConfigError
from engine.models import build_model
from engine.models.compiling import compile_model
from engine.runs import FINAL_WEIGHTS
from engine.store import Store
from engine.train import latest_checkpoint, train
from tests.helpers.training import TermAt, start, tiny_pretrain


def _pretrain(cache: Path, **train_keys: object) -> dict:
    """The tiny two-tower pretraining (MLM, ITM, ITC) with two layers per tower, no dropout anywhere (so eager
    and compiled draw nothing that could differ), the text tower checkpointed and the vision embeddings frozen."""
    raw = tiny_pretrain(cache)
    raw["model"]["text"].update(layers=2, dropout=0.0, gradient_checkpointing=True)
    raw["model"]["vision"].update(layers=2, dropout=0.0)
    raw["model"]["fusion"].update(dropout=0.0)
    raw["freeze"] = {"groups": ["vision.embeddings"]}
    raw["train"].update(max_steps=4, log_every=1, checkpoint_every=2, **train_keys)
    return raw


def test_regions_are_the_repeated_blocks_and_every_name_stays(data_cache: Path) -> None:
    cfg = config_from_dict(_pretrain(data_cache))
    model = build_model(cfg, vocab_size=100)
    names = list(model.state_dict())
    compiled = compile_model(model)
    assert compiled == ["encoder.text.model.encoder.layer.0", "encoder.text.model.encoder.layer.1",
                        "encoder.vision.model.layers.0", "encoder.vision.model.layers.1", "encoder.fusion.0"]
    assert list(model.state_dict()) == names  # compiled in place: checkpoints and freezing see the same names
    whole = build_model(cfg, vocab_size=100)
    assert compile_model(whole, regions=False) == [""] and list(whole.state_dict()) == names


def test_compile_options_need_compile() -> None:
    raw = {"model": {"kind": "one_tower"}, "task": {"name": "vqa"}, "train": {"compile_mode": "max-autotune"}}
    with pytest.raises(ConfigError, match="compile_mode only applies with compile = true"):
        config_from_dict(raw)
    raw["train"]["compile"] = True
    cfg = config_from_dict(raw)
    assert cfg.train.compile_mode == "max-autotune" and cfg.train.compile_regions
    assert config_from_dict(cfg.to_dict()) == cfg  # the stored config validates again
    assert "compile_mode" not in config_from_dict({**raw, "train": {}}).to_dict()["train"]


@pytest.mark.slow
def test_compiled_training_matches_eager_through_freezing_checkpointing_and_a_resume(tmp_path: Path,
                                                                                     data_cache: Path) -> None:
    """Four steps eager, against four compiled steps stopped at the step-2 checkpoint and resumed: the same
    losses within float rounding, the frozen embeddings untouched, and the compiler did compile."""
    import torch._dynamo.utils
    from safetensors.torch import load_file

    eager_store = Store(tmp_path / "eager")
    cfg, eager_id = start(eager_store, _pretrain(data_cache))
    train(cfg, eager_store, eager_id)

    store = Store(tmp_path / "compiled")
    cfg, run_id = start(store, _pretrain(data_cache, compile=True))
    torch._dynamo.utils.counters.clear()
    train(cfg, store, run_id, reporter=TermAt(2))
    assert store.get_run(run_id).status == "cancelled"
    assert latest_checkpoint(store.run_dir(run_id)).name == "step_00000002"
    train(cfg, store, run_id, resume=True)
    assert store.get_run(run_id).status == "finished"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # text, vision and fusion blocks

    eager, compiled = eager_store.series(eager_id, "loss"), store.series(run_id, "loss")
    assert [s for s, _ in compiled] == [s for s, _ in eager] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-4)
    eager_weights = load_file(str(eager_store.run_dir(eager_id) / FINAL_WEIGHTS))
    weights = load_file(str(store.run_dir(run_id) / FINAL_WEIGHTS))
    assert weights.keys() == eager_weights.keys()
    at_stop = load_file(str(store.run_dir(run_id) / "checkpoints" / "step_00000002" / "model.safetensors"))
    frozen = [name for name in weights if name.startswith("encoder.vision.model.embeddings")]
    assert frozen
    for name in frozen:  # frozen: equal to eager's, and unmoved from the checkpoint to the end
        assert torch.equal(weights[name], eager_weights[name]) and torch.equal(weights[name], at_stop[name]), name
    moved = [n for n in weights if not torch.equal(weights[n], eager_weights[n])]
    for name in moved:
        assert torch.allclose(weights[name], eager_weights[name], rtol=1e-3, atol=1e-5), name
