"""Text shared by the CLI and the TUI."""

from __future__ import annotations

from engine.display import bucket_means, sparkline


def test_bucket_means_keep_order_and_average_runs() -> None:
    assert bucket_means([1.0, 2.0, 3.0], 5) == [1.0, 2.0, 3.0]
    assert bucket_means([float(v) for v in range(10)], 4) == [0.5, 3.0, 6.0, 8.5]
    assert len(bucket_means([1.0] * 1001, 24)) == 24


def test_sparkline_scales_between_min_and_max() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▁▁"
    assert sparkline([1.0, float("nan"), 2.0]) == "▁ █"
    assert sparkline([]) == ""
