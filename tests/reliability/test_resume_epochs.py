"""A run stopped and resumed on either side of an epoch boundary trains on the data order of the
uninterrupted run at every later step.

The training set is small (16 images x 3 questions, batch 8: 6 steps an epoch), so a run crosses
several epoch boundaries in a few seconds. accelerate's prepared loader counts its own iterations
and passes that count to the sampler's ``set_epoch`` at every ``iter()``; after a restart the
count starts again at 0, which a resumed run must not follow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate import Accelerator
from torch.utils.data import DataLoader

from engine.config import load_preset
from engine.runs import create_run
from engine.store import Store
from engine.train import EpochSampler, latest_checkpoint, train
from tests.arrow_fixtures import write_vqav2
from tests.helpers.paths import REPO
from tests.helpers.training import TermAt

STEPS_PER_EPOCH, MAX_STEPS = 6, 48
TOKENIZER = "google/electra-small-discriminator"  # in the offline hub cache the tests use


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("epoch_arrows")
    write_vqav2(root, "train", n=12)
    write_vqav2(root, "trainable_val", n=4, start=12)
    write_vqav2(root, "rest_val", n=2, start=16)
    path = root / "epochs.toml"
    path.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n[run]\nseed = 3\n'
        "[model.backbone]\nhidden_size = 32\nlayers = 1\nimage_size = 32\npatch_size = 16\n"
        f'[data]\ndataset = "vqav2"\nroot = "{root}"\ntokenizer = "{TOKENIZER}"\ncache_dir = "{root / "cache"}"\n'
        f"[train]\nmax_steps = {MAX_STEPS}\nbatch_size = 8\nlog_every = 1\neval_every = 1000\n"
        "checkpoint_every = 2\nkeep_checkpoints = 2\ncpu_threads = 1\n")
    return path


@pytest.fixture(scope="module")
def reference(preset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The loss at every step of the uninterrupted run."""
    store = Store(tmp_path_factory.mktemp("reference_home"))
    cfg = load_preset(preset, [])
    run_id = create_run(store, cfg, str(preset)).id
    train(cfg, store, run_id)
    return dict(store.series(run_id, "loss"))


def test_a_prepared_loader_iterates_the_epoch_the_trainer_set_whatever_its_own_count() -> None:
    """accelerate passes its iteration count (0 in a fresh process) to the sampler at every iter()."""
    sampler = EpochSampler(40, seed=3)
    loader = Accelerator(cpu=True).prepare(DataLoader(range(40), batch_size=40, sampler=sampler))
    expected = []
    for epoch in (2, 5):
        sampler.use_epoch(epoch)
        expected.append(list(sampler))
    orders = []
    for epoch in (2, 5):  # the loader's count is 0, then 1
        sampler.use_epoch(epoch)
        orders.append([int(i) for batch in loader for i in batch])
    assert orders == expected and expected[0] != expected[1]


def _compare(store: Store, run_id: str, reference: dict[int, float], resumed_from: int) -> None:
    """Every step after the resume logs the reference's loss, bit for bit (test_resume_exact.py says why)."""
    after = [(s, v) for s, v in store.series(run_id, "loss") if s > resumed_from]
    assert [s for s, _ in after] == list(range(resumed_from + 1, MAX_STEPS + 1))
    worst = max(abs(v - reference[s]) / abs(reference[s]) for s, v in after)
    print(f"resumed from step {resumed_from} ({resumed_from / STEPS_PER_EPOCH:.2f} epochs done): max relative "
          f"loss difference to the uninterrupted run {worst:.2e} over steps {resumed_from + 1}-{MAX_STEPS}")
    assert all(v == reference[s] for s, v in after)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, STEPS_PER_EPOCH, 8],
                         ids=["inside-epoch-0", "at-the-first-boundary", "inside-epoch-1"])
def test_sigterm_then_resume_keeps_the_data_order_of_every_epoch(preset: Path, reference: dict[int, float],
                                                                 ren_home: Path, stop: int) -> None:
    store = Store(ren_home)
    cfg = load_preset(preset, [])
    run_id = create_run(store, cfg, str(preset)).id
    train(cfg, store, run_id, reporter=TermAt(stop))
    assert store.get_run(run_id).status == "cancelled"
    assert latest_checkpoint(store.run_dir(run_id)).name == f"step_{stop:08d}"
    train(cfg, store, run_id, resume=True)
    assert store.get_run(run_id).status == "finished"
    _compare(store, run_id, reference, stop)


@pytest.mark.slow
def test_sigkill_after_the_first_epoch_then_resume_keeps_the_data_order(preset: Path, reference: dict[int, float],
                                                                        ren_home: Path) -> None:
    store = Store(ren_home)
    cfg = load_preset(preset, [])
    run_id = create_run(store, cfg, str(preset)).id
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", run_id], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    run_dir = store.run_dir(run_id)
    deadline = time.monotonic() + 300
    while (ckpt := latest_checkpoint(run_dir)) is None or int(ckpt.name[5:]) <= STEPS_PER_EPOCH:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    resumed_from = int(latest_checkpoint(run_dir).name[5:])
    assert STEPS_PER_EPOCH < resumed_from < MAX_STEPS
    train(cfg, store, run_id, resume=True)
    assert store.get_run(run_id).status == "finished"
    _compare(store, run_id, reference, resumed_from)
