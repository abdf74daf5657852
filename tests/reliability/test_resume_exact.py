"""A run stopped at a checkpoint and resumed trains bit for bit as the uninterrupted run: every later logged loss
and the final weights are equal. Pretraining (MLM + ITM + ITC; the fusion layers have dropout) and finetuning
with dropout, each with augmentation and gradient accumulation, resumed inside an epoch and exactly at its end,
at a micro batch of 1, with DataLoader workers, and in two processes.

Before, only runs that drew nothing from torch's global generator resumed exactly (the one-tower fixture: no
dropout, no augmentation). accelerate's ``save_state`` keeps that generator's state and ``load_state`` restores
it, but the two runs then drew from it in different orders: creating a DataLoader iterator draws its workers'
base seed from it (``_BaseDataLoaderIter.__init__``), which the uninterrupted run did at the start of the epoch,
before the checkpoint, and the resumed run after restoring it (for its ``skip_first_batches`` loader, and at an
epoch's end for an empty one as well); augmentation drew from it one batch ahead. Now each micro batch's forward
seeds it (``engine.train.seed_of``), the loaders have generators of their own, and each item's augmentation is
seeded by (run seed, epoch, item index) (``engine.data.images.ItemDraws``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from engine.config import load_preset
from engine.data.arrow import open_arrow
from engine.data.captions import ArrowCaptionDataset, open_corpus
from engine.data.images import image_transform
from engine.data.nlvr2 import ArrowNLVR2Dataset
from engine.data.pipeline import DataBundle
from engine.data.tokenizer import load_tokenizer
from engine.data.transforms import HALF
from engine.data.vqav2 import ArrowVQADataset
from engine.runs import FINAL_WEIGHTS, create_run
from engine.store import Store
from engine.train import EpochSampler, _loaders, latest_checkpoint, train, use_epoch
from tests.arrow_fixtures import write_coco_caption, write_nlvr2, write_vqav2
from tests.helpers.cli import REN
from tests.helpers.paths import REPO
from tests.helpers.training import TermAt

TOKENIZER = "google/electra-small-discriminator"  # in the offline hub cache the tests use
# No random crop here: on the fixture's tiny images its rejection loop draws a varying number of values, which hid
# the shifted draws of the code before the fix at the end of an epoch (the finetuning test crops).
AUGMENT = "randaugment"
PT_STEPS_PER_EPOCH = 6  # 25 captions: 12 micro batches of 2 (one caption left out each epoch), 2 a step
FT_STEPS_PER_EPOCH = 16  # 48 questions, micro batches of 1, 3 a step


@pytest.fixture(scope="module")
def arrows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume_exact_arrows")
    write_coco_caption(root, "train", n=4)  # 20 captions
    write_coco_caption(root, "restval", n=1, start=4)  # + 5: coco_caption's "train"
    write_coco_caption(root, "val", n=2, start=5)
    write_vqav2(root, "train", n=16)  # 48 questions
    write_vqav2(root, "trainable_val", n=4, start=16)
    write_vqav2(root, "rest_val", n=2, start=20)
    write_nlvr2(root, "train", n=3)
    return root


def _pretrain_preset(arrows: Path, directory: Path, **train: object) -> Path:
    """Two towers, MLM + ITM + ITC, fusion dropout 0.1 (the default), augmented images."""
    settings = {"max_steps": 8, "batch_size": 4, "micro_batch_size": 2, "log_every": 1, "checkpoint_every": 100,
                "cpu_threads": 1, **train}
    path = directory / "pretrain.toml"
    path.write_text(
        '[run]\nname = "pt"\nseed = 5\n[model]\nkind = "two_tower"\n'
        "[objectives.mlm]\n[objectives.itm]\nweight = 0.5\n[objectives.itc]\nweight = 0.25\n"
        "[model.text]\nhidden_size = 32\nlayers = 1\nheads = 2\nmax_positions = 32\n"
        "[model.vision]\nhidden_size = 32\nlayers = 1\nheads = 2\nimage_size = 32\npatch_size = 16\n"
        "[model.fusion]\nlayers = 1\nhidden_size = 32\nheads = 2\n"
        f'[data]\ndataset = "captions"\nroot = "{arrows}"\ncorpora = ["coco_caption"]\ntokenizer = "{TOKENIZER}"\n'
        f'augment = "{AUGMENT}"\ncache_dir = "{directory / "cache"}"\n'
        "[train]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return path


def _finetune_preset(arrows: Path, directory: Path) -> Path:
    """One tower with dropout 0.1, VQAv2 with random crops, micro batches of 1."""
    path = directory / "finetune.toml"
    path.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n[run]\nseed = 3\n'
        "[model.backbone]\nhidden_size = 32\nlayers = 1\nimage_size = 32\npatch_size = 16\ndropout = 0.1\n"
        f'[data]\ndataset = "vqav2"\nroot = "{arrows}"\ntokenizer = "{TOKENIZER}"\naugment = "crop"\n'
        f'cache_dir = "{directory / "cache"}"\n'
        f"[train]\nmax_steps = {FT_STEPS_PER_EPOCH + 2}\nbatch_size = 3\nmicro_batch_size = 1\nlog_every = 1\n"
        "eval_every = 1000\ncheckpoint_every = 100\ncpu_threads = 1\n")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(preset: Path, home: Path, stops: tuple[int, ...] = (), overrides: tuple[str, ...] = ()
           ) -> tuple[list[tuple[int, float]], str]:
    """Train ``preset`` in this process, stopped by SIGTERM after each step of ``stops`` (a checkpoint, as `ren
    cancel` makes) and resumed; its logged losses and the hash of its final weights."""
    store = Store(home)
    cfg = load_preset(preset, list(overrides))
    run_id = create_run(store, cfg, str(preset)).id
    for i, stop in enumerate(stops):
        train(cfg, store, run_id, resume=i > 0, reporter=TermAt(stop))
        assert store.get_run(run_id).status == "cancelled"
        assert latest_checkpoint(store.run_dir(run_id)).name == f"step_{stop:08d}"
    train(cfg, store, run_id, resume=bool(stops))
    assert store.get_run(run_id).status == "finished"
    return store.series(run_id, "loss"), _sha(store.run_dir(run_id) / FINAL_WEIGHTS)


@pytest.fixture(scope="module")
def pretrain_reference(arrows: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    directory = tmp_path_factory.mktemp("pretrain_reference")
    preset = _pretrain_preset(arrows, directory)
    return preset, _train(preset, directory / "home")


@pytest.mark.parametrize(("stops", "overrides"), [
    ((4,), ()),
    ((PT_STEPS_PER_EPOCH,), ()),
    ((PT_STEPS_PER_EPOCH + 1,), ("data.num_workers=2",)),
], ids=["inside-epoch-0", "at-the-end-of-epoch-0", "inside-epoch-1-with-workers"])
def test_a_resumed_pretraining_run_trains_bit_for_bit_as_the_uninterrupted_one(
        pretrain_reference: tuple[Path, tuple], tmp_path: Path, stops: tuple[int, ...],
        overrides: tuple[str, ...]) -> None:
    """Each item's augmentation is its own, so DataLoader workers load the very batches the main process would."""
    preset, (losses, weights) = pretrain_reference
    resumed, resumed_weights = _train(preset, tmp_path / "home", stops, overrides)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert resumed == losses  # bitwise: floats compared with ==
    assert resumed_weights == weights


