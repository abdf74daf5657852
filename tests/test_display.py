"""Text shared by the CLI and the TUI."""

from __future__ import annotations

from engine.display import bucket_means, sparkline


def test_bucket_means_keep_order_and_average_runs() -> None:
    assert bucket_means([1.0, 2.0, 3.0], 5) == [1.0, 2.0, 3.0]
    assert bucket_means([float(v) for v in range(10)], 4) == [0.5, 3.0, 6.0, 8.5]
    assert len(bucket_means([1.0] * 1001, 24)) == 24


def test_a_bucket_holding_a_non_finite_loss_is_a_gap_in_the_trace() -> None:
    """The record's loss trace goes to the index, which holds standard JSON: a bucket with a NaN or
    infinite loss is None there (not a mean that hides it), drawn as a blank in the sparkline."""
    nan, inf = float("nan"), float("inf")
    assert bucket_means([1.0, nan, 3.0], 5) == [1.0, None, 3.0]
    assert bucket_means([4.0, 2.0, 2.0, nan, inf, 1.0], 3) == [3.0, None, None]
    assert sparkline([3.0, None, 1.0]) == "█ ▁"
    assert sparkline([None, inf]) == "  "


def test_sparkline_scales_between_min_and_max() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▁▁"
    assert sparkline([1.0, float("nan"), 2.0]) == "▁ █"
    assert sparkline([]) == ""


def test_format_compute_summarises_the_compute_record(ren_home) -> None:
    from engine.display import format_compute
    from engine.store import Store

    store = Store(ren_home)
    record = store.create_run(name="r", stage="pretrain", kind="two_tower", config={}, max_steps=10)
    assert format_compute(record) == ""
    record = store.update_run(record.id, params={"total": 1_560_000, "trainable": 1_190_000},
                              compute={"flops_per_sample": {"train": 2.95e8}, "achieved_flops": 3.24e10,
                                       "utilisation": 0.31, "pflops": 0.0123, "device_hours": 0.25,
                                       "peak_memory_mb": 1536.0})
    assert format_compute(record) == ("1.19M/1.56M params trained · 295 MFLOP/sample · 32.4 GFLOP/s (31% of peak) · "
                                      "0.0123 PFLOPs · 0.25 device-h · peak 1.50 GB")


def test_scores_are_named_by_the_split_they_were_measured_on(ren_home) -> None:
    from engine.cli.commands import console, show
    from engine.display import format_run_scores
    from engine.store import Store

    store = Store(ren_home)
    new = store.create_run(name="new", stage="finetune", kind="one_tower", config={"data": {"eval_split": "val"}})
    new = store.update_run(new.id, best_scores={"eval/vqa_score": 0.9}, final_scores={"vqa_score": 0.8},
                           eval_split="val", test_scores={"test/vqa_score": 0.7})
    assert format_run_scores(new, short=True) == "val/vqa 0.9000"
    assert format_run_scores(new) == "best val/vqa_score 0.9000   final val/vqa_score 0.8000   test/vqa_score 0.7000"
    # a record made before the split was kept: its config says where it evaluated
    old = store.create_run(name="old", stage="finetune", kind="one_tower", config={"data": {"eval_split": "test"}})
    old = store.update_run(old.id, best_scores={"eval/vqa_score": 0.9},
                           final_scores={"vqa_score": 0.8, "vqav2/rest_val/vqa_score": 0.6})
    assert old.eval_split is None and not old.test_scores
    assert format_run_scores(old) == ("best test/vqa_score 0.9000   final test/vqa_score 0.8000, "
                                      "vqav2/rest_val/vqa_score 0.6000")
    with console.capture() as captured:
        show(new.id)
    assert "best val/vqa_score 0.9000   final val/vqa_score 0.8000   test/vqa_score 0.7000" in captured.get()


def test_every_duration_prints_the_same_way():
    from engine.display import format_seconds

    assert [format_seconds(s) for s in (0.4, 42, 190, 7500)] == ["0s", "42s", "3m10s", "2h05m"]
    assert format_seconds(None) == "-" and format_seconds(None, "—") == "—"
