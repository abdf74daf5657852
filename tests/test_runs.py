"""init_from = "preset:...": the pretraining a finetuning preset names is found
in the store or trained first, exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import RunConfig, load_preset
from engine.errors import ConfigError, RenError
from engine.runs import create_run, find_finished, resolve_init_from, trained_now
from engine.store import Store

MODEL = """
[model]
kind = "one_tower"
[model.backbone]
hidden_size = 32
layers = 1
heads = 2
patch_size = 16
image_size = 32
"""


@pytest.fixture
def presets(tmp_path: Path) -> Path:
    (tmp_path / "pre.toml").write_text('[run]\nname = "pre"\n[objectives.mlm]\n' + MODEL)
    (tmp_path / "ft.toml").write_text(
        '[run]\nname = "ft"\n[task]\nname = "vqa"\n[train]\ninit_from = "preset:pre.toml"\n' + MODEL
    )
    return tmp_path


class FakeTrainer:
    """Marks the run finished (or failed) instead of training it."""

    def __init__(self, store: Store, status: str = "finished"):
        self.store, self.status, self.calls = store, status, []

    def __call__(self, cfg: RunConfig, run_id: str) -> None:
        self.calls.append((cfg.run.name, run_id))
        self.store.mark_ended(run_id, self.status)


def test_trains_the_named_pretraining_once_then_reuses_it(presets: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    trainer = FakeTrainer(store)
    ft = load_preset(presets / "ft.toml")

    first = resolve_init_from(ft, presets / "ft.toml", store, trained_now(store, trainer))
    assert [name for name, _ in trainer.calls] == ["pre"]
    pre_id = trainer.calls[0][1]
    assert first.train.init_from == f"run:{pre_id}"
    assert store.get_run(pre_id).preset_path == str(presets / "pre.toml")

    again = resolve_init_from(ft, presets / "ft.toml", store, trained_now(store, trainer))
    assert again.train.init_from == f"run:{pre_id}"
    assert len(trainer.calls) == 1  # reused, not retrained


def test_a_changed_pretraining_preset_is_trained_anew(presets: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    trainer = FakeTrainer(store)
    ft = load_preset(presets / "ft.toml")
    resolve_init_from(ft, presets / "ft.toml", store, trained_now(store, trainer))
    (presets / "pre.toml").write_text('[run]\nname = "pre"\n[objectives.itm]\n' + MODEL)
    second = resolve_init_from(ft, presets / "ft.toml", store, trained_now(store, trainer))
    assert len(trainer.calls) == 2
    assert second.train.init_from == f"run:{trainer.calls[1][1]}"
    assert find_finished(store, load_preset(presets / "pre.toml")).id == trainer.calls[1][1]


def test_unfinished_pretraining_stops_with_a_resume_hint(presets: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    with pytest.raises(RenError, match="ended failed; resume it with `ren run --resume"):
        resolve_init_from(load_preset(presets / "ft.toml"), presets / "ft.toml", store,
                          trained_now(store, FakeTrainer(store, "failed")))


def test_presets_starting_from_each_other_are_an_error(presets: Path, ren_home: Path) -> None:
    (presets / "pre.toml").write_text(
        '[run]\nname = "pre"\n[task]\nname = "vqa"\n[train]\ninit_from = "preset:ft.toml"\n' + MODEL
    )
    store = Store(ren_home)
    with pytest.raises(ConfigError, match="loop"):
        resolve_init_from(load_preset(presets / "ft.toml"), presets / "ft.toml", store,
                          trained_now(store, FakeTrainer(store)))


def test_run_ids_pass_through_untouched(presets: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    cfg = load_preset(presets / "pre.toml")
    record = create_run(store, cfg, None)
    assert (store.run_dir(record.id) / "config.toml").read_text().startswith("[run]")
    assert resolve_init_from(cfg, presets / "pre.toml", store, trained_now(store, FakeTrainer(store))) is cfg


def test_retry_outcome_says_a_run_without_a_checkpoint_starts_over(ren_home: Path) -> None:
    """A run cancelled while still queued saved no checkpoint: queueing it again starts it over, whatever
    its record says; one with checkpoints resumes from the last complete one."""
    import json

    from engine.jobs import api as Q
    from engine.runs import retry_outcome

    store = Store(ren_home)
    never, saved = (store.create_run(name=n, stage="finetune", kind="one_tower", config={}) for n in ("a", "b"))
    store.enqueue(never.id)
    Q.cancel(store, never.id)
    assert store.get_run(never.id).status == "cancelled"
    assert retry_outcome(store, never.id) == "it saved no checkpoint, so it starts over from step 0"
    checkpoint = store.run_dir(saved.id) / "checkpoints" / "step_00000040"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 40}))
    (checkpoint.parent / "latest").write_text(checkpoint.name)
    store.update_run(saved.id, status="failed", step=55)
    assert retry_outcome(store, saved.id) == "it resumes from step 40, its last checkpoint"
