"""The GPU check's plumbing that runs anywhere: its arguments, and how its sections reach bench/RESULTS.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers.paths import REPO


def test_the_gpu_check_wants_an_output_folder_and_refuses_unknown_options(tmp_path: Path) -> None:
    for args in ([], ["--fast", str(tmp_path)], [str(tmp_path), str(tmp_path / "other")]):
        result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 2 and "usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before it wrote anything


def test_merging_the_gpu_sections_replaces_their_namesakes_and_keeps_the_rest(tmp_path: Path) -> None:
    from bench._results import merge_sections, write_section

    target, source = tmp_path / "RESULTS.md", tmp_path / "RESULTS.gpu.md"
    write_section("one_tower_vs_vilt", "1. CPU", "cpu figures", path=target)
    write_section("freezing_gpu", "old GPU", "old gpu figures", path=target)
    write_section("freezing_gpu", "GPU", "new gpu figures", path=source)
    write_section("gpu_runs", "runs", "run figures", path=source)
    before = target.read_text()

    assert merge_sections(source, target) == ["freezing_gpu", "gpu_runs"]
    text = target.read_text()
    assert "cpu figures" in text and "new gpu figures" in text and "run figures" in text
    assert "old gpu figures" not in text and text.count("<!-- bench:freezing_gpu -->") == 1
    assert text.index("<!-- bench:freezing_gpu -->") == before.index("<!-- bench:freezing_gpu -->")  # in place
    merge_sections(source, target)
    assert target.read_text() == text  # a second merge changes nothing
