"""From a ViLT arrow file to the first training step, and what the file's size changes.

    .venv/bin/python bench/arrow_train_start.py [--rows 1000 10000 100000] [--repeats 3]

For each row count, writes ``vqav2_train.arrow`` and ``vqav2_rest_val.arrow``
in ViLT's layout (224x224 JPEGs, 500 distinct images), then, in fresh
processes, finetunes the small one-tower test model on it for one step (batch
32, images at 224) and reports, as medians over ``--repeats``:

- ``first_step_s``: from just before the process is spawned (taken in this
  parent; psutil's process create time is rounded to whole boot seconds) to the
  end of the first optimizer step;
- ``imports_s``: the trainer's imports (torch, transformers, accelerate, and
  torchvision, which brings ``torch._dynamo``, for the image transforms);
- ``data_s``: opening the arrow files, reading the answer vocabulary and
  indexing every question (``build_data``);
- ``rest_s``: the remainder: model build (with transformers' lazy model
  imports), the first batch decoded, forward, backward, optimizer step;
- ``peak_rss_mb`` of the process; at the end, ``rss_anon_mb`` (private memory:
  heap, tensors) and ``rss_file_mb`` (file pages mapped: libraries, and the
  page-cache pages of the arrow file around the rows read, which the kernel
  maps a whole cached folio at a time and may drop at will); and the train
  file's size.

The claim to check: the file's size changes ``data_s`` by milliseconds and the
private memory not at all, because the file is memory-mapped and read by the
rows a batch touches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# ELECTRA's tokenizer files as the test suite's offline hub cache holds them (a local directory).
TOKENIZER = next((REPO / "tests/fixtures/hf_cache/models--google--electra-small-discriminator/snapshots").iterdir())

CHILD = r"""
import json, resource, sys, time
t0 = time.time()
import engine.train as train_module
import engine.data.images, engine.data.vqav2  # imported by build_data on first use: count them as imports
from engine.config import load_preset
from engine.runs import create_run
from engine.store import Store
t1 = time.time()
timings = {}
build_data = train_module.build_data
def timed_build_data(*args, **kwargs):
    start = time.time()
    out = build_data(*args, **kwargs)
    timings["data_s"] = time.time() - start
    return out
train_module.build_data = timed_build_data
preset, home = sys.argv[1], sys.argv[2]
store = Store(home)
cfg = load_preset(__import__("pathlib").Path(preset))
record = create_run(store, cfg, preset)
start = time.time()
train_module.train(cfg, store, record.id)
first = store.read_metrics(record.id)[0]["time"]
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda key: int(status[key].split()[0]) / 1024
print("RESULT", json.dumps({"rss_anon_mb": kib("RssAnon"), "rss_file_mb": kib("RssFile"),
                            "first_step_at": first, "started_at": t0, "imports_s": t1 - t0,
                            "rest_s": first - start - timings["data_s"], **timings,
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(rows: int, repeats: int, tmp: Path) -> dict:
    from tests.arrow_fixtures import write_vqav2

    root = tmp / f"arrows{rows}"
    root.mkdir()
    train_file = write_vqav2(root, "train", n=rows, distinct_images=500, image_size=(224, 224)).path
    write_vqav2(root, "rest_val", n=50, start=rows, image_size=(224, 224))
    preset = tmp / f"vqav2_{rows}.toml"
    preset.write_text(
        f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
        f'[model.backbone]\nimage_size = 224\npatch_size = 16\n'
        f'[data]\ndataset = "vqav2"\nroot = "{root}"\ntokenizer = "{TOKENIZER}"\n'
        "train_split = \"train\"\neval_max_samples = 32\n"
        "[train]\nmax_steps = 1\nbatch_size = 32\nlog_every = 1\n"
    )
    results = []
    for i in range(repeats):
        spawned = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, str(preset), str(tmp / f"home{rows}_{i}")],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(out.stderr[-3000:])
        result = json.loads(line[len("RESULT "):])
        result["first_step_s"] = result["first_step_at"] - spawned
        results.append(result)

    def med(key: str, digits: int = 2) -> float:
        return round(statistics.median(r[key] for r in results), digits)

    return {"rows": rows, "train_file_mb": round(train_file.stat().st_size / 2**20, 1),
            "first_step_s": med("first_step_s"), "first_step_max_s": round(max(r["first_step_s"] for r in results), 2),
            "imports_s": med("imports_s"), "data_s": med("data_s", 3), "rest_s": med("rest_s"),
            "peak_rss_mb": med("peak_rss_mb", 1), "rss_anon_mb": med("rss_anon_mb", 1),
            "rss_file_mb": med("rss_file_mb", 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps([measure(rows, args.repeats, Path(tmp)) for rows in args.rows], indent=2))


if __name__ == "__main__":
    main()
