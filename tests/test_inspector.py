"""The model inspector: the helper process (``python -m engine.inspector``), its compute
estimate, the key of config errors, and the TUI's client (``ren_tui.inspector``)."""

from __future__ import annotations

import copy
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import config_from_dict
from engine.errors import ConfigError
from engine.inspector import answer_line, expected_max, flops_per_sample, model_summary, typical_text_len
from engine.store import Store
from ren_tui.backend import Backend
from ren_tui.inspector import Inspector

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {
        "kind": "two_tower",
        "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_positions": 16},
        "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "image_size": 32, "patch_size": 16},
        "fusion": {"hidden_size": 32, "layers": 1, "heads": 2},
    },
    "task": {"name": "vqa"},
    "data": {"max_text_len": 16},
}


def tiny(**patch: dict) -> dict:
    """TINY with some model tables patched."""
    raw = copy.deepcopy(TINY)
    for table, values in patch.items():
        raw["model"][table].update(values)
    return raw


# --- the helper process, through its JSON-lines protocol ------------------------------


@pytest.fixture(scope="module")
def helper() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "engine.inspector"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert _read(proc) == {"ready": True}
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0  # the end of stdin ends it


def _read(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "the helper did not answer"
    return json.loads(proc.stdout.readline())


def ask(proc: subprocess.Popen[str], line: str) -> dict:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return _read(proc)


def test_helper_reports_what_model_summary_reports(helper: subprocess.Popen[str]) -> None:
    answer = ask(helper, json.dumps({"id": 1, "config": TINY}))
    cfg = config_from_dict(TINY)
    assert answer["id"] == 1 and answer["ok"] is True
    assert answer["params"] == model_summary(cfg)
    assert answer["config"] == cfg.to_dict()
    assert answer["frozen_groups"] == []
    assert answer["flops_per_sample"] == flops_per_sample(cfg)


def test_helper_answers_an_invalid_config_with_its_key(helper: subprocess.Popen[str]) -> None:
    answer = ask(helper, json.dumps({"id": 2, "config": tiny(fusion={"layers": 0})}))
    assert answer["id"] == 2 and answer["ok"] is False
    assert answer["key"] == "model.fusion.layers"
    assert "model.fusion.layers = 0 is out of range" in answer["error"]
    frozen = ask(helper, json.dumps({"id": 3, "config": {**TINY, "freeze": {"groups": ["txt"]}}}))
    assert (frozen["ok"], frozen["key"]) == (False, "freeze.groups")


def test_helper_survives_garbage_and_keeps_answering(helper: subprocess.Popen[str]) -> None:
    garbage = ask(helper, "{this is not json")
    assert garbage["ok"] is False and garbage["id"] is None and "not a JSON line" in garbage["error"]
    assert ask(helper, "[1, 2]")["ok"] is False
    assert ask(helper, json.dumps({"id": 4}))["error"] == 'the request has no "config" object.'
    assert helper.poll() is None
    answer = ask(helper, json.dumps({"id": 5, "config": {**TINY, "freeze": {"groups": ["vision"]}}}))
    assert answer["ok"] is True and answer["id"] == 5
    vision = [name for name in answer["params"]["groups"] if name.startswith("vision.")]
    assert answer["frozen_groups"] == vision
    assert answer["params"]["frozen"] == sum(answer["params"]["groups"][n]["total"] for n in vision)


# --- in-process pieces --------------------------------------------------------------


def test_answer_line_turns_every_failure_into_an_answer() -> None:
    assert answer_line("   \n") is None
    assert answer_line('"a string"') == {
        "id": None, "ok": False, "key": None,
        "error": 'a request is a JSON object {"id": n, "config": {...}}, got str.'}
    bad_kind = answer_line(json.dumps({"id": 7, "config": {"model": {"kind": "three_tower"}, "task": {}}}))
    assert bad_kind is not None and (bad_kind["id"], bad_kind["key"]) == (7, "model.kind")


# The estimate against what training measures: engine.train counts its first step (and its first evaluation
# batch) with torch's flop counter (engine.compute.FlopMeter); the estimate must give the same figure before
# the run exists. Tiny easy-VQA configs (the data is embedded): a timm CNN, pretraining row blocks with
# every objective and hard ITM negatives, a one-tower model (whose last layer computes only the rows the
# heads read), a frozen tower.
ESTIMATE_CASES = {
    "finetune, timm CNN": {
        "model": {"kind": "two_tower", "text": {"hidden_size": 32, "layers": 2, "heads": 2, "max_positions": 32},
                  "vision": {"source": "random", "library": "timm", "name": "test_resnet", "image_size": 64},
                  "fusion": {"hidden_size": 64, "layers": 2, "heads": 2}},
        "task": {"name": "vqa", "loss": "ce"}, "data": {"max_text_len": 24}},
    "pretrain, every objective, hard negatives": {
        "model": {"kind": "two_tower", "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_positions": 32},
                  "vision": {"hidden_size": 32, "layers": 1, "heads": 2, "patch_size": 8, "image_size": 32},
                  "fusion": {"hidden_size": 32, "layers": 2, "heads": 2}},
        "objectives": {"mlm": {}, "itm": {"negatives": "hard"}, "itc": {}}, "data": {"max_text_len": 24}},
    "pretrain, one tower": {
        "model": {"kind": "one_tower", "backbone": {"hidden_size": 32, "layers": 2, "heads": 2, "patch_size": 8,
                                                    "image_size": 32}},
        "objectives": {"mlm": {"mask_prob": 0.3}, "itm": {}}, "data": {"max_text_len": 24}},
    "finetune, frozen vision tower": {
        "model": {"kind": "two_tower", "text": {"hidden_size": 32, "layers": 1, "heads": 2, "max_positions": 32},
                  "vision": {"hidden_size": 32, "layers": 2, "heads": 2, "patch_size": 8, "image_size": 32},
                  "fusion": {"hidden_size": 32, "layers": 1, "heads": 2}},
        "task": {"name": "vqa"}, "freeze": {"groups": ["vision"]}, "data": {"max_text_len": 24}},
}
ESTIMATE_TOLERANCE = 0.05
"""The estimate takes the expected padded text length of a batch; the first batch has its own."""


