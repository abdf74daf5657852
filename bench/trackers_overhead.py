"""What experiment trackers cost a run: training steps per second with trackers on against off.

    .venv/bin/python bench/trackers_overhead.py [--repeats 3] [--steps 60] [--log-every 1] [--quick]
    .venv/bin/python bench/trackers_overhead.py --per-call [--calls 200]

Each side trains the same easy-VQA two-tower finetune (``presets/base/easyvqa_two_tower.toml`` sizes,
random init, no evaluation during training) in this process, in alternation: no tracker; TensorBoard;
MLflow logging over HTTP to a real ``mlflow server`` on 127.0.0.1; W&B in offline mode. The figure is the
training loop's steps per second (steps over the run's train seconds, which leave out set-up and
evaluation; a tracker's one-off start and finish are reported apart). ``--log-every 1`` is the worst
case: every step's metrics go to the trackers (the quickstart logs every 25 steps).
``--quick``: a few steps, printed only (never writes RESULTS.md).

``--per-call``: what one ``log`` of a step's metrics (9 values) costs, tracker by tracker (each started as a
run starts it, through :class:`engine.tracking.Guarded`), called directly: the work a tracker does per
point, free of the run-to-run spread of whole runs. In a run that work is done by the trackers' own thread
(:class:`engine.tracking.TrackedWriter`), so it is not on the step's path; background threads and
processes of the trackers are not in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402
from engine.config import load_preset  # noqa: E402
from engine.data.easyvqa import load_easy_vqa  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.train import SilentReporter, train  # noqa: E402
from tests.helpers.trackers import mlflow_server  # noqa: E402

SIDES = ("off", "tensorboard", "mlflow", "wandb")


class Warnings(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        if text.startswith("[ren] tracker"):
            self.lines.append(text)


def one_run(root: Path, cache: Path, side: str, args: argparse.Namespace, uri: str,
            overheads: dict[str, list[float]]) -> float:
    """Train once with tracker ``side``; the training loop's steps per second."""
    store = Store(root / side)
    overrides = [f"data.cache_dir={str(cache)!r}", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
                 "train.eval_every=100000", "train.checkpoint_every=100000", f"train.cpu_threads={args.threads}",
                 "data.eval_max_samples=64", "run.name='bench'", "task.name='vqa'"]
    if side != "off":
        overrides += [f"tracking.log_with=[{side!r}]", f"tracking.mlflow.tracking_uri={uri!r}",
                      "tracking.wandb.mode='offline'"]
    cfg = load_preset(REPO / "presets" / "base" / "easyvqa_two_tower.toml", overrides)
    record = store.create_run(name=cfg.run.name, stage=cfg.stage, kind=cfg.model.kind, config=cfg.to_dict(),
                              max_steps=cfg.train.max_steps)
    reporter = Warnings()
    began = time.perf_counter()
    train(cfg, store, record.id, reporter=reporter)
    wall = time.perf_counter() - began
    if reporter.lines:
        raise SystemExit(f"{side}: {reporter.lines[0]}")
    done = store.get_run(record.id)
    overheads[side].append(wall - done.train_s)
    return args.steps / done.train_s


def paired_cost(rates: list[float], off: list[float]) -> tuple[float, float, float]:
    """The mean over rounds of 1 - rate / the round's rate without trackers, in percent, and its 95% t
    interval (none below two rounds)."""
    from engine.report import t_quantile

    costs = [(1 - r / o) * 100 for r, o in zip(rates, off)]
    mean = sum(costs) / len(costs)
    if len(costs) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.975, len(costs) - 1) * statistics.stdev(costs) / len(costs) ** 0.5
    return mean, mean - half, mean + half


def per_call(root: Path, uri: str, calls: int) -> str:
    """Median and 90th percentile of one ``log`` call per tracker, in ms."""
    from engine.config import TrackingConfig
    from engine.tracking import RunIdentity, build_trackers

    cfg = TrackingConfig(log_with=SIDES[1:], mlflow={"tracking_uri": uri}, wandb={"mode": "offline"})
    identity = RunIdentity("bench-per-call", "bench", "bench", str(root), "finetune", "two_tower")
    values = {f"metric_{i}": float(i) for i in range(9)}
    rows = []
    for tracker in build_trackers(cfg, identity, root, root, print):
        tracker.start()
        times = []
        for step in range(1, calls + 1):
            began = time.perf_counter()
            tracker.log(values, step=step)
            times.append((time.perf_counter() - began) * 1e3)
        tracker.finish()
        if tracker.off:
            raise SystemExit(f"{tracker.name} failed")
        times.sort()
        rows.append([tracker.name, f"{median(times):.2f}", f"{sum(times) / len(times):.2f}",
                     f"{times[int(0.9 * len(times))]:.2f}", calls])
    return (f"One `log` call of 9 metrics, called directly, {calls} calls per tracker (MLflow over HTTP to a local "
            "server, asynchronous logging; W&B offline): the work each tracker does per point. In a run the "
            "trackers' own thread does it; the training thread only queues the point.\n\n"
            + table(["tracker", "median ms", "mean ms", "p90 ms", "calls"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few steps; print only, never write RESULTS.md")
    parser.add_argument("--per-call", action="store_true", help="time single log calls instead of whole runs")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if args.per_call:
        os.environ.setdefault("WANDB_SILENT", "true")
        with tempfile.TemporaryDirectory(prefix="ren-bench-trackers-") as tmp, mlflow_server(Path(tmp)) as uri:
            body = per_call(Path(tmp), uri, args.calls)
        print(body)
        write_section("trackers_per_call", "Experiment trackers: the cost of one log call", body)
        return
    if args.quick:
        args.repeats, args.steps = 1, 6
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory(prefix="ren-bench-trackers-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        load_easy_vqa(cache)
        overheads: dict[str, list[float]] = {side: [] for side in SIDES}
        with mlflow_server(root) as uri:
            rates = alternate({side: lambda side=side: one_run(root, cache, side, args, uri, overheads)
                               for side in SIDES}, args.repeats)
    rows = []
    for side in SIDES:
        cost, low, high = paired_cost(rates[side], rates["off"])
        rows.append([side, f"{median(rates[side]):.3f}", f"{cost:+.2f}%",
                     "—" if side == "off" else f"[{low:+.2f}%, {high:+.2f}%]", f"{median(overheads[side]):.1f}",
                     " ".join(f"{r:.3f}" for r in rates[side])])
    body = (f"The easy-VQA two-tower finetune (presets/base/easyvqa_two_tower.toml), random init, {args.steps} "
            f"steps of batch 64 on {args.threads} thread(s), metrics to the trackers every {args.log_every} "
            f"step(s); {args.repeats} rounds, each running every side once back to back (rotating which goes "
            "first), in one process. steps/s: steps over the run's train seconds (set-up and evaluation left "
            "out). cost: how much slower than the same round's run without trackers, mean over rounds, with the "
            "95% t interval of that mean (paired by round, so load that drifts between rounds cancels); "
            "set-up + finish: the rest of the run's wall time, where a tracker's start (its import, MLflow's "
            "first requests) and finish fall.\n\n"
            + table(["tracker", "steps/s (median)", "cost (mean)", "95% CI of the cost", "set-up + finish s (median)",
                     "steps/s each"], rows))
    print(body)
    if not args.quick:
        write_section("trackers_overhead", "Experiment trackers: training throughput with them on and off", body)


if __name__ == "__main__":
    main()
