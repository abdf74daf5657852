"""The wheels a GPU box needs for ren, and a report of what it has (bench/gpu_wheels.sh, bench/gpu_check.sh).

    python3 bench/gpu_wheels.py download   # here, where pip reaches PyPI: into .whl/ (git-ignored)
    python3 bench/gpu_wheels.py report     # there: versions, the carried wheels' needs, ren's imports

The GPU machines (the device tool's KINDS.md) run Python 3.12 on manylinux x86_64 with PyTorch, transformers,
timm, accelerate, rich, typer, filelock, psutil, nvidia-ml-py, matplotlib, pyarrow, pandas, xxhash, aiohttp,
fsspec, huggingface-hub, pytest and pytest-timeout preinstalled, and no network. ``MISSING`` is what ren's
runtime (pyproject.toml's dependencies) needs beyond that, each with its own needs that are missing too, at the
versions the test suite last passed with (constraints.txt). ``download`` fetches them as wheels for that
platform, one version each, with ``--no-deps`` (the recipe of the device tool's README); the box installs them
with ``pip install --no-index --no-deps --target /tmp/site``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
# name in constraints.txt -> why it is carried
MISSING = {
    "tinydb": "ren's store",
    "pydantic": "ren's config",
    "pydantic_core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing_extensions": "pydantic needs >= 4.16 (the box's may be older; a newer one serves every other user)",
    "easy-vqa": "the quickstart's data set",
    "tomli_w": "ren run writes the run's config.toml",
    "textual": "ren-tui (not run on the box; carried so the whole runtime installs)",
    "mdit-py-plugins": "textual",
    "platformdirs": "textual",
    "linkify-it-py": "textual (markdown-it-py[linkify])",
    "datasets": "Hugging Face data sources (data.hf); not used by the check",
    "dill": "datasets",
    "multiprocess": "datasets",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]
BUDGET_MIB = 16  # well under the 64 MiB that travels with the working tree


def pinned() -> dict[str, str]:
    """constraints.txt's versions by normalised name."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^;\s]+)", line)
        if match:
            out[normalise(match.group(1))] = match.group(2)
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download() -> int:
    versions = pinned()
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name in MISSING:
        spec = f"{name}=={versions[normalise(name)]}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), spec]
        if subprocess.run(cmd).returncode != 0:
            print(f"could not download {spec}", file=sys.stderr)
            return 1
    files = sorted(WHEELS.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**10:9.0f} KiB  {f.name}")
    print(f"{len(files)} wheels, {total / 2**20:.2f} MiB in {WHEELS}")
    if total > BUDGET_MIB * 2**20:
        print(f"over the {BUDGET_MIB} MiB budget", file=sys.stderr)
        return 1
    return 0


def check_requirements(folder: Path = WHEELS) -> list[str]:
    """Each carried wheel's requirements (its METADATA's Requires-Dist, extras left out, markers evaluated
    here) that the installed distributions (the box's and the carried ones, as this interpreter sees them)
    do not meet; empty when all are met."""
    import zipfile
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    problems = []
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = version(req.name)
            except PackageNotFoundError:
                problems.append(f"{wheel.name}: needs {req}, not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{wheel.name}: needs {req}, {have} installed")
    return problems


def report() -> int:
    """Versions of what ren uses, the carried wheels' unmet needs, and whether ren imports (exit 1 if not)."""
    import importlib
    import platform

    print("python", platform.python_version(), sys.executable)
    import torch

    print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
              f"capability {p.major}.{p.minor}")
    for name in ("transformers", "timm", "accelerate", "tinydb", "pydantic", "easy_vqa", "tomli_w", "textual",
                 "datasets", "pyarrow", "pynvml", "pytest"):
        try:
            module = importlib.import_module(name)
            print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
        except ImportError as exc:
            print(name, "MISSING", exc)
    problems = check_requirements()
    print("\n".join(problems) if problems else "the carried wheels' requirements are met (or none are carried)")
    sys.path.insert(0, str(REPO))
    import engine.cli  # noqa: F401
    import engine.train  # noqa: F401

    print("ren imports: ok")
    return 0


if __name__ == "__main__":
    commands = {"download": download, "report": report}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} download|report")
    sys.exit(commands[sys.argv[1]]())
