"""What only a GPU shows: mixed-precision training against fp32, freezing on CUDA, the NVML inventory the
queue reads, and an out-of-memory batch. Marked ``gpu``: skipped where CUDA is absent (tests/conftest.py);
``bench/gpu_check.sh`` runs them on a GPU box (docs/gpu.md). With ``REN_GPU_TESTS_ON_CPU=1`` the ones that
mean something on a CPU run there (``gpu_check.sh --dry-run``); the rest skip themselves.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from engine.store import Store
from tests.helpers.cli import ren
from tests.helpers.training import tiny_preset, tiny_pretrain

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
STEPS = 6


def needs_cuda() -> None:
    """Skip a test that means nothing without CUDA itself (REN_GPU_TESTS_ON_CPU=1 runs the others on a CPU)."""
    if not CUDA:
        pytest.skip("needs CUDA itself, not only a device to train on")


# --- mixed precision against fp32 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, dict]:
    """The same one-tower finetuning, ``STEPS`` steps from the same weights on the same batches, trained by
    `ren run` (accelerate's mixed precision, as a user gets it) in fp32, bf16 and fp16 (fp16 on CUDA only:
    accelerate runs no fp16 autocast on a CPU). Each: its logged loss per step and its compute record."""
    root = tmp_path_factory.mktemp("precision")
    preset = tiny_preset(root / "p.toml", data_cache, max_steps=STEPS, log_every=1, checkpoint_every=1000,
                         eval_every=1000)
    out = {}
    for precision in ("no", "bf16", *(["fp16"] if CUDA else [])):
        home = root / precision
        result = ren("run", str(preset), "--set", f'train.mixed_precision="{precision}"',
                     "--set", "model.backbone.hidden_size=128", "--set", "model.backbone.layers=2",
                     "--set", "model.backbone.heads=4", env={"REN_HOME": str(home)}, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        store = Store(home)
        (record,) = store.list_runs()
        out[precision] = {"loss": [value for _, value in store.series(record.id, "loss")],
                          "compute": record.compute}
    return out


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_bf16_training_losses_stay_within_1e_2_of_fp32(trained: dict[str, dict]) -> None:
    fp32, bf16 = trained["no"], trained["bf16"]
    assert len(fp32["loss"]) == len(bf16["loss"]) == STEPS
    assert (fp32["compute"]["dtype"], bf16["compute"]["dtype"]) == ("fp32", "bf16")  # what ran, read off a matmul
    gaps = [relative(b, f) for b, f in zip(bf16["loss"], fp32["loss"])]
    assert max(gaps) < 1e-2, f"bf16 vs fp32 losses: {bf16['loss']} vs {fp32['loss']}"
    assert gaps[0] > 0  # bf16 did run: its first loss, from the same weights, is not fp32's to the bit


def test_fp16_training_runs_in_fp16_and_starts_where_fp32_does(trained: dict[str, dict]) -> None:
    needs_cuda()
    fp32, fp16 = trained["no"], trained["fp16"]
    assert fp16["compute"]["dtype"] == "fp16"
    assert len(fp16["loss"]) == STEPS and all(math.isfinite(x) for x in fp16["loss"])
    # the first step's loss comes from the same weights and batch: only the precision differs. Later steps
    # may differ more: the loss scaler skips the updates whose gradients overflow fp16 while it calibrates.
    assert relative(fp16["loss"][0], fp32["loss"][0]) < 1e-2, f"{fp16['loss']} vs {fp32['loss']}"


# --- freezing --------------------------------------------------------------------------------------------


def test_frozen_groups_get_no_gradient_and_keep_their_weights(data_cache: Path) -> None:
    """A two-tower pretraining step as the trainer runs it (bf16 autocast on CUDA), the vision tower and the
    first text layer frozen: no frozen parameter gets a gradient or changes, every trainable group learns."""
    from engine.config import FreezeConfig, config_from_dict
    from engine.data.pipeline import build_data
    from engine.freeze import apply_freeze
    from engine.models import build_model
    from engine.train import EpochSampler, _identity, _pretrain_step, build_optimizer

    cfg = config_from_dict(tiny_pretrain(data_cache))
    data = build_data(cfg, cache_dir=data_cache)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers).to(DEVICE)
    frozen_groups = ("vision", "text.layers[0]")
    apply_freeze(model, FreezeConfig(groups=frozen_groups))
    model.train()
    groups = {name: modules for name, modules in model.groups().items()  # the groups that hold parameters
              if any(True for m in modules for _ in m.parameters())}
    frozen = {name for name in groups if name.startswith("vision") or name == "text.layers[0]"}
    assert frozen and len(frozen) < len(groups)

    def params(names: set[str]) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"{n}:{i}", p) for n in sorted(names) for m in groups[n] for i, p in enumerate(m.parameters())]

    before = {key: p.detach().clone() for key, p in params(set(groups))}
    optimizer = build_optimizer(model, cfg.optim, DEVICE)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.train.batch_size, collate_fn=_identity,
                                         sampler=EpochSampler(len(data.train), 0), drop_last=True)
    batch = {k: v.to(DEVICE) if hasattr(v, "to") else v for k, v in next(iter(loader)).items()}
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    with autocast:
        loss, _ = _pretrain_step(model, batch, cfg, data, torch.Generator().manual_seed(0))
    loss.backward()
    for key, p in params(frozen):
        assert not p.requires_grad and p.grad is None, key
    trainable = set(groups) - frozen
    for name in trainable:  # each trainable group gets a gradient somewhere (a group is many tensors)
        grads = [p.grad for _, p in params({name}) if p.grad is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads), name
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = dict(params(set(groups)))
    for key, _ in params(frozen):
        assert torch.equal(after[key].detach(), before[key]), key
    moved = {key.split(":")[0] for key, _ in params(trainable) if not torch.equal(after[key].detach(), before[key])}
    assert moved == trainable


# --- the NVML inventory the queue reads ------------------------------------------------------------------


def test_nvml_inventory_is_the_gpus_cuda_sees_and_shows_this_process() -> None:
    needs_cuda()
    from engine.jobs.gpus import visible_gpus
    from engine.jobs.scheduler import gpu_capacity
    from engine.store import QueueSettings

    gpus = visible_gpus()
    assert len(gpus) == torch.cuda.device_count() > 0
    for i, gpu in enumerate(gpus):
        props = torch.cuda.get_device_properties(i)
        assert gpu.name == torch.cuda.get_device_name(i)
        assert gpu.uuid.startswith("GPU-") and str(props.uuid) in gpu.uuid
        # NVML counts all of the card's memory, CUDA what it can hand out: within 5% of each other
        assert abs(gpu.memory_total_mb - props.total_memory / 2**20) < 0.05 * gpu.memory_total_mb
        assert gpu.utilization_pct is None or 0 <= gpu.utilization_pct <= 100
    assert [g.uuid for g in visible_gpus({"CUDA_VISIBLE_DEVICES": gpus[0].uuid})] == [gpus[0].uuid]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []

    # this process takes 2 GiB of cuda:0: NVML sees the memory and the process, and the queue, told that
    # other processes may use 1 GiB more than before, then counts the GPU as busy
    torch.cuda.init()
    torch.cuda.synchronize(0)
    idle = visible_gpus()[0]
    block = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)
    torch.cuda.synchronize(0)
    busy = visible_gpus()[0]
    assert busy.memory_used_mb - idle.memory_used_mb >= 2048 * 0.95
    assert os.getpid() in busy.pids
    settings = QueueSettings(foreign_memory_mb=idle.memory_used_mb + 1024)
    assert gpu_capacity([idle], [], settings) == {idle.index: 1}
    assert gpu_capacity([busy], [], settings) == {busy.index: 0}
    del block
    torch.cuda.empty_cache()


# --- a batch that does not fit ---------------------------------------------------------------------------


def test_an_oversized_batch_fails_with_rens_out_of_memory_message(tmp_path: Path, ren_home: Path,
                                                                    data_cache: Path) -> None:
    """A one-tower model of width 2048 at batch 16384: its first layer's saved activations alone are over
    100 GiB (16384 samples x 81 tokens x 2048 x 4 bytes is 10 GiB a tensor), more than an H200's 141 GB."""
    needs_cuda()
    preset = tiny_preset(tmp_path / "oom.toml", data_cache, max_steps=1, batch_size=16384, log_every=1)
    result = ren("run", str(preset), "--set", "model.backbone.hidden_size=2048", "--set", "model.backbone.heads=16",
                 "--set", "model.backbone.layers=2", "--set", "model.backbone.patch_size=8",
                 "--set", "model.backbone.image_size=64", timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    text = " ".join(result.stderr.split())
    assert f"CUDA out of memory on {torch.cuda.get_device_name()} with train.batch_size 16384" in text, text[-2000:]
    assert "train.micro_batch_size" in text
    (record,) = Store(ren_home).list_runs()
    assert record.status == "failed" and record.error.startswith("CUDA out of memory on")

