"""``--json``: one JSON document on stdout, named by the versioned schema it follows.

Every document opens with ``"schema": "ren.<name>/<version>"``; ``schemas/<name>.json`` beside this module
(shipped in the package) is its JSON Schema (draft 2020-12), and docs/cli-json.md says what each field
means and when a version is bumped. The document goes out through :func:`json.dumps`, never through rich,
which wraps long lines and colours what it prints. Whatever else a command says with ``--json`` (progress,
warnings) goes to stderr, so stdout parses as it is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.display import eval_split_of
from engine.store import RunRecord

SCHEMA_DIR = Path(__file__).with_name("schemas")

# The commands that take --json, and the schema of what each prints.
COMMANDS = {
    "validate": "ren.validate/1",
    "runs": "ren.runs/1",
    "runs --mlflow": "ren.lab-runs/1",
    "show": "ren.show/1",
    "queue ls": "ren.queue-ls/1",
    "worker status": "ren.worker-status/1",
    "study status": "ren.study-status/1",
    "report": "ren.report/1",
    "eval task": "ren.eval-task/1",
    "eval retrieval": "ren.eval-retrieval/1",
}


def schema_file(schema: str) -> Path:
    """The JSON Schema of documents named ``schema`` (``ren.runs/1`` -> ``schemas/runs.json``)."""
    return SCHEMA_DIR / f"{schema.removeprefix('ren.').split('/')[0]}.json"


def emit(command: str, data: Mapping[str, Any]) -> None:
    """Print ``data`` as the one JSON document of ``command``, its schema named first. Standard JSON only
    (no NaN or Infinity, which strict readers reject): the store holds finite numbers, so a non-finite one
    here is a bug, and raising says so rather than writing what jq cannot read."""
    sys.stdout.write(json.dumps({"schema": COMMANDS[command], **data}, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def run_summary(r: RunRecord) -> dict[str, Any]:
    """A run as ``ren runs --json`` lists it (``ren show --json`` gives more): numbers as numbers, times as
    Unix timestamps, durations in seconds, each score under its stored key."""
    return {
        "id": r.id,
        "name": r.name,
        "stage": r.stage,
        "kind": r.kind,
        "status": r.status,
        "step": r.step,
        "max_steps": r.max_steps,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "ended_at": r.ended_at,
        "duration_s": r.duration_s,
        "train_s": r.train_s,
        "eval_split": eval_split_of(r),
        "best_scores": r.best_scores,
        "final_scores": r.final_scores,
        "test_scores": r.test_scores,
        "tags": list(r.tags),
        "init_from": r.init_from,
        "error": r.error,
    }
