"""Presets: loading, extends, overrides, and the error messages for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import RunConfig, config_from_dict, load_preset, parse_override
from engine.errors import ConfigError
from tests.helpers.paths import PRESETS, REPO

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"

SHIPPED = sorted(PRESETS.glob("*.toml"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("preset", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_preset_validates_and_builds(preset: Path) -> None:
    import torch

    from engine.data.pipeline import build_tokenizer, num_answers
    from engine.freeze import apply_freeze
    from engine.inspector import _as_random
    from engine.models import build_model

    cfg = load_preset(preset)
    assert cfg.run.name
    tokenizer = build_tokenizer(cfg)
    with torch.device("meta"):
        model = build_model(_as_random(cfg), vocab_size=len(tokenizer), num_answers=num_answers(cfg))
    report = apply_freeze(model, cfg.freeze)
    assert report.trainable > 0
    assert report.total == sum(p.numel() for p in model.parameters())


def test_shipped_presets_open_with_a_how_to_run_comment() -> None:
    for preset in SHIPPED:
        first = preset.read_text().splitlines()[0]
        assert first.startswith("#"), f"{preset.name} should open with a comment saying how to run it"


def test_resolved_config_round_trips() -> None:
    cfg = load_preset(PRESETS / "quickstart.toml")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert again.stage == "finetune"


def test_config_is_frozen() -> None:
    cfg = load_preset(PRESETS / "quickstart.toml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.max_steps = 5  # type: ignore[misc]


def test_overrides_are_typed_toml_values() -> None:
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("train.max_steps=200") == (["train", "max_steps"], 200)
    assert parse_override("freeze.groups=['backbone.layers[0:2]']") == (["freeze", "groups"], ["backbone.layers[0:2]"])
    assert parse_override("run.name=my run") == (["run", "name"], "my run")
    cfg = load_preset(PRESETS / "quickstart.toml", ["optim.lr=3e-4", "train.max_steps=200"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 200


def test_override_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_preset(PRESETS / "quickstart.toml", ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_preset(PRESETS / "quickstart.toml", ["optim.lrr=1"])


def test_extends_merges_tables_key_by_key(tmp_path: Path) -> None:
    base = _write(tmp_path, "base.toml", (ONE_TOWER).read_text())
    child = _write(
        tmp_path, "child.toml", 'extends = "base.toml"\n[model.backbone]\nlayers = 1\n[run]\nname = "child"\n'
    )
    cfg = load_preset(child)
    parent = load_preset(base)
    assert cfg.model.backbone.layers == 1
    assert cfg.model.backbone.hidden_size == parent.model.backbone.hidden_size
    assert cfg.run.name == "child" and cfg.run.tags == parent.run.tags


def test_extends_chain_and_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="loop"):
        load_preset(tmp_path / "a.toml")


def test_missing_file_suggests_a_shipped_preset() -> None:
    with pytest.raises(ConfigError, match=r"not found.*quickstart\.toml"):
        load_preset(PRESETS / "quickstrat.toml")


def test_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.toml", "[train]\nmax_steps = = 3\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2, column"):
        load_preset(path)


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.toml", 'extends = "%s"\n[train]\nmax_step = 3\n' % (PRESETS / "quickstart.toml"))
    with pytest.raises(ConfigError, match=r"unknown key 'train\.max_step' — did you mean 'train\.max_steps'\?"):
        load_preset(path)


def test_key_of_another_kind_is_an_error_not_ignored() -> None:
    raw = load_preset(ONE_TOWER).to_dict()
    raw["model"]["fusion"] = {"layers": 2}
    with pytest.raises(ConfigError, match=r"'model\.fusion'.*does not apply to kind 'one_tower'.*two_tower"):
        config_from_dict(raw)


def test_out_of_range_names_key_and_range() -> None:
    raw = load_preset(ONE_TOWER).to_dict()
    raw["model"]["backbone"]["layers"] = 500
    with pytest.raises(ConfigError, match=r"model\.backbone\.layers = 500 is out of range.*0 to 128"):
        config_from_dict(raw)


def test_wrong_type_names_key() -> None:
    raw = load_preset(PRESETS / "quickstart.toml").to_dict()
    raw["train"]["batch_size"] = "many"
    with pytest.raises(ConfigError, match=r"train\.batch_size = 'many' has the wrong type"):
        config_from_dict(raw)


def test_bad_literal_lists_choices() -> None:
    raw = load_preset(PRESETS / "quickstart.toml").to_dict()
    raw["train"]["mixed_precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"mixed_precision = 'fp8' is not allowed: expected 'no', 'bf16' or 'fp16'"):
        config_from_dict(raw)


def test_describe_error_speaks_toml_for_any_schema() -> None:
    """One describer for presets and study files: a [[table]] item counted from 1, a list item as [i],
    aliases as the file spells them, and a validator's own wording."""
    from typing import Annotated

    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
    from pydantic_core import PydanticCustomError

    from engine.config import describe_error

    def table(value: object) -> object:
        if not isinstance(value, dict):
            raise PydanticCustomError("not_a_table", "must be a table")
        return value

    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        overrides: dict = Field({}, alias="set")
        sizes: tuple[int, ...] = ()

    class File(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item: tuple[Item, ...] = ()
        extra: Annotated[dict, BeforeValidator(table)] = {}

    with pytest.raises(ValidationError) as info:
        File.model_validate({"item": [{"name": "a"}, {"nmae": "b", "sett": {}, "sizes": [1, "x"]}], "extra": 3})
    lines = [describe_error(e, File, top="the file") for e in info.value.errors()]
    assert sorted(lines) == sorted([
        "missing required key '[[item]] #2.name'.",
        "unknown key '[[item]] #2.nmae' — did you mean '[[item]] #2.name'?",
        "unknown key '[[item]] #2.sett' — did you mean '[[item]] #2.set'?",
        "[[item]] #2.sizes[1] = 'x' has the wrong type: input should be a valid integer, unable to parse string "
        "as an integer.",
        "extra = 3 must be a table."])
    raw = load_preset(PRESETS / "quickstart.toml").to_dict()
    raw["optim"]["betas"] = [0.9, 0.99, 0.5]
    with pytest.raises(ConfigError, match=r"optim\.betas = \[0\.9, 0\.99, 0\.5\]: tuple should have at most 2 items"):
        config_from_dict(raw)


def test_unknown_kind_lists_kinds() -> None:
    with pytest.raises(ConfigError, match=r"'kind' must be one of 'one_tower', 'two_tower', 'dual_encoder'"):
        config_from_dict({"model": {"kind": "three_tower"}, "task": {}})


def test_stage_must_be_pretrain_xor_finetune() -> None:
    with pytest.raises(ConfigError, match="neither is set"):
        config_from_dict({"model": {"kind": "one_tower"}})
    with pytest.raises(ConfigError, match="both are set"):
        config_from_dict({"model": {"kind": "one_tower"}, "task": {}, "objectives": {"mlm": {}}})


def test_sizes_do_not_apply_to_pretrained_towers() -> None:
    with pytest.raises(ConfigError, match=r"hidden_size only applies when source = \"manual\""):
        text = {"source": "pretrained", "name": "x", "hidden_size": 64}
        config_from_dict({"model": {"kind": "two_tower", "text": text},
                          "objectives": {"mlm": {}}})
    with pytest.raises(ConfigError, match="needs 'name'"):
        config_from_dict({"model": {"kind": "two_tower", "text": {"source": "pretrained"}}, "objectives": {"mlm": {}}})


def test_itc_needs_two_towers() -> None:
    with pytest.raises(ConfigError, match="objectives.itc needs separate text and image"):
        config_from_dict({"model": {"kind": "one_tower"}, "objectives": {"itc": {}}})


def test_divisible_heads() -> None:
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be divisible by heads \(3\)"):
        config_from_dict({"model": {"kind": "one_tower", "backbone": {"hidden_size": 100, "heads": 3}}, "task": {}})


def test_every_error_is_listed_at_once(tmp_path: Path) -> None:
    raw = load_preset(PRESETS / "quickstart.toml").to_dict()
    raw["train"]["batch_size"] = 0
    raw["optim"]["lr"] = -1
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert "train.batch_size" in str(info.value) and "optim.lr" in str(info.value)


def test_defaults_fill_a_minimal_preset() -> None:
    cfg = config_from_dict({"model": {"kind": "two_tower"}, "objectives": {"mlm": {}, "itm": {}}})
    assert isinstance(cfg, RunConfig)
    assert cfg.stage == "pretrain"
    assert cfg.model.fusion.layers >= 1


def test_changing_a_tag_replaces_the_table(tmp_path: Path) -> None:
    """A child that switches a tower to pretrained does not inherit manual sizes."""
    child = _write(
        tmp_path, "child.toml",
        'extends = "%s"\n[model.backbone]\nsource = "random"\nname = "/models/vit"\n' % (ONE_TOWER),
    )
    from engine.config import _read_with_extends

    raw = _read_with_extends(child, chain=())
    assert raw["model"]["backbone"] == {"source": "random", "name": "/models/vit"}
    assert raw["model"]["pooler"] == "single"  # same kind: the model table still merges


def test_preset_reference_doc_is_up_to_date() -> None:
    from engine.config import reference_markdown

    doc = (PRESETS.parent / "docs" / "presets.md").read_text()
    assert doc.strip() == reference_markdown().strip(), "regenerate: python -m engine.config > docs/presets.md"


@pytest.mark.parametrize("preset", SHIPPED, ids=[p.name for p in SHIPPED])
def test_stored_config_validates_again(preset: Path) -> None:
    """A run stores cfg.to_dict(); --resume validates it again and must get the same config."""
    cfg = load_preset(preset)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_max_text_len_left_unset_fits_the_text_position_table() -> None:
    """Unset, data.max_text_len is the text position table's size where the preset makes that smaller than 40
    (texts beyond the table would index past it); the resolved config records it. Set beyond it: an error."""
    small = {"model": {"kind": "two_tower", "text": {"max_positions": 16}}, "objectives": {"mlm": {}}}
    cfg = config_from_dict(small)
    assert cfg.data.max_text_len == 16 and cfg.to_dict()["data"]["max_text_len"] == 16
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict({"model": {"kind": "two_tower"}, "objectives": {"mlm": {}}}).data.max_text_len == 40
    one_tower = config_from_dict({"model": {"kind": "one_tower", "backbone": {"max_text_positions": 8}}, "task": {}})
    assert one_tower.data.max_text_len == 8
    with pytest.raises(ConfigError, match=r"data\.max_text_len = 17 is longer than model\.text\.max_positions = 16"):
        config_from_dict({**small, "data": {"max_text_len": 17}})
