"""Shared fixtures: every test gets its own empty store and runs offline."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

# Offline, with a hub cache (real layout) that holds the configs of the models the
# shipped GPU presets name. Set before anything imports huggingface_hub; a copy,
# because the hub library writes markers into its cache.
_HUB_CACHE = Path(tempfile.mkdtemp(prefix="ren-hf-cache-"))
shutil.copytree(REPO / "tests" / "fixtures" / "hf_cache", _HUB_CACHE, dirs_exist_ok=True)
os.environ["HF_HUB_CACHE"] = str(_HUB_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def ren_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated ``$REN_HOME`` so no test reads or writes a real store; a queue
    worker a test started there is stopped afterwards."""
    home = tmp_path / "ren_home"
    monkeypatch.setenv("REN_HOME", str(home))
    yield home
    if (home / "worker.lock").exists():
        from engine.jobs.worker import stop_worker
        from engine.store import Store

        stop_worker(Store(home))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded easy-VQA cache shared by every test that trains."""
    from engine.data.easyvqa import load_easy_vqa

    cache = tmp_path_factory.mktemp("easyvqa_cache")
    load_easy_vqa(cache)
    return cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are collected everywhere and skipped where CUDA is absent (CI); with
    ``REN_GPU_TESTS_ON_CPU=1`` (bench/gpu_check.sh --dry-run) those that can also run on a CPU do, so their
    own logic is checked before a GPU box runs them."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or os.environ.get("REN_GPU_TESTS_ON_CPU") == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one; docs/gpu.md)")
    for item in gpu:
        item.add_marker(skip)
