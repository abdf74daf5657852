#!/usr/bin/env bash
# ren's GPU check (issue 19): one prepared script for a GPU box, at most 9 minutes, results and logs in OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR            # on a GPU box (docs/gpu.md)
#   bash bench/gpu_check.sh OUT_DIR --dry-run  # on a CPU: every step at tiny sizes, a few minutes
#
# Steps (each with its own time limit; a failing step does not stop the later ones):
#   0  setup: the wheels in .whl/ (bench/gpu_wheels.sh) installed into /tmp/site when ren's imports are
#      missing; nvidia-smi, Python, torch and CUDA versions
#   a  the GPU tests: pytest -m gpu tests/gpu (skipped without CUDA; in a dry run also run with
#      REN_GPU_TESTS_ON_CPU=1, so the ones that can run on a CPU do)
#   b1 one-tower vs HF ViltForQuestionAnswering, b2 two-tower vs the LxmertXLayer wiring: bf16, ViLT-B/32 sizes,
#      samples/s, ratio, TFLOP/s and MFU against the measured bf16 matmul peak
#   c  freezing on the GPU: step time and peak memory per freeze setting against the FLOP-count saving
#   d  real runs: ren run of the quickstart (time to a >= 99% test score) and the paper-size two-tower (300 steps)
# OUT_DIR gets five files: results.md (the steps' table, then the sections the benchmarks wrote), summary.json
# (the same with every raw figure), logs.txt (every step's output), details.tar.gz (the logs and raw files one
# by one) and RESULTS.gpu.md, the benchmarks' sections, never written into bench/RESULTS.md:
# `python3 bench/_results.py merge OUT_DIR/RESULTS.gpu.md` copies them in afterwards.
# Exit status: 0 when every step passed, else 1 (2: bad arguments).
set -u -o pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
OUT=""; DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || usage
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$REPO" || exit 2
START=$(date +%s)
SUMMARY_TSV="$OUT/steps.tsv"; : > "$SUMMARY_TSV"
SECTIONS="$OUT/RESULTS.gpu.md"; rm -f "$SECTIONS"

# The interpreter: $PYTHON, else the repo's .venv (a dry run here), else python3 (the GPU box's, with torch).
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY="$(command -v python3)"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Everything a run stores goes under OUT_DIR's scratch (a fresh store), the towers' configs from the tests'
# offline hub cache (nothing is downloaded; the box has no network).
SCRATCH="$(mktemp -d /tmp/ren-gpu-check.XXXXXX)"
export REN_HOME="$SCRATCH/ren_home" HF_HUB_CACHE="$SCRATCH/hf_cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$HF_HUB_CACHE" && cp -r "$REPO/tests/fixtures/hf_cache/." "$HF_HUB_CACHE/"

# Each step's time limit (seconds): together 510 on a GPU, so the whole fits 9 minutes with the setup.
if [ "$DRY" = 1 ]; then
  declare -A LIMIT=([setup]=120 [a]=420 [b1]=120 [b2]=120 [c]=180 [d]=420)
else
  declare -A LIMIT=([setup]=40 [a]=130 [b1]=55 [b2]=55 [c]=55 [d]=175)
fi

# step NAME TITLE COMMAND...: run it under its limit, its output into OUT/NAME.log (and a short tail here)
step() {
  local name="$1" title="$2"; shift 2
  local t0=$(date +%s) code
  echo "=== [$name] $title (limit ${LIMIT[$name]} s)"
  timeout --kill-after=10 "${LIMIT[$name]}" "$@" > "$OUT/$name.log" 2>&1
  code=$?
  local secs=$(( $(date +%s) - t0 )) status=pass
  if [ "$code" = 124 ] || [ "$code" = 137 ]; then status="TIMEOUT"; elif [ "$code" != 0 ]; then status="FAIL"; fi
  tail -n 15 "$OUT/$name.log"
  echo "=== [$name] $status (exit $code, ${secs} s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$code" "$secs" "$title" >> "$SUMMARY_TSV"
}

SETUP_LOG="$OUT/setup.log"
echo "=== [setup] nvidia-smi, installing what is missing, versions (limit ${LIMIT[setup]} s)"
t0=$(date +%s); code=0
{ command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi || echo "nvidia-smi: not found (no GPU here)"; } \
  > "$SETUP_LOG" 2>&1
# ren's own needs that the GPU image lacks travel as wheels (bench/gpu_wheels.sh); installed only when missing
if ! "$PY" -c "import tinydb, pydantic, easy_vqa, tomli_w, typer, rich, filelock, psutil, pynvml" >> "$SETUP_LOG" 2>&1
then
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    echo "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/ into /tmp/site" >> "$SETUP_LOG"
    timeout "${LIMIT[setup]}" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$REPO"/.whl/*.whl >> "$SETUP_LOG" 2>&1 || code=$?
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "ren's imports are missing and there is no .whl/ (run bench/gpu_wheels.sh where pip can download)" \
      >> "$SETUP_LOG"; code=1
  fi
fi
timeout 60 "$PY" bench/gpu_wheels.py report >> "$SETUP_LOG" 2>&1 || code=$?
secs=$(( $(date +%s) - t0 )); status=pass; [ "$code" = 0 ] || status=FAIL
cat "$SETUP_LOG"
printf '%s\t%s\t%s\t%s\t%s\n' setup "$status" "$code" "$secs" "nvidia-smi, wheels, versions" >> "$SUMMARY_TSV"
echo "=== [setup] $status (exit $code, ${secs} s)"

