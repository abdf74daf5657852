"""SIGKILL a real `ren run` at 10 seeded random moments, resume it each time, and
check that the store stays valid and the finished curve is the uninterrupted one.

The moments are aimed at four phases: start-up (before the trainer records itself
as running), mid-step (just after a checkpoint, inside the following steps), the
write of a checkpoint (its temp directory exists), and evaluation (the window
after the checkpoint that precedes an evaluation step). Which phase each kill
actually hit is read back from the store afterwards and printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from engine.config import load_preset
from engine.runs import create_run
from engine.store import Store
from engine.train import CHECKPOINTS, LATEST, latest_checkpoint, train
from tests.helpers.cli import REN, spawn_ren
from tests.helpers.training import tiny_preset

MAX_STEPS, CKPT_EVERY, EVAL_EVERY = 96, 4, 16
PHASES = ("startup", "startup", "step", "step", "step", "checkpoint", "checkpoint", "checkpoint", "eval", "eval")
WAIT_S = 600.0


def _pointer(run_dir: Path) -> str | None:
    try:
        return (run_dir / CHECKPOINTS / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def _temps(run_dir: Path) -> list[str]:
    try:
        return [n for n in os.listdir(run_dir / CHECKPOINTS) if n.startswith(".tmp_")]
    except FileNotFoundError:
        return []


def _wait(proc: subprocess.Popen[str], until, poll_s: float = 0.01) -> bool:
    """Poll ``until()`` while the process lives; False when it ended first."""
    deadline = time.monotonic() + WAIT_S
    while proc.poll() is None:
        if until():
            return True
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(poll_s)
    return False


def _running_here(store: Store, run_id: str, pid: int) -> bool:
    return store.get_run(run_id).pid == pid


def _kill_at(phase: str, rng: random.Random, proc: subprocess.Popen[str], store: Store, run_id: str) -> str | None:
    """Wait for the phase's moment and SIGKILL the process; returns the phase hit, or
    None when the process finished before the moment came."""
    run_dir = store.run_dir(run_id)
    if phase == "startup":
        time.sleep(rng.uniform(0.2, 5.0))
    else:
        if not _wait(proc, lambda: _running_here(store, run_id, proc.pid)):
            return None
        start = _pointer(run_dir)
        if phase == "step":  # a few ms to a few steps after the next checkpoint
            if not _wait(proc, lambda: _pointer(run_dir) != start, 0.002):
                return None
            time.sleep(rng.uniform(0.005, 0.06))
        elif phase == "checkpoint":  # while accelerate writes the checkpoint's temp directory
            if not _wait(proc, lambda: bool(_temps(run_dir)), 0.0005):
                return None
            time.sleep(rng.uniform(0.0, 0.003))
        else:  # eval: after the checkpoint just before an evaluation step, inside the evaluation
            def before_eval() -> bool:
                name = _pointer(run_dir)
                return name != start and name is not None and (int(name[5:]) + CKPT_EVERY) % EVAL_EVERY == 0
            if not _wait(proc, before_eval, 0.002):
                return None
            trigger = _pointer(run_dir)
            time.sleep(rng.uniform(0.15, 0.35))
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if not _running_here(store, run_id, proc.pid):
        return "startup"
    if phase == "checkpoint" and _temps(run_dir):
        return "checkpoint write"
    if phase == "eval":
        evaluated = {p["step"] for p in store.read_metrics(run_id) if "eval/vqa_score" in p}
        ended = _pointer(run_dir) != trigger or int(trigger[5:]) + CKPT_EVERY in evaluated
        return "after evaluation" if ended else "evaluation window"
    return "training step" if phase in ("step", "checkpoint") else phase


def _check_store(store: Store, run_id: str) -> int:
    """The store reads, no partial checkpoint is the latest, and every point up to the
    latest checkpoint is on disk; returns the latest checkpoint's step (0 without one)."""
    record = store.get_run(run_id)
    assert record.status in ("created", "crashed"), record.status  # never "running" with a dead process
    assert [r.id for r in store.list_runs()] == [run_id]
    steps = [p["step"] for p in store.read_metrics(run_id) if "loss" in p]
    assert steps == sorted(set(steps)), steps
    run_dir = store.run_dir(run_id)
    name = _pointer(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if name is None:
        assert ckpt is None
        return 0
    assert ckpt is not None and ckpt.name == name and not name.startswith(".tmp_")
    step = int(name[5:])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == step
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
    assert (ckpt / "optimizer.bin").stat().st_size > 0
    assert [s for s in steps if s <= step] == list(range(1, step + 1))  # flushed before the checkpoint
    return step


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 11 process starts: about 3 minutes on an idle 2-core machine, far more on a busy one
def test_sigkill_at_ten_moments_then_resume_matches_the_uninterrupted_run(tmp_path: Path, ren_home: Path,
                                                                         data_cache: Path) -> None:
    preset = tiny_preset(tmp_path / "kill.toml", data_cache, max_steps=MAX_STEPS, checkpoint_every=CKPT_EVERY,
                         eval_every=EVAL_EVERY)
    store = Store(ren_home)
    cfg = load_preset(preset, [])
    ref_id = create_run(store, cfg, str(preset)).id
    train(cfg, store, ref_id)
    reference = dict(store.series(ref_id, "loss"))
    store.delete_run(ref_id)

    rng = random.Random(20261128)
    plan = list(PHASES)
    rng.shuffle(plan)
    proc = spawn_ren("run", str(preset))
    assert _wait(proc, lambda: bool(store.list_runs())), proc.communicate()
    run_id = store.list_runs()[0].id
    hits: list[tuple[str, str, int]] = []
    for phase in plan:
        hit = _kill_at(phase, rng, proc, store, run_id)
        assert hit is not None, f"the run finished before the {phase} kill: {proc.communicate()}"
        hits.append((phase, hit, _check_store(store, run_id)))
        proc = spawn_ren("run", "--resume", run_id)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-3000:]
    last = hits[-1][2]
    assert f"resuming {run_id} " + (f"from step {last}" if last else "from the start") in out
    assert f"finished {run_id}" in out
    print("\n".join(f"aimed at {aim:10} hit {hit:18} resumed from step {step}" for aim, hit, step in hits))

    listing = subprocess.run([*REN, "runs"], capture_output=True, text=True, timeout=WAIT_S)
    assert listing.returncode == 0 and run_id in listing.stdout and "finished" in listing.stdout
    record = store.get_run(run_id)
    assert record.status == "finished" and record.step == MAX_STEPS
    found = {hit for _, hit, _ in hits}
    assert sum(hit == "startup" for _, hit, _ in hits) >= 1 and len(found - {"startup"}) >= 2, hits
    run_dir = store.run_dir(run_id)
    assert not _temps(run_dir)  # temp dirs of killed checkpoint writes are cleaned up

    curve = store.series(run_id, "loss")
    assert [s for s, _ in curve] == list(range(1, MAX_STEPS + 1))  # every step once: nothing lost, no duplicates
    noise = max(abs(reference[s + 1] - reference[s]) for s in range(1, MAX_STEPS))
    loss = dict(curve)
    for _, _, step in hits:
        if step:
            assert abs(loss[step + 1] - loss[step]) <= noise
    assert all(loss[s] == pytest.approx(reference[s], rel=1e-4, abs=1e-5) for s in reference)
