"""Real runs on a GPU: `ren run` as a user runs it, timed, with the scores and compute accounting it records.

    python3 bench/gpu_runs.py [--only quickstart|paper] [--results FILE] [--json FILE] [--dry-run]

1. The quickstart: ``ren run presets/quickstart.toml`` (which first trains its pretraining,
   ``presets/easyvqa_pretrain.toml``, then finetunes from it). Reported: the command's wall time, each
   run's training seconds, the eval score per evaluation (the first step at which it reached 0.99), and the
   test score, which must reach 0.99 (the time to a >= 99% test score is the command's wall time).
2. The paper-size two-tower: ``presets/electra_deit_two_tower_pretrain.toml`` (ELECTRA-small + DeiT-tiny
   configs, six co-attention layers of width 256, MLM + ITM, batch 256, bf16) with both towers random, for
   300 steps. Reported from the run's compute accounting (``engine.compute``: FLOPs counted once, the last
   logged interval's samples/s): achieved TFLOP/s and MFU against the vendor table's dense bf16 peak, as
   ``ren show`` gives it, and against the bf16 matmul peak measured here (``bench/_results.matmul_peak``).

The towers' configs come from the hub cache in ``tests/fixtures/hf_cache`` (copied; ``HF_HUB_OFFLINE=1``),
so nothing is downloaded. Runs go to a fresh store (``$REN_HOME``, default a temporary directory).
``--dry-run`` (a CPU, minutes): the same commands at a few steps and tiny batches in fp32 (a CPU's bf16 is
far too slow), the quickstart's pretraining run first and named by ``train.init_from``; no score is required.
Exit status 0 when every run finished (and, without ``--dry-run``, the quickstart reached 0.99).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import RESULTS, Runtime, matmul_peak, table, write_section  # noqa: E402

REN = [sys.executable, "-c", "from engine.cli import main; main()"]
TARGET = 0.99
PAPER = REPO / "presets" / "electra_deit_two_tower_pretrain.toml"
PAPER_STEPS = 300
RANDOM_TOWERS = ['model.text.source="random"', 'model.vision.source="random"']


def ren_run(args: list[str], env: dict[str, str], log: Path | None) -> tuple[int, float, str]:
    """``ren run ARGS``: (exit code, wall seconds, the output's tail); the whole output goes to ``log``."""
    start = time.perf_counter()
    out = subprocess.run([*REN, "run", *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    text = out.stdout + out.stderr
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ ren run {' '.join(args)}\n{text}\n(exit {out.returncode}, {seconds:.1f} s)\n\n")
    return out.returncode, seconds, text[-3000:]


def quickstart(env: dict[str, str], dry: bool, log: Path | None) -> dict[str, Any]:
    from engine.store import Store

    if dry:  # the same two runs, a few steps each; the finetuning named its pretraining run explicitly
        code, seconds, tail = ren_run(["presets/easyvqa_pretrain.toml", "--set", "train.max_steps=4",
                                       "--set", "train.log_every=2"], env, log)
        if code == 0:
            (pre,) = Store(Path(env["REN_HOME"])).list_runs()
            more = ["--set", f'train.init_from="run:{pre.id}"', "--set", "train.max_steps=4", "--set",
                    "train.eval_every=2", "--set", "train.log_every=2", "--set", "data.eval_max_samples=64"]
            code, finetune_s, tail = ren_run(["presets/quickstart.toml", *more], env, log)
            seconds += finetune_s
    else:
        code, seconds, tail = ren_run(["presets/quickstart.toml"], env, log)
    store = Store(Path(env["REN_HOME"]))
    runs = {r.stage: r for r in store.list_runs()}
    result: dict[str, Any] = {"exit_code": code, "wall_s": seconds, "tail": tail if code else ""}
    for stage, record in runs.items():
        result[stage] = {"id": record.id, "status": record.status, "steps": record.step,
                         "train_s": record.train_s, "duration_s": record.duration_s, "error": record.error,
                         "dtype": (record.compute or {}).get("dtype"), "device": (record.compute or {}).get("device")}
    finetune = runs.get("finetune")
    if finetune is not None:
        evals = store.series(finetune.id, "eval/vqa_score")
        result["eval_vqa_score"] = evals
        result["first_step_eval_ge_target"] = next((step for step, value in evals if value >= TARGET), None)
        result["test_vqa_score"] = finetune.test_scores.get("test/vqa_score")
    finished = bool(runs) and all(r.status == "finished" for r in runs.values()) and len(runs) == 2 and code == 0
    score = result.get("test_vqa_score")
    result["passed"] = finished and (dry or (score is not None and score >= TARGET))
    return result


def paper(env: dict[str, str], dry: bool, log: Path | None) -> dict[str, Any]:
    from engine.store import Store

    steps = 3 if dry else PAPER_STEPS
    sets = [*RANDOM_TOWERS, f"train.max_steps={steps}", "train.checkpoint_every=100000",
            f"train.log_every={1 if dry else 50}"]
    if dry:
        sets += ["train.batch_size=2", 'train.mixed_precision="no"']
    args = [str(PAPER.relative_to(REPO)), "--name", "paper-two-tower-gpu-check"]
    for item in sets:
        args += ["--set", item]
    code, seconds, tail = ren_run(args, env, log)
    records = [r for r in Store(Path(env["REN_HOME"])).list_runs() if r.name == "paper-two-tower-gpu-check"]
    result: dict[str, Any] = {"exit_code": code, "wall_s": seconds, "tail": tail if code else "", "steps": steps}
    if records:
        record = records[0]
        result.update(id=record.id, status=record.status, steps_done=record.step, train_s=record.train_s,
                      error=record.error, compute=record.compute)
    c = result.get("compute") or {}
    result["passed"] = (code == 0 and result.get("status") == "finished" and result.get("steps_done") == steps
                        and "achieved_flops" in c)
    return result


def hub_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with an offline hub cache holding the towers' configs (a copy of the tests' fixture)."""
    if "HF_HUB_CACHE" not in env:
        cache = Path(tempfile.mkdtemp(prefix="ren-hf-cache-"))
        shutil.copytree(REPO / "tests" / "fixtures" / "hf_cache", cache, dirs_exist_ok=True)
        env["HF_HUB_CACHE"] = str(cache)
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def report(results: dict[str, Any], peak: float | None, dry: bool) -> str:
    rows = []
    q = results.get("quickstart")
    if q:
        pre, fine = q.get("pretrain", {}), q.get("finetune", {})
        score = q.get("test_vqa_score")
        rows.append(["quickstart (`ren run presets/quickstart.toml`: pretraining, then finetuning)",
                     f"{q['wall_s']:.0f} s (pretrain {pre.get('train_s') or 0:.0f} s + finetune "
                     f"{fine.get('train_s') or 0:.0f} s of training)",
                     f"test vqa_score {score:.4f}" if score is not None else "no test score",
                     f"eval >= {TARGET} first at step {q.get('first_step_eval_ge_target')}",
                     f"{fine.get('dtype')}", "pass" if q["passed"] else "FAIL"])
    p = results.get("paper")
    if p:
        c = p.get("compute") or {}
        achieved = c.get("achieved_flops")
        measured = f", {achieved / peak:.1%} of the measured matmul peak ({peak / 1e12:.3g} TFLOP/s)" \
            if achieved and peak else ""
        util = (f"{achieved / 1e12:.3g} TFLOP/s; MFU {c['utilisation']:.1%} of the table's "
                f"{c.get('peak_flops', 0) / 1e12:.3g} TFLOP/s{measured}") if achieved and "utilisation" in c else "-"
        rows.append([f"paper two-tower, random towers, batch {256 if not dry else 2}, {p['steps']} steps",
                     f"{p['wall_s']:.0f} s ({p.get('train_s') or 0:.0f} s training)",
                     f"{c.get('samples_per_s', 0):.0f} samples/s, peak memory {c.get('peak_memory_mb', 0):.0f} MiB",
                     util, f"{c.get('dtype')}", "pass" if p["passed"] else "FAIL"])
    return table(["run", "wall time", "result", "compute", "dtype", "check"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("quickstart", "paper"), action="append", default=None)
    parser.add_argument("--dry-run", action="store_true", help="a CPU: a few steps, tiny batches, fp32")
    parser.add_argument("--results", type=Path, default=None,
                        help="write the section gpu_runs here (default: bench/RESULTS.md on a GPU, nothing else)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="append every run's whole output here")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: use --dry-run on a CPU")
    env = hub_env(dict(os.environ))
    env.setdefault("REN_HOME", tempfile.mkdtemp(prefix="ren-gpu-runs-"))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dry_run": args.dry_run}
    for name in args.only or ("quickstart", "paper"):
        run_env = {**env, "REN_HOME": str(Path(env["REN_HOME"]) / name)}
        results[name] = (quickstart if name == "quickstart" else paper)(run_env, args.dry_run, args.log)
        print(json.dumps(results[name], indent=1, default=str), flush=True)
    peak = matmul_peak(Runtime("cuda" if cuda else "cpu", "bf16" if cuda else "fp32")) if "paper" in results else None
    results["measured_matmul_peak"] = peak
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    text = report(results, peak, args.dry_run)
    print(text)
    if args.results is not None or (cuda and not args.dry_run):
        body = (f"`ren run` on {results['device']}, each in a fresh store. Time to a >= {TARGET:.0%} test score "
                "is the quickstart command's wall time (its test score is taken once, at the end). MFU from "
                "the run's compute accounting (`engine.compute`: FLOPs of the first step, samples/s of the "
                "last logged interval) against the vendor table's dense peak, as `ren show` gives it, and "
                "against the bf16 matmul peak measured after the runs on the same card.\n\n" + text)
        write_section("gpu_runs", "Real runs on a GPU: the quickstart and the paper-size two-tower", body,
                      path=args.results or RESULTS)
    passed = all(results[name]["passed"] for name in ("quickstart", "paper") if name in results)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