def test_a_resumed_finetuning_run_with_dropout_and_micro_batches_of_one_trains_bit_for_bit(
        arrows: Path, tmp_path: Path) -> None:
    """Resumed inside epoch 0, across the end of it."""
    preset = _finetune_preset(arrows, tmp_path)
    losses, weights = _train(preset, tmp_path / "uninterrupted")
    resumed, resumed_weights = _train(preset, tmp_path / "resumed", (5,))
    assert len(losses) == FT_STEPS_PER_EPOCH + 2 and resumed == losses and resumed_weights == weights


# --- what makes it exact ----------------------------------------------------------------------------------------


def test_creating_the_training_loaders_iterators_draws_nothing_from_the_global_generator() -> None:
    """The trainer's loader, prepared, and the loaders ``skip_first_batches`` makes of it (a resumed run's; one
    that skips the whole epoch at its end) draw their workers' base seed from a generator of their own."""
    cfg = load_preset(REPO / "tests" / "fixtures" / "one_tower.toml", ["train.batch_size=2"])
    data = DataBundle(list(range(12)), list(range(4)), None, None, None)
    sampler = EpochSampler(len(data.train), cfg.run.seed)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(_loaders(cfg, data, sampler, micro=2)[0])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    orders = []
    for skipped in (0, 3, 6):
        use_epoch(loader, sampler, 1)
        orders.append([i for batch in (accelerator.skip_first_batches(loader, skipped) if skipped else loader)
                       for i in batch])
    assert torch.equal(torch.get_rng_state(), before)
    assert orders[1] == orders[0][6:] and orders[2] == []


