"""The results store under load: many trainers writing metrics while the TUI polls.

    .venv/bin/python bench/store_load.py [--repeats 7] [--quick]

Write phase: ``--runs`` runs (default 100) of ``--points`` points each (default 10,000: one
million in all), every point a step with the keys a two-tower pretraining logs (loss, mlm, itm,
lr, samples_per_s, epoch, compute/pflops, compute/device_hours). ``--writers`` processes
(spawned, like separate trainers) each own a share of the runs, hold one ``MetricsWriter`` per
run through ``Store.metrics_writer`` and log one point to each of their runs in turn, as fast as
they can. Time is compressed, so the trainer's clocks (flush every 2 s, index update every 5 s)
become point counts: each run flushes (``flush()``, timed) every ``--flush-points`` points and
rewrites its run record (``update_run`` with step and loss trace, as the trainer does) every
``--index-points`` points, between ``mark_running`` and ``mark_ended``. With the defaults that is
a trainer logging 250 steps/s per run; a real one logs a few, so its flushes carry fewer points
and rewrite the partly filled segment more often (see "write amplification").

Meanwhile a reader process polls every ``--poll-s`` seconds as the TUI does, through
``ren_tui.backend.Backend``: the Runs screen's ``runs()`` (the index, re-parsed only when
``index_stamp`` changes, with a liveness check of every running run) and the Monitor's
``series_stamp`` + ``series`` on ``--watch`` runs per poll, rotating over all runs. Every read
must parse and be a prefix of what was logged (steps 1..n, all keys, never shorter than the last
read); failures are counted. At the end every run must hold all its points.

Read phase: one run of ``--series-points`` points (default 20,000) written by the writer, then
read whole with ``Backend.series`` (what the Monitor does), alternating "cold" (the segment files
evicted from the page cache with ``posix_fadvise(DONTNEED)`` first; a VM's host may still cache
them) and "warm" (read again at once), median of ``--repeats``.

Runs in a throw-away store under the system temp directory. ``--quick``: a tiny run, printed only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._results import alternate, median, table, write_section  # noqa: E402
from engine.store import Store  # noqa: E402

KEYS = ("loss", "mlm", "itm", "lr", "samples_per_s", "epoch", "compute/pflops", "compute/device_hours")
SEGMENT_POINTS = 5000  # the writer's default


def point_values(step: int, salt: int) -> dict[str, float]:
    """One logged step: a decaying loss and its parts, the schedule, throughput and compute."""
    loss = 2.0 / (1.0 + step / 500.0) + 0.01 * ((step * 7919 + salt) % 13)
    return {"loss": loss, "mlm": 0.6 * loss, "itm": 0.4 * loss, "lr": 1e-4 * min(1.0, step / 1000),
            "samples_per_s": 200.0 + (step + salt) % 9, "epoch": step / 1200,
            "compute/pflops": 0.0125 * step, "compute/device_hours": step / 7200}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> str:
    """"median / p95 / max" in milliseconds."""
    if not values:
        return "-"
    return f"{median(values) * 1e3:.1f} / {quantile(values, 0.95) * 1e3:.1f} / {max(values) * 1e3:.1f}"


# --- the writer processes -------------------------------------------------------------------


def write_runs(job: tuple[str, list[str], int, int, int, int, int]) -> dict[str, Any]:
    """Log ``points`` steps to each of ``run_ids``, one writer per run, round-robin; returns
    the latencies of every flush and index update and how many points each flush serialised."""
    root, run_ids, points, flush_every, index_every, slot, slots = job
    store = Store(root)
    host, pid = socket.gethostname(), os.getpid()
    flush_lat: list[float] = []
    index_lat: list[float] = []
    flush_cpu: list[float] = []  # this process's CPU time in each flush: what load on the machine does not inflate
    serialised = 0  # points written to disk, counting every rewrite of a partly filled segment
    flushed = {rid: 0 for rid in run_ids}
    writers = {rid: store.metrics_writer(rid, flush_every_s=float("inf")) for rid in run_ids}
    for rid in run_ids:
        store.mark_running(rid, pid=pid, host=host, device="cpu")
    # Stagger the runs so that they do not all flush in the same round.
    phase = {rid: (i * slots + slot) / (len(run_ids) * slots) for i, rid in enumerate(run_ids)}
    flush_at = {rid: int(flush_every * phase[rid]) for rid in run_ids}
    index_at = {rid: int(index_every * phase[rid]) for rid in run_ids}
    traces: dict[str, list[float]] = {rid: [] for rid in run_ids}

    def flush(rid: str, step: int) -> None:
        nonlocal serialised
        t0, c0 = time.perf_counter(), time.process_time()
        writers[rid].flush()
        flush_lat.append(time.perf_counter() - t0)
        flush_cpu.append(time.process_time() - c0)
        done = flushed[rid]
        serialised += step - (done // SEGMENT_POINTS) * SEGMENT_POINTS
        flushed[rid] = step

    for step in range(1, points + 1):
        for salt, rid in enumerate(run_ids):
            values = point_values(step, salt)
            writers[rid].log(step, **values)
            if step % flush_every == flush_at[rid]:
                flush(rid, step)
            if step % index_every == index_at[rid]:
                traces[rid] = (traces[rid] + [values["loss"]])[-24:]
                t0 = time.perf_counter()
                store.update_run(rid, step=step, loss_trace=traces[rid])
                index_lat.append(time.perf_counter() - t0)
    for rid, writer in writers.items():
        if flushed[rid] < points:
            flush(rid, points)
        writer.close()
        store.update_run(rid, step=points)
        store.mark_ended(rid, "finished")
    return {"flush": flush_lat, "flush_cpu": flush_cpu, "index": index_lat, "serialised": serialised}


def _ready(_: int) -> int:
    return os.getpid()


# --- the reader process ---------------------------------------------------------------------


def poll(root: str, run_ids: list[str], points: int, poll_s: float, watch: int, stop: Any, out: Any) -> None:
    """Poll the store like the TUI until ``stop`` is set; put the tallies on ``out``."""
    from ren_tui.backend import Backend

    backend = Backend(Store(root), start_worker=False)
    latencies: list[float] = []
    cpu: list[float] = []
    failures: list[str] = []
    seen = dict.fromkeys(run_ids, 0)
    stamps: dict[str, Any] = {}
    series_reads = points_read = 0
    n = 0
    while not stop.is_set():
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            runs = backend.runs()
            if len(runs) < len(run_ids):
                failures.append(f"poll {n}: listed {len(runs)} runs, expected {len(run_ids)}")
            for k in range(watch):
                rid = run_ids[(n * watch + k) % len(run_ids)]
                stamp = backend.series_stamp(rid)
                if stamp == stamps.get(rid):
                    continue
                got = backend.series(rid).points
                stamps[rid] = stamp
                series_reads += 1
                points_read += len(got)
                steps = [p["step"] for p in got]
                if steps != list(range(1, len(got) + 1)) or len(got) > points:
                    failures.append(f"poll {n}: run {rid} is not steps 1..{len(got)}")
                elif len(got) < seen[rid]:
                    failures.append(f"poll {n}: run {rid} shrank from {seen[rid]} to {len(got)} points")
                elif any(key not in p for p in got for key in KEYS):
                    failures.append(f"poll {n}: run {rid} has a point without all keys")
                seen[rid] = max(seen[rid], len(got))
        except Exception as exc:  # noqa: BLE001 - every failure to read is what is being counted
            failures.append(f"poll {n}: {type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        n += 1
        stop.wait(max(0.0, poll_s - latencies[-1]))
    out.put({"latency": latencies, "cpu": cpu, "failures": failures, "series_reads": series_reads,
             "points_read": points_read})


# --- the phases -----------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_phase(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tests.tui_fake import preset_config

    store = Store(root)
    config = preset_config()
    t0 = time.perf_counter()
    ids = [store.create_run(name=f"load-{i:03d}", stage="pretrain", kind="two_tower", config=config,
                            tags=("study:load",), max_steps=args.points).id for i in range(args.runs)]
    created_s = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    jobs = [(str(root), ids[w::args.writers], args.points, args.flush_points, args.index_points, w, args.writers)
            for w in range(args.writers)]
    stop, out = ctx.Event(), ctx.Queue()
    with ctx.Pool(args.writers) as pool:
        pool.map(_ready, range(args.writers), chunksize=1)  # the interpreters are up before the clock starts
        reader = ctx.Process(target=poll, args=(str(root), ids, args.points, args.poll_s, args.watch, stop, out))
        reader.start()
        time.sleep(0.5)  # the reader has imported its modules and is polling
        t0 = time.perf_counter()
        results = pool.map(write_runs, jobs, chunksize=1)
        write_s = time.perf_counter() - t0
    stop.set()
    polled = out.get(timeout=120)
    reader.join(timeout=30)
    lost = []
    for rid in ids:
        steps = [p["step"] for p in store.read_metrics(rid)]
        if steps != list(range(1, args.points + 1)):
            lost.append(f"{rid}: {len(steps)} points")
    metrics_bytes = sum(tree_bytes(store.run_dir(rid) / "metrics") for rid in ids)
    return {
        "created_s": created_s, "write_s": write_s, "lost": lost, "polled": polled,
        "flush": [x for r in results for x in r["flush"]], "flush_cpu": [x for r in results for x in r["flush_cpu"]],
        "index": [x for r in results for x in r["index"]],
        "serialised": sum(r["serialised"] for r in results),
        "metrics_bytes": metrics_bytes, "store_bytes": tree_bytes(root),
        "index_bytes": (root / "index.json").stat().st_size,
    }


def evict(directory: Path) -> None:
    """Drop the files' pages from the page cache (they are clean: the writer fsyncs)."""
    for path in directory.glob("*.json"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_phase(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from ren_tui.backend import Backend

    store = Store(root)
    rid = store.create_run(name="series", stage="pretrain", kind="two_tower", config={},
                           max_steps=args.series_points).id
    with store.metrics_writer(rid) as writer:
        for step in range(1, args.series_points + 1):
            writer.log(step, **point_values(step, 0))
    backend = Backend(Store(root), start_worker=False)
    metrics = store.run_dir(rid) / "metrics"

    cpu: dict[str, list[float]] = {"cold": [], "warm": []}

    def read(side: str = "warm") -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        got = backend.series(rid)
        elapsed = time.perf_counter() - t0
        cpu[side].append(time.process_time() - c0)
        if len(got.points) != args.series_points:
            raise SystemExit(f"read {len(got.points)} points of {args.series_points}")
        return elapsed

    def cold() -> float:
        evict(metrics)
        return read("cold")

    times = alternate({"cold": cold, "warm": read}, args.repeats)
    t0 = time.perf_counter()
    curve = store.series(rid, "loss")
    series_s = time.perf_counter() - t0
    return {"times": times, "cpu": cpu, "bytes": tree_bytes(metrics), "segments": len(list(metrics.glob("*.json"))),
            "loss_s": series_s, "loss_points": len(curve)}


def report(args: argparse.Namespace, w: dict[str, Any], r: dict[str, Any]) -> str:
    total = args.runs * args.points
    polled = w["polled"]
    flushes = len(w["flush"])
    mib = 2 ** 20
    rows = [
        ["points written", f"{total:,} ({args.runs} runs x {args.points:,} steps, {len(KEYS)} values per step)"],
        ["writer processes", f"{args.writers} (each holds {args.runs // args.writers} writers, round-robin)"],
        ["creating the runs (index only)", f"{w['created_s']:.1f} s"],
        ["total write time", f"{w['write_s']:.1f} s"],
        ["points/s (all writers)", f"{total / w['write_s']:,.0f}"],
        ["flushes", f"{flushes:,} (every {args.flush_points} points per run)"],
        ["write amplification", f"{w['serialised'] / total:.1f} points serialised per point logged "
                                f"(each flush rewrites the run's partly filled {SEGMENT_POINTS}-point segment)"],
        ["flush latency median / p95 / max", f"{ms(w['flush'])} ms"],
        ["flush CPU time median / p95 / max (the writer process's)", f"{ms(w['flush_cpu'])} ms"],
        [f"index updates (update_run, every {args.index_points} points per run)",
         f"{len(w['index']):,}; median / p95 / max {ms(w['index'])} ms"],
        ["reader polls", f"{len(polled['latency']):,} (every {args.poll_s} s; index + {args.watch} runs' series)"],
        ["reader poll latency median / p95 / max", f"{ms(polled['latency'])} ms"],
        ["reader poll CPU time median / p95 / max", f"{ms(polled['cpu'])} ms"],
        ["series re-read by the reader", f"{polled['series_reads']:,} ({polled['points_read']:,} points)"],
        ["failed or inconsistent reads", f"{len(polled['failures'])} ({'PASS' if not polled['failures'] else 'FAIL'}: "
                                         "target 0)"],
        ["points lost (final check of every run)",
         f"{len(w['lost'])} runs short ({'PASS' if not w['lost'] else 'FAIL'})"],
        ["on disk: metrics", f"{w['metrics_bytes'] / mib:.1f} MiB ({w['metrics_bytes'] / total:.0f} bytes per point, "
                             "JSON)"],
        ["on disk: index.json", f"{w['index_bytes'] / 1024:.0f} KiB ({args.runs} run records)"],
        ["on disk: whole store", f"{w['store_bytes'] / mib:.0f} MiB"],
    ]
    reads = []
    for side, label in (("cold", "`Backend.series` (the Monitor), page cache evicted"),
                        ("warm", "`Backend.series`, read again at once")):
        wall, cpu = r["times"][side], r["cpu"][side]
        reads.append([label, f"{median(wall) * 1e3:.0f}", f"{min(wall) * 1e3:.0f}", f"{max(wall) * 1e3:.0f}",
                      f"{median(cpu) * 1e3:.0f}", len(wall)])
    reads.append(["`Store.series(run, \"loss\")`, warm, once", f"{r['loss_s'] * 1e3:.0f}", "", "", "", 1])
    body = (f"Write {total:,} metric points while the TUI's reader polls:\n\n" + table(["", "measured"], rows)
            + f"\n\nRead one {args.series_points:,}-point series ({r['segments']} segments, "
            f"{r['bytes'] / mib:.1f} MiB of JSON, {len(KEYS)} values per point):\n\n"
            + table(["read", "median ms", "min ms", "max ms", "CPU median ms", "n"], reads))
    if polled["failures"]:
        body += "\n\nFirst failed reads: " + "; ".join(polled["failures"][:5])
    if w["lost"]:
        body += "\n\nRuns short of points: " + "; ".join(w["lost"][:5])
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="reads of the big series, cold and warm each")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--points", type=int, default=10_000, help="points per run")
    parser.add_argument("--writers", type=int, default=10, help="writer processes")
    parser.add_argument("--flush-points", type=int, default=500, help="points between a run's flushes")
    parser.add_argument("--index-points", type=int, default=1250, help="points between a run's index updates")
    parser.add_argument("--poll-s", type=float, default=0.2, help="seconds between the reader's polls")
    parser.add_argument("--watch", type=int, default=2, help="runs whose series each poll checks")
    parser.add_argument("--series-points", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print only, never write RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.points, args.writers, args.series_points = 4, 500, 2, 2000
        args.repeats, args.flush_points, args.index_points = 2, 100, 250
    if args.runs % args.writers:
        parser.error(f"--runs {args.runs} must be a multiple of --writers {args.writers}")
    root = Path(tempfile.mkdtemp(prefix="ren-store-load-"))
    os.environ["REN_HOME"] = str(root)
    try:
        w = write_phase(root, args)
        r = read_phase(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = report(args, w, r)
    print(body)
    if not args.quick:
        write_section("store_load", "Store under load: 1M metric points, a polling reader, reading a series", body)


if __name__ == "__main__":
    main()
