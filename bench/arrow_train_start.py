"""From a 10,000-row ViLT arrow file to the first training step.

    .venv/bin/python bench/arrow_train_start.py [--rows 10000] [--repeats 3]

Writes ``vqav2_train.arrow`` and ``vqav2_rest_val.arrow`` in ViLT's layout
(224x224 JPEGs), then, in fresh processes, finetunes the small one-tower test
model on it for one step (batch 32, images at 224) and reports the seconds
from process start to the end of that step (imports, arrow open, answer
vocabulary, model build, first batch decoded, forward, backward, optimizer
step), the peak RSS, and the train file's size. Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# ELECTRA's tokenizer files as the test suite's offline hub cache holds them (a local directory).
TOKENIZER = next((REPO / "tests/fixtures/hf_cache/models--google--electra-small-discriminator/snapshots").iterdir())

CHILD = r"""
import json, resource, sys, psutil
born = psutil.Process().create_time()
from engine.config import load_preset
from engine.launch import create_run
from engine.store import Store
from engine.train import train

preset, home = sys.argv[1], sys.argv[2]
store = Store(home)
cfg = load_preset(__import__("pathlib").Path(preset))
record = create_run(store, cfg, preset)
train(cfg, store, record.id)
first = store.read_metrics(record.id)[0]["time"]
print("RESULT", json.dumps({"first_step_s": first - born,
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tests.arrow_fixtures import write_vqav2

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "arrows"
        root.mkdir()
        train_file = write_vqav2(root, "train", n=args.rows, distinct_images=500, image_size=(224, 224)).path
        write_vqav2(root, "rest_val", n=50, start=args.rows, image_size=(224, 224))
        preset = Path(tmp) / "vqav2.toml"
        preset.write_text(
            f'extends = "{REPO / "tests" / "fixtures" / "one_tower.toml"}"\n'
            f'[model.backbone]\nimage_size = 224\npatch_size = 16\n'
            f'[data]\ndataset = "vqav2"\nroot = "{root}"\ntokenizer = "{TOKENIZER}"\n'
            "train_split = \"train\"\neval_max_samples = 32\n"
            "[train]\nmax_steps = 1\nbatch_size = 32\nlog_every = 1\n"
        )
        results = []
        for i in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, str(preset), str(Path(tmp) / f"home{i}")],
                                 capture_output=True, text=True, cwd=REPO, timeout=600)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(out.stderr[-3000:])
            results.append(json.loads(line[len("RESULT "):]))
        size_mb = train_file.stat().st_size / 2**20
    print(json.dumps({
        "rows": args.rows, "train_file_mb": round(size_mb, 1),
        "first_step_s": {"median": round(statistics.median(r["first_step_s"] for r in results), 2),
                         "max": round(max(r["first_step_s"] for r in results), 2)},
        "peak_rss_mb": {"median": round(statistics.median(r["peak_rss_mb"] for r in results), 1),
                        "max": round(max(r["peak_rss_mb"] for r in results), 1)},
    }, indent=2))


if __name__ == "__main__":
    main()
