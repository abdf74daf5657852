"""Time to first batch and memory of reading a ViLT arrow file, memory-mapped.

    .venv/bin/python bench/arrow_read.py [--rows 10000] [--batch 32] [--repeats 5]

Writes a ``coco_caption_karpathy_train.arrow`` in ViLT's layout (image bytes,
caption list, image id, split) with ``--rows`` distinct 224x224 JPEGs of about
5-15 KB each (smooth colour fields plus noise). Then, per repeat, a fresh
interpreter imports :mod:`engine.data.arrow`, opens the file with
:func:`~engine.data.arrow.open_arrow` and reads a random batch of ``--batch``
rows (captions, image ids and decoded RGB images). It reports the import time,
the open time, the batch time and their sum after import (time to first batch);
its peak RSS (``ru_maxrss``), the same less that of an interpreter that only
imports the module, its final anonymous and file-backed RSS
(``/proc/self/status``) and Arrow's heap allocations, against the file size.

"warm" runs first evict the file and read it whole with ``read`` (as an
earlier epoch would), so it is in the page cache; "cold" runs first evict the file's pages
with ``posix_fadvise(DONTNEED)`` (no root needed). Both run with the default
``random_access=True`` (``MADV_RANDOM``) and again, "_readahead", with
``random_access=False``. The launcher does no heavy imports and writes the file
in a subprocess, so the children's ``ru_maxrss`` (which carries over fork and
exec) is their own. File-backed RSS counts page-cache pages mapped into the
process, which the kernel may map a whole large folio at a time. Prints one JSON object of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def jpeg(rng: Any, size: int = 224) -> bytes:
    """A 224x224 JPEG of a smooth random colour field with noise (about 5-15 KB)."""
    from io import BytesIO

    import numpy as np
    from PIL import Image

    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    amplitude = int(rng.integers(5, 21))
    noisy = np.asarray(field, dtype=np.int16) + rng.integers(-amplitude, amplitude + 1, (size, size, 3))
    out = BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=80)
    return out.getvalue()


def write_file(path: Path, rows: int) -> None:
    """Write the file in ViLT's coco_caption layout; prints the JPEG sizes as JSON."""
    import numpy as np
    import pyarrow as pa

    schema = pa.schema([("image", pa.binary()), ("caption", pa.list_(pa.string())), ("image_id", pa.string()),
                        ("split", pa.string())])
    rng = np.random.default_rng(0)
    images = [jpeg(rng) for _ in range(rows)]
    captions = [[f"caption {k} of image {i}" for k in range(5)] for i in range(rows)]
    ids = [f"COCO_train2014_{i:012d}.jpg" for i in range(rows)]
    table = pa.Table.from_arrays([pa.array(images, pa.binary()), pa.array(captions, schema.field("caption").type),
                                  pa.array(ids, pa.string()), pa.array(["train"] * rows, pa.string())], schema=schema)
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, schema) as writer:
        writer.write_table(table)
    print(json.dumps([len(image) for image in images]))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(path: Path, batch: int, seed: int, baseline: bool, readahead: bool) -> None:
    """One measurement in this fresh interpreter; prints a JSON line."""
    start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import pyarrow as pa

    from engine.data.arrow import open_arrow

    imported = time.perf_counter()
    result: dict[str, float] = {"import_s": imported - start}
    if not baseline:
        source = open_arrow([path], "coco_caption", random_access=not readahead)
        opened = time.perf_counter()
        rows = random.Random(seed).sample(range(len(source)), batch)
        images = [source.image(i) for i in rows]
        texts = [source.row(i, ["caption", "image_id"]) for i in rows]
        done = time.perf_counter()
        assert all(image is not None and image.size == (224, 224) for image in images) and len(texts) == batch
        result.update(open_s=opened - imported, batch_s=done - opened, first_batch_s=done - imported,
                      arrow_allocated_bytes=pa.total_allocated_bytes())
    result.update(maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm_kb=_status_kb("VmHWM"),
                  rss_anon_kb=_status_kb("RssAnon"), rss_file_kb=_status_kb("RssFile"))
    print(json.dumps(result))


def warm(path: Path) -> None:
    evict(path)  # the pages the writer left behind are laid out differently from pages read back
    with open(path, "rb") as handle:
        while handle.read(1 << 23):
            pass


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(*arguments: str) -> Any:
    """Run this script with ``arguments`` in a fresh interpreter; its last output line, parsed."""
    out = subprocess.run([sys.executable, __file__, *arguments], check=True, capture_output=True, text=True,
                         cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_child(path: Path, batch: int, seed: int, baseline: bool = False, readahead: bool = False) -> dict[str, float]:
    flags = (["--baseline"] if baseline else []) + (["--readahead"] if readahead else [])
    return run("--child", str(path), "--batch", str(batch), "--seed", str(seed), *flags)


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--readahead", action="store_true")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.seed, args.baseline, args.readahead)
        return
    if args.write:
        write_file(args.write, args.rows)
        return
    with tempfile.TemporaryDirectory(prefix="ren-arrow-bench-") as directory:
        path = Path(directory) / "coco_caption_karpathy_train.arrow"
        written = time.perf_counter()
        sizes = run("--write", str(path), "--rows", str(args.rows))
        write_s = time.perf_counter() - written
        file_bytes = path.stat().st_size
        baseline = [run_child(path, args.batch, 0, baseline=True) for _ in range(args.repeats)]
        report: dict[str, object] = {
            "rows": args.rows, "batch": args.batch, "repeats": args.repeats, "write_s": round(write_s, 2),
            "file_mb": round(file_bytes / 2**20, 1),
            "jpeg_kb": {"median": round(statistics.median(sizes) / 1024, 1), "min": round(min(sizes) / 1024, 1),
                        "max": round(max(sizes) / 1024, 1)},
            "import_only_maxrss_mb": round(median(baseline, "maxrss_kb") / 1024, 1),
            "import_only_s": round(median(baseline, "import_s"), 4),
            "import_only_rss_anon_mb": round(median(baseline, "rss_anon_kb") / 1024, 1),
            "import_only_rss_file_mb": round(median(baseline, "rss_file_kb") / 1024, 1),
        }
        for mode in ("warm", "cold", "warm_readahead", "cold_readahead"):
            runs = []
            for repeat in range(args.repeats):
                (evict if mode.startswith("cold") else warm)(path)
                runs.append(run_child(path, args.batch, repeat + 1, readahead=mode.endswith("readahead")))
            peak_delta_mb = (median(runs, "maxrss_kb") - median(baseline, "maxrss_kb")) / 1024
            report[mode] = {
                "import_s": round(median(runs, "import_s"), 4),
                "open_s": round(median(runs, "open_s"), 5),
                "batch_s": round(median(runs, "batch_s"), 4),
                "first_batch_s": round(median(runs, "first_batch_s"), 4),
                "peak_rss_mb": round(median(runs, "maxrss_kb") / 1024, 1),
                "peak_rss_over_import_only_mb": round(peak_delta_mb, 1),
                "peak_rss_over_import_only_per_file_size": round(peak_delta_mb * 2**20 / file_bytes, 4),
                "vm_hwm_mb": round(median(runs, "hwm_kb") / 1024, 1),
                "rss_anon_mb": round(median(runs, "rss_anon_kb") / 1024, 1),
                "rss_file_mb": round(median(runs, "rss_file_kb") / 1024, 1),
                "arrow_allocated_bytes": int(median(runs, "arrow_allocated_bytes")),
            }
        # ru_maxrss carries over fork and exec; it is the child's own only while this launcher stays smaller
        report["launcher_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
