"""The pieces of the training loop: the step log, the epoch iterator, and the gradient accumulation the
Accelerator is built with (the optimizer steps once per optimizer step's micro batches)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

import engine.train as train_module
from engine.config import config_from_dict, load_preset
from engine.display import bucket_means
from engine.runs import create_run
from engine.store import Store
from engine.train import FINAL_WEIGHTS, TRACE, EpochSampler, StepLog, TrainState, build_accelerator, epochs, train
from tests.arrow_fixtures import write_vqav2
from tests.helpers.paths import REPO

TOKENIZER = "google/electra-small-discriminator"  # in the offline hub cache the tests use


def test_step_log_means_the_micro_batches_since_the_last_logged_step(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1000.0, 1002.0, 1005.0, 1006.0, 1008.0])  # start, flush, evaluation over, flush, flush
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    accelerator = Accelerator(cpu=True)
    log = StepLog(samples_seen=100)
    for loss, score in ((1.0, 0.0), (2.0, 0.5), (4.0, 1.0)):  # the micro batches of the logged steps
        log.add({"loss": torch.tensor(loss), "train_vqa_score": torch.tensor(score)})
    first = log.flush(accelerator, 112, lr=0.5, epoch=1.25)
    assert first == {"loss": pytest.approx(7 / 3), "train_vqa_score": 0.5, "lr": 0.5, "samples_per_s": 6.0,
                     "epoch": 1.25}
    assert list(first) == ["loss", "train_vqa_score", "lr", "samples_per_s", "epoch"]  # the order they are written
    assert log.index_due()  # the first logged step updates the run record
    log.restart_clock()  # an evaluation ended: its time is not training throughput
    log.add({"loss": torch.tensor(10.0), "train_vqa_score": torch.tensor(1.0)})
    second = log.flush(accelerator, 124, lr=0.25, epoch=1.5)
    assert (second["loss"], second["samples_per_s"]) == (10.0, 12.0)  # the sums started again
    assert not log.index_due()  # 4 s after the last update
    log.add({"loss": torch.tensor(3.0), "train_vqa_score": torch.tensor(0.0)})
    log.flush(accelerator, 136, lr=0.25, epoch=1.75)
    assert log.index_due() and log.samples_per_s == 6.0
    assert log.losses == [pytest.approx(7 / 3), 10.0, 3.0]
    assert log.trace() == bucket_means(log.losses, TRACE)


# --- the epoch iterator ------------------------------------------------------------------------------

N, MICRO, ACCUM = 10, 2, 2  # 5 micro batches an epoch: steps of 2, 2 and 1 (the loader's end closes a step)
STEPS_PER_EPOCH = 3


def _train_order(state: TrainState, steps: int) -> list[list[int]]:
    """The micro batches a fresh process (new prepared loader, sampler and Accelerator) draws from ``state``
    on until ``steps`` optimizer steps are done, grouped by optimizer step, moving ``state`` as the loop does."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    sampler = EpochSampler(N, seed=3)
    loader = accelerator.prepare(DataLoader(range(N), batch_size=MICRO, sampler=sampler, drop_last=True))
    model = accelerator.prepare(torch.nn.Linear(1, 1))
    order: list[list[int]] = [[]]
    ten_epochs = itertools.islice(epochs(loader, sampler, state, accelerator, ACCUM), 10)
    for batch in itertools.chain.from_iterable(ten_epochs):
        with accelerator.accumulate(model):
            order[-1] += batch.tolist()
        if accelerator.sync_gradients:
            state.step += 1
            state.batches_into_epoch += 1
            if state.step == steps:
                return order
            order.append([])
    raise AssertionError(f"{steps} steps not done in 10 epochs")


def test_epochs_draw_each_sample_once_an_epoch_in_the_order_of_that_epoch() -> None:
    state = TrainState()
    order = _train_order(state, 2 * STEPS_PER_EPOCH)
    assert [len(step) for step in order] == [4, 4, 2] * 2
    first, second = sum(order[:3], []), sum(order[3:], [])
    sampler = EpochSampler(N, seed=3)
    expected = []
    for epoch in (0, 1):
        sampler.use_epoch(epoch)
        expected.append(list(sampler))
    assert (first, second) == tuple(expected) and first != second
    # the last step of an epoch leaves the state in that epoch; the next micro batch moves it on
    assert (state.epoch, state.batches_into_epoch) == (1, STEPS_PER_EPOCH)