def measured_flops(raw: dict, cache: Path) -> tuple[dict[str, float], int]:
    """(FlopMeter's per-sample figures of the first training step and evaluation batch, as
    engine.train.train counts them, the first batch's padded text length)."""
    import torch
    from torch.utils.data import DataLoader

    from engine.compute import FlopMeter
    from engine.data.pipeline import build_data
    from engine.freeze import apply_freeze
    from engine.models import build_model
    from engine.train import EpochSampler, _finetune_step, _identity, _pretrain_step, evaluate

    cfg = config_from_dict({**raw, "train": {"batch_size": 16}})
    data = build_data(cfg, cache_dir=cache)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=data.vocab_size, num_answers=data.num_answers)
    apply_freeze(model, cfg.freeze)
    model.train()
    loader = DataLoader(data.train, batch_size=16, sampler=EpochSampler(len(data.train), 0), collate_fn=_identity)
    batch = next(iter(loader))
    meter = FlopMeter()
    with meter.count("forward", batch):
        loss, _ = (_pretrain_step if cfg.objectives else _finetune_step)(model, batch, cfg, data,
                                                                         torch.Generator().manual_seed(0))
    with meter.count("backward", batch):
        loss.backward()
    if cfg.task is not None:
        class OneProcess:  # what evaluate() asks of accelerate
            gather_for_metrics = staticmethod(lambda t: t)

        eval_loader = DataLoader(data.eval, batch_size=256, collate_fn=_identity)
        evaluate(model, eval_loader, OneProcess(), 256, cfg.task.name, flops=meter)
    return meter.per_sample(), int(batch["input_ids"].shape[1])


@pytest.mark.parametrize("case", list(ESTIMATE_CASES))
def test_the_estimate_is_what_training_measures(case: str, data_cache: Path) -> None:
    """The helper's compute per sample agrees with training's count of its first step within
    ESTIMATE_TOLERANCE (it was 20% above on the quickstart presets: a formula over parameter counts
    that took every text at data.max_text_len, ignored convolutions and counted the last layer whole)."""
    raw = {**ESTIMATE_CASES[case], "train": {"batch_size": 16}}
    answer = answer_line(json.dumps({"id": 1, "config": raw}))
    assert answer is not None and answer["ok"], answer
    estimate = answer["flops_per_sample"]
    measured, _ = measured_flops(raw, data_cache)
    assert estimate["train"] == pytest.approx(measured["train"], rel=ESTIMATE_TOLERANCE)
    assert estimate["forward"] == pytest.approx(measured["forward"], rel=ESTIMATE_TOLERANCE)
    if "eval" in measured:
        assert estimate["eval"] == pytest.approx(measured["eval"], rel=ESTIMATE_TOLERANCE)


