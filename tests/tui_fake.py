"""A fake engine for TUI tests: runs with canned metric streams, written into a real
store through its façade (as a trainer would), and replayed step by step; kept predictions
around real easy-VQA questions and pictures, as ``ren eval task --examples`` keeps them."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from engine.config import load_preset
from engine.predictions import Example, SplitPredictions, breakdown, category_of, keep_predictions
from engine.store import RunRecord, Store

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "presets"


def preset_config(name: str = "quickstart.toml", overrides: list[str] = ()) -> dict[str, Any]:
    """The resolved config of a shipped preset, as a run stores it."""
    return load_preset(PRESETS / name, list(overrides)).to_dict()


def canned_points(steps: int, *, seed: int = 0, every: int = 1, keys: tuple[str, ...] = ("loss",),
                  eval_every: int = 0, start: float = 1_700_000_000.0) -> list[dict[str, float]]:
    """A deterministic decaying loss curve (with noise and one spike at 60% of the run)
    per key, lr, samples_per_s, and eval/vqa_score every ``eval_every`` steps."""
    rng = random.Random(seed)
    points = []
    for step in range(every, steps + 1, every):
        point: dict[str, float] = {"step": step, "time": start + step * 0.5}
        for i, key in enumerate(keys):
            value = (2.0 + i) * math.exp(-step / (steps / 3)) + 0.1 + rng.uniform(-0.02, 0.02)
            if step == (int(steps * 0.6) // every) * every:
                value += 1.5  # a spike downsampling must keep
            point[key] = value
        point["lr"] = 1e-4 * min(1.0, step / max(steps / 10, 1))
        point["samples_per_s"] = 200.0 + rng.uniform(-5, 5)
        points.append(point)
        if eval_every and step % eval_every == 0:
            points.append({"step": step, "time": start + step * 0.5 + 0.1,
                           "eval/vqa_score": 1 - 0.9 * math.exp(-step / (steps / 4))})
    return points


def canned_run(store: Store, name: str, *, steps: int = 200, status: str = "finished", seed: int = 0,
               stage: str = "finetune", kind: str = "two_tower", tags: tuple[str, ...] = (),
               config: dict[str, Any] | None = None, keys: tuple[str, ...] = ("loss",), eval_every: int = 50,
               written: int | None = None) -> RunRecord:
    """A run with ``written`` (default: all) of its canned points in the store."""
    config = config or preset_config()
    record = store.create_run(name=name, stage=stage, kind=kind, config=config, tags=tags, max_steps=steps)
    points = canned_points(steps, seed=seed, keys=keys, eval_every=eval_every)
    replay = Replay(store, record.id, points)
    replay.advance(len(points) if written is None else written)
    scores = [p["eval/vqa_score"] for p in replay.points[:replay.done] if "eval/vqa_score" in p]
    fields: dict[str, Any] = {"status": status, "started_at": points[0]["time"]}
    if scores:
        fields.update(best_scores={"eval/vqa_score": max(scores)}, final_scores={"vqa_score": scores[-1]})
    if status != "running":
        fields["ended_at"] = points[min(replay.done, len(points)) - 1]["time"]
    fields["params"] = {"total": 1_000_000, "trainable": 600_000, "frozen": 400_000, "groups": {}}
    return store.update_run(record.id, **fields)


class Replay:
    """Writes a run's canned points into the store a few at a time, like a live trainer."""

    def __init__(self, store: Store, run_id: str, points: list[dict[str, float]]) -> None:
        self.store, self.run_id, self.points, self.done = store, run_id, points, 0

    def advance(self, n: int) -> None:
        chunk = self.points[self.done:self.done + n]
        if not chunk:
            return
        with self.store.metrics_writer(self.run_id) as writer:
            for point in chunk:
                values = {k: v for k, v in point.items() if k not in ("step", "time")}
                writer.log(int(point["step"]), **values)
        self.done += len(chunk)
        self.store.update_run(self.run_id, step=int(chunk[-1]["step"]))


# (easy-VQA test question, the model's answer, its confidence, why it was kept), in the order
# engine.predictions.pick_examples keeps them: the most confident errors, then a sample by position.
TEST_PICKS = [(0, "rectangle", 0.97, "confident error"), (41, "yes", 0.91, "confident error"),
              (11, "green", 0.74, "confident error"), (27, "yellow", 0.99, "sample"),
              (81, "red", 0.95, "sample"), (102, "triangle", 0.41, "sample")]
VAL_PICKS = [(44, "circle", 0.98, "sample"), (115, "triangle", 0.93, "sample")]


def easy_vqa_test() -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """easy-VQA's test questions, their answers, their images' ids, and each image's PNG file by id."""
    import easy_vqa

    questions, answers, images = easy_vqa.get_test_questions()
    return questions, answers, images, easy_vqa.get_test_image_paths()


def canned_predictions(store: Store, run_id: str, split: str, picks: list[tuple[int, str, float, str]], *,
                       samples: int) -> SplitPredictions:
    """Keep ``picks`` as run ``run_id``'s predictions on easy-VQA's ``split``, each example with its real picture
    (named by item, as ``ren eval task`` names them), and a score per question type over ``samples`` items of
    which every 64th is wrong (the split's score is their mean, as ``ren eval task`` keeps it)."""
    questions, answers, images, pictures = easy_vqa_test()
    examples, thumbnails = [], {}
    for i, answer, confidence, why in picks:
        name = f"{i}.png"
        examples.append(Example(i, questions[i], f"easy_vqa test image {images[i]}", name, answer, answers[i],
                                float(answer == answers[i]), confidence, category_of("easy_vqa", answers[i]), why))
        thumbnails[name] = Path(pictures[images[i]]).read_bytes()
    scores = [0.0 if n % 64 == 0 else 1.0 for n in range(samples)]
    predictions = SplitPredictions(run_id, "vqa", "easy_vqa", split, "vqa_score", sum(scores) / samples, samples,
                                   "question type",
                                   breakdown([category_of("easy_vqa", a) for a in answers[:samples]], scores),
                                   tuple(examples), 0.0)
    keep_predictions(store, run_id, predictions, thumbnails)
    return predictions