if [ "$DRY" = 1 ]; then
  # tiny sizes on a CPU; bf16 where it stays quick (the step benchmarks), fp32 where a CPU's bf16 would take minutes
  step a "GPU tests: collected and skipped, then the CPU-capable ones on the CPU" bash -c "
    '$PY' -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider && \
    REN_GPU_TESTS_ON_CPU=1 '$PY' -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider"
  step b1 "one-tower vs ViltForQuestionAnswering (tiny, CPU, bf16)" "$PY" bench/one_tower_vs_vilt.py --quick \
    --device cpu --dtype bf16 --results "$SECTIONS" --json "$OUT/one_tower_vs_vilt.json"
  step b2 "two-tower vs the LxmertXLayer wiring (tiny, CPU, bf16)" "$PY" bench/two_tower_vs_lxmert.py --quick \
    --device cpu --dtype bf16 --results "$SECTIONS" --json "$OUT/two_tower_vs_lxmert.json"
  step c "freezing (easy-VQA pretraining, CPU, fp32)" "$PY" bench/freezing.py --quick --device cpu --dtype fp32 \
    --preset easyvqa_pretrain --results "$SECTIONS" --json "$OUT/freezing.json"
  step d "real runs: quickstart and paper two-tower (a few steps, CPU)" "$PY" bench/gpu_runs.py --dry-run \
    --results "$SECTIONS" --json "$OUT/gpu_runs.json" --log "$OUT/d_runs.log"
else
  step a "GPU tests (pytest -m gpu tests/gpu)" "$PY" -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml"
  step b1 "one-tower vs ViltForQuestionAnswering (ViLT-B/32, bf16)" "$PY" bench/one_tower_vs_vilt.py \
    --device cuda --dtype bf16 --repeats 7 --steps 5 --results "$SECTIONS" --json "$OUT/one_tower_vs_vilt.json"
  step b2 "two-tower vs the LxmertXLayer wiring (ViLT-B/32 towers, METER fusion, bf16)" "$PY" \
    bench/two_tower_vs_lxmert.py --device cuda --dtype bf16 --repeats 7 --steps 5 --results "$SECTIONS" \
    --json "$OUT/two_tower_vs_lxmert.json"
  step c "freezing on the GPU (paper two-tower, batch 256, bf16)" "$PY" bench/freezing.py --device cuda \
    --repeats 5 --steps 3 --results "$SECTIONS" --json "$OUT/freezing.json"
  step d "real runs: quickstart (>= 99% test) and paper two-tower (300 steps)" "$PY" bench/gpu_runs.py \
    --results "$SECTIONS" --json "$OUT/gpu_runs.json" --log "$OUT/d_runs.log"
fi

TOTAL=$(( $(date +%s) - START ))
"$PY" - "$OUT" "$TOTAL" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
out, total, dry = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, code, secs, title = line.split("\t", 4)
    steps.append({"step": name, "status": status, "exit_code": int(code), "seconds": int(secs), "title": title})
raw = {}
for name in ("one_tower_vs_vilt", "two_tower_vs_lxmert", "freezing", "gpu_runs"):
    path = out / f"{name}.json"
    if path.exists():
        raw[name] = json.loads(path.read_text())
passed = all(s["status"] == "pass" for s in steps)
(out / "summary.json").write_text(json.dumps({"passed": passed, "dry_run": dry, "total_seconds": total,
                                              "steps": steps, "results": raw}, indent=1, default=str))
lines = [f"# ren GPU check{' (dry run, CPU)' if dry else ''}: {'all passed' if passed else 'FAILED'} "
         f"in {total} s", "", "| step | status | exit | seconds | what |", "|---|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['exit_code']} | {s['seconds']} | {s['title']} |" for s in steps]
sections = out / "RESULTS.gpu.md"
lines += ["", "Logs: logs.txt (each step's in details.tar.gz). Raw figures: summary.json.", ""]
if sections.exists():
    lines += ["The benchmarks' sections (for bench/RESULTS.md: `python3 bench/_results.py merge "
              "OUT_DIR/RESULTS.gpu.md`):", "", sections.read_text()]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:len(steps) + 4]))
EOF
rm -rf "$SCRATCH"
# Few files, as a device tool brings back at most 8: the step logs, one after the other, in logs.txt, and every
# loose file (logs, raw JSON, the tests' XML) in details.tar.gz; results.md, summary.json, RESULTS.gpu.md stay.
for log in setup a b1 b2 c d d_runs; do
  [ -f "$OUT/$log.log" ] && { printf '\n===== %s.log =====\n' "$log"; cat "$OUT/$log.log"; }
done > "$OUT/logs.txt"
(cd "$OUT" && tar -czf details.tar.gz --ignore-failed-read ./*.log ./*.tsv ./*.xml one_tower_vs_vilt.json \
   two_tower_vs_lxmert.json freezing.json gpu_runs.json 2>/dev/null
 rm -f ./*.log ./*.xml one_tower_vs_vilt.json two_tower_vs_lxmert.json freezing.json gpu_runs.json)
if grep -qv $'\tpass\t' "$OUT/steps.tsv"; then rm -f "$OUT/steps.tsv"; exit 1; fi
rm -f "$OUT/steps.tsv"
exit 0
