"""The `ren` entry point as a user runs it: in a child process (waited for, or started and left running),
or in this process through :func:`engine.cli.main`; and the modules an import pulls in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

from tests.helpers.paths import REPO

REN = [sys.executable, "-c", "from engine.cli import main; main()"]
HEAVY = ("torch", "transformers", "timm", "accelerate")


def ren(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `ren` entry point in a subprocess (as a user would)."""
    return subprocess.run(
        [*REN, *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


def spawn_ren(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``ren ARGS`` as a user would, with its output captured (unbuffered)."""
    return subprocess.Popen([*REN, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def json_document(stdout: str) -> dict:
    """The one JSON document a ``--json`` command printed (stdout must hold nothing else), checked against
    the schema it names (engine/cli/schemas)."""
    from jsonschema import Draft202012Validator

    from engine.cli.jsonout import schema_file

    document = json.loads(stdout)
    Draft202012Validator(json.loads(schema_file(document["schema"]).read_text())).validate(document)
    return document


def ren_json(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    """``ren ARGS --json`` in a subprocess: it exits 0 and prints one document valid under its schema."""
    result = ren(*args, "--json", env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json_document(result.stdout)


def modules_after(code: str) -> set[str]:
    """The names in ``sys.modules`` after a fresh interpreter runs ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def cli_streams(args: list[str], monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``ren ARGS`` in this process through the real entry point: (exit code, stdout, stderr).
    An exception that escapes ``main`` is what a user would see as a traceback (exit 1)."""
    from engine.cli import main

    monkeypatch.setattr(sys, "argv", ["ren", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:  # noqa: BLE001 - an escaped exception is the failure being looked for
        out, err = capsys.readouterr()
        return 1, out, err + traceback.format_exc()
    out, err = capsys.readouterr()
    return code, out, err


def cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """:func:`cli_streams` without stdout."""
    code, _, err = cli_streams(args, monkeypatch, capsys)
    return code, err
