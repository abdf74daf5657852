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
from engine.inspector import answer_line, flops_per_sample, model_summary
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
    assert answer["flops_per_sample"] == flops_per_sample(cfg, answer["params"])


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


def test_flops_per_sample_follows_the_documented_formula() -> None:
    """forward = sum 2 * P_g * T_g * passes; T_text = 16, T_image = (32 // 16)^2 + 1 = 5."""
    params = {"groups": {name: {"total": 100} for name in (
        "text.embeddings", "text.layers[0]", "vision.embeddings", "vision.layers[0]", "fusion.layers[0]",
        "pooler", "heads.task")}}
    finetune = flops_per_sample(config_from_dict(TINY), params)
    assert finetune["tokens"] == {"text": 16, "image": 5} and finetune["passes"] == 1
    assert finetune["groups"] == {"text.embeddings": 0, "text.layers[0]": 3200, "vision.embeddings": 1000,
                                  "vision.layers[0]": 1000, "fusion.layers[0]": 2100, "pooler": 200,
                                  "heads.task": 200}
    assert finetune["forward"] == 7700 and finetune["train"] == 3 * 7700
    raw = {**TINY, "objectives": {"mlm": {"mask_prob": 0.25}, "itm": {}}}
    del raw["task"]
    params["groups"]["heads.mlm"] = {"total": 100}
    pretrain = flops_per_sample(config_from_dict(raw), params)
    assert pretrain["passes"] == 2
    assert pretrain["groups"]["text.layers[0]"] == 6400  # two row blocks through the encoder
    assert pretrain["groups"]["heads.mlm"] == 800  # 2 * 100 * (0.25 * 16), once


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


def test_backend_validates_before_asking_the_inspector(ren_home: Path) -> None:
    class Refuses:
        def inspect(self, config: dict) -> dict:
            raise AssertionError("an invalid config reached the inspector")

    backend = Backend(Store(ren_home), start_worker=False)
    backend.inspector = Refuses()  # type: ignore[assignment]
    answer = backend.inspect(tiny(fusion={"heads": 5}))
    assert answer["ok"] is False and answer["key"] == "model.fusion"
    assert "must be divisible by heads (5)" in answer["error"]
