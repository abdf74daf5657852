"""Each arrow-file task trains a few steps and evaluates its whole eval split through `ren run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.store import Store
from tests.helpers.cli import ren
from tests.helpers.paths import REPO

from .arrow_fixtures import write_nlvr2, write_refcoco, write_snli_ve

ONE_TOWER = REPO / "tests" / "fixtures" / "one_tower.toml"


@pytest.mark.slow
@pytest.mark.parametrize(("task", "eval_items"), [("snli_ve", 4 * 3), ("nlvr2", 3 * 2), ("refcoco", 3 * 2)])
def test_ren_run_finetunes_and_evaluates(task: str, eval_items: int, tmp_path: Path, ren_home: Path) -> None:
    root = tmp_path / "arrows"
    root.mkdir()
    if task == "snli_ve":
        write_snli_ve(root, "train", n=8)
        write_snli_ve(root, "dev", n=4, start=8)
    elif task == "nlvr2":
        write_nlvr2(root, "train", n=8)
        write_nlvr2(root, "dev", n=3, start=8)
    else:
        write_refcoco(root, "train", n=8)
        write_refcoco(root, "val", n=3, start=8)
    preset = tmp_path / f"{task}.toml"
    preset.write_text(
        f'extends = "{ONE_TOWER}"\n[task]\nname = "{task}"\n'
        f'[data]\ndataset = "{task}"\nroot = "{root}"\ntokenizer = "google/electra-small-discriminator"\n'
        "[train]\nmax_steps = 3\nbatch_size = 4\nlog_every = 1\neval_every = 2\ncpu_threads = 1\n"
    )
    result = ren("run", str(preset), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(ren_home)
    (record,) = store.list_runs()
    assert record.status == "finished" and record.step == 3
    assert record.final_scores["eval_samples"] == eval_items
    assert 0.0 <= record.final_scores["accuracy"] <= 1.0
    assert [s for s, _ in store.series(record.id, "eval/accuracy")] == [2, 3]
    assert len(store.series(record.id, "train_accuracy")) == 3