def test_text_length_is_the_expected_longest_text_of_a_batch() -> None:
    assert expected_max([7] * 10, 64) == 7
    assert expected_max([1, 2], 1) == 1.5
    assert expected_max([2, 1], 2) == pytest.approx(1 * 0.25 + 2 * 0.75)  # both draws 1 only a quarter of the time
    assert expected_max([1] * 99 + [30], 256) == pytest.approx(1 + 29 * (1 - 0.99**256))


def test_data_that_cannot_be_read_gives_the_upper_bound_and_says_why() -> None:
    class Words:
        name_or_path = "words"

        def __len__(self) -> int:
            return 100

    cfg = config_from_dict({**TINY, "data": {"dataset": "vqav2", "root": "/no/such/dir", "max_text_len": 16}})
    length, source = typical_text_len(cfg, Words(), 8)
    assert length == 16 and source.startswith("at most data.max_text_len: the texts cannot be read here")


def test_a_count_that_fails_leaves_a_valid_config_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.inspector

    def fails(cfg: object) -> dict:
        raise RuntimeError("no fake kernel for this op")

    monkeypatch.setattr(engine.inspector, "flops_per_sample", fails)
    answer = answer_line(json.dumps({"id": 9, "config": TINY}))
    assert answer is not None and answer["ok"] and answer["params"]["total"] > 0
    assert answer["flops_per_sample"] == {} and answer["flops_error"] == "RuntimeError: no fake kernel for this op"


@pytest.mark.parametrize(("raw", "key"), [
    (tiny(fusion={"layers": 0}), "model.fusion.layers"),
    (tiny(text={"heads": 3}), "model.text"),
    ({**TINY, "model": {"kind": "four_tower"}}, "model.kind"),
    ({**TINY, "train": {"max_stepz": 3}}, "train.max_stepz"),
    ({**TINY, "objectives": {"mlm": {}}}, None),
])
def test_config_errors_name_their_key(raw: dict, key: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert caught.value.key == key


# --- the TUI's client -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Inspector]:
    inspector = Inspector(timeout=120)
    yield inspector
    inspector.close()


def test_client_answers_from_threads_and_restarts_a_dead_helper(client: Inspector) -> None:
    configs = [tiny(fusion={"layers": n}) for n in (1, 2, 3)]
    answers: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, client.inspect(configs[i])))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals = [answers[i]["params"]["total"] for i in range(3)]
    assert totals[2] - totals[1] == totals[1] - totals[0] > 0  # one more fusion layer each
    pid = client.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    again = client.inspect(tiny(fusion={"layers": 4}))
    assert again["ok"] is True and again["params"]["total"] - totals[2] == totals[1] - totals[0]
    assert client.pid not in (None, pid)


def test_client_reports_a_helper_that_cannot_start() -> None:
    broken = Inspector(command=[sys.executable, "-c", "print('no protocol here')"], timeout=30)
    assert "did not start" in (broken.start() or "")
    answer = broken.inspect(TINY)
    assert answer["ok"] is False and answer["key"] is None and "did not start" in answer["error"]
    assert not broken.ready


def test_closing_does_not_wait_for_a_helper_still_starting() -> None:
    """The app starts the helper when it opens; quitting while it still imports torch must not hang
    until the start-up timeout."""
    import time

    slow = Inspector(command=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=30)
    failed: list[str | None] = []
    starting = threading.Thread(target=lambda: failed.append(slow.start()))
    starting.start()
    deadline = time.monotonic() + 10
    while slow._proc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    slow.close()
    assert time.monotonic() - began < 5
    starting.join(5)
    assert not starting.is_alive() and "did not start" in (failed[0] or "") and not slow.ready


def test_backend_validates_before_asking_the_inspector(ren_home: Path) -> None:
    class Refuses:
        def inspect(self, config: dict) -> dict:
            raise AssertionError("an invalid config reached the inspector")

    backend = Backend(Store(ren_home), start_worker=False)
    backend.inspector = Refuses()  # type: ignore[assignment]
    answer = backend.inspect(tiny(fusion={"heads": 5}))
    assert answer["ok"] is False and answer["key"] == "model.fusion"
    assert "must be divisible by heads (5)" in answer["error"]