def _datasets(arrows: Path) -> dict[str, object]:
    tokenizer, transform = load_tokenizer(TOKENIZER), image_transform(32, train=True, augment="crop+randaugment")
    return {
        "captions": ArrowCaptionDataset([open_corpus(arrows, "coco_caption", "train")], tokenizer, 16, transform,
                                        HALF),
        "vqav2": ArrowVQADataset(open_arrow([arrows / "vqav2_train.arrow"], "vqav2"), tokenizer, 16, transform, HALF,
                                 7),
        "nlvr2": ArrowNLVR2Dataset(open_arrow([arrows / "nlvr2_train.arrow"], "nlvr2"), tokenizer, 16, transform,
                                   HALF),
    }


@pytest.mark.parametrize("kind", ["captions", "vqav2", "nlvr2"])
def test_an_items_augmentation_depends_on_the_seed_the_epoch_and_the_item_alone(arrows: Path, kind: str) -> None:
    """Whatever its batch, the items before it and the global generator's state (which it leaves as it was)."""
    dataset = _datasets(arrows)[kind]
    pixels = "pixel_values_1" if kind == "nlvr2" else "pixel_values"
    dataset.use_epoch(5, 0)
    alone = dataset.__getitems__([1])[pixels][0]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    in_a_batch = dataset.__getitems__([4, 0, 1])[pixels][2]  # items 0 and 1 show one image
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(alone, in_a_batch)
    assert not torch.equal(dataset.__getitems__([0])[pixels][0], alone)  # the same image, its own draws
    dataset.use_epoch(5, 1)
    assert not torch.equal(dataset.__getitems__([1])[pixels][0], alone)


# --- two processes ----------------------------------------------------------------------------------------------

# Loaded by every process of `ren run --gpus 2` (sitecustomize): rank 0 sends itself SIGTERM once step
# $STOP_AT_STEP is reported, as `ren cancel` would; the processes agree to stop after that step and checkpoint.
STOP_AT_STEP = """
import os, signal
_at = int(os.environ.get("STOP_AT_STEP", "0"))
if _at and os.environ.get("RANK") == "0":
    import engine.progress as _progress
    _make = _progress.make_reporter
    def make_reporter(*args, **kwargs):
        reporter = _make(*args, **kwargs)
        report = reporter.step
        def step(n, metrics):
            report(n, metrics)
            if n == _at:
                os.kill(os.getpid(), signal.SIGTERM)
        reporter.step = step
        return reporter
    _progress.make_reporter = make_reporter
"""


@pytest.mark.slow
def test_two_processes_resumed_inside_an_epoch_train_bit_for_bit_as_uninterrupted(arrows: Path,
                                                                                  tmp_path: Path) -> None:
    """`ren run --gpus 2` (gloo on a CPU): 2 processes x micro batches of 2 x 2 a step, 3 steps an epoch; stopped
    after step 2, resumed, across the end of epoch 0."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_AT_STEP)
    preset = _pretrain_preset(arrows, tmp_path, max_steps=5, batch_size=8)

    def ren(home: Path, *args: str, stop: int = 0) -> None:
        env = {**os.environ, "REN_HOME": str(home), "STOP_AT_STEP": str(stop),
               "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run([*REN, *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    runs = {}
    for name, stop in (("uninterrupted", 0), ("resumed", 2)):
        home = tmp_path / name
        ren(home, "run", str(preset), "--gpus", "2", stop=stop)
        store = Store(home)
        (record,) = store.list_runs()
        if stop:
            assert record.status == "cancelled" and latest_checkpoint(store.run_dir(record.id)).name == "step_00000002"
            ren(home, "run", "--resume", record.id, "--gpus", "2")
        record = store.get_run(record.id)
        assert record.status == "finished" and record.device.startswith("2x cpu")
        runs[name] = store.series(record.id, "loss"), _sha(store.run_dir(record.id) / FINAL_WEIGHTS)
    assert [s for s, _ in runs["uninterrupted"][0]] == [1, 2, 3, 4, 5]
    assert runs["resumed"] == runs["uninterrupted"]