@pytest.mark.parametrize("stop", [1, 2, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 1])
def test_a_resumed_run_draws_the_batches_the_uninterrupted_run_would(stop: int) -> None:
    total = 3 * STEPS_PER_EPOCH
    uninterrupted = _train_order(TrainState(), total)
    state = TrainState()
    before = _train_order(state, stop)
    saved = TrainState(step=state.step, epoch=state.epoch, batches_into_epoch=state.batches_into_epoch)
    after = _train_order(saved, total)  # a new process: fresh loader, sampler and accelerate counters
    assert before + after == uninterrupted
    assert saved.epoch == 2 and saved.step == total


# --- the Accelerator's gradient accumulation ----------------------------------------------------------


def test_the_accelerator_is_built_with_the_runs_gradient_accumulation(data_cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers.training import tiny_finetune

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "7")  # the run's batch decides, not the env
    cfg = config_from_dict(tiny_finetune(data_cache, batch_size=8, micro_batch_size=2))
    accelerator, micro, accum = build_accelerator(cfg)
    assert (micro, accum) == (2, 4) and accelerator.gradient_accumulation_steps == 4
    cfg = config_from_dict(tiny_finetune(data_cache, batch_size=8))
    accelerator, micro, accum = build_accelerator(cfg)
    assert (micro, accum) == (8, 1) and accelerator.gradient_accumulation_steps == 1


@pytest.fixture(scope="module")
def small_vqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 training questions (train and trainable_val): 15 optimizer steps of 4 micro batches of 1 an epoch."""
    root = tmp_path_factory.mktemp("loop_arrows")
    write_vqav2(root, "train", n=16)
    write_vqav2(root, "trainable_val", n=4, start=16)
    write_vqav2(root, "rest_val", n=2, start=20)
    path = root / "loop.toml"
    path.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n[run]\nseed = 3\n'
        "[model.backbone]\nhidden_size = 32\nlayers = 1\nimage_size = 32\npatch_size = 16\n"
        f'[data]\ndataset = "vqav2"\nroot = "{root}"\ntokenizer = "{TOKENIZER}"\ncache_dir = "{root / "cache"}"\n'
        "[train]\nmax_steps = 17\nbatch_size = 4\nmicro_batch_size = 1\nlog_every = 1\neval_every = 1000\n"
        "checkpoint_every = 1000\ncpu_threads = 1\n")
    return path


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[int], list[int]]]:
    """(micro batches run, the micro batch count at each optimizer step), as training goes."""
    forwards: list[int] = []
    steps: list[int] = []
    finetune_step = train_module._finetune_step

    def counting(*args, **kwargs):
        forwards.append(1)
        return finetune_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_finetune_step", counting)
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(len(forwards)))
    yield forwards, steps
    handle.remove()


def test_the_optimizer_steps_once_per_accumulated_micro_batches(
        small_vqa: Path, ren_home: Path, counted: tuple[list[int], list[int]]) -> None:
    forwards, steps = counted
    store = Store(ren_home)
    cfg = load_preset(small_vqa, [])
    run_id = create_run(store, cfg, str(small_vqa)).id
    train(cfg, store, run_id)
    assert len(forwards) == 17 * 4
    assert steps == [4 * (k + 1) for k in range(17)]  # after every 4th micro batch, across the epoch boundary
    points = [p for p in store.read_metrics(run_id) if "loss" in p]
    assert [p["step"] for p in points] == list(range(1, 18))
    assert points[14]["epoch"] == 1.0 and points[16]["epoch"] == pytest.approx(1 + 2 / 15)
    assert store.get_run(run_id).status == "finished"


def test_a_resumed_run_with_every_step_done_only_finishes(small_vqa: Path, ren_home: Path,
                                                          counted: tuple[list[int], list[int]]) -> None:
    """A run stopped after its last checkpoint, before its weights were written, trains no further on resume."""
    store = Store(ren_home)
    cfg = load_preset(small_vqa, ["train.max_steps=4", "train.checkpoint_every=4"])
    run_id = create_run(store, cfg, str(small_vqa)).id
    train(cfg, store, run_id)
    weights = store.run_dir(run_id) / FINAL_WEIGHTS
    written = weights.read_bytes()
    weights.unlink()
    forwards, steps = counted
    forwards.clear()
    train(cfg, store, run_id, resume=True)
    assert forwards == [] and steps == [4, 8, 12, 16] and weights.read_bytes() == written
    assert store.get_run(run_id).status == "finished" and store.get_run(run_id).step == 4
