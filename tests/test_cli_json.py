"""`--json`: every command's document on a store built here, checked against its shipped schema and against
what the store holds; the schemas themselves; the exit codes (docs/cli-json.md)."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import tomllib
from jsonschema import Draft202012Validator

from engine.cli.jsonout import COMMANDS, SCHEMA_DIR, schema_file
from engine.jobs.worker import worker_info
from engine.store import Store
from tests.helpers.cli import json_document, ren, ren_json
from tests.helpers.paths import PRESETS, REPO
from tests.helpers.reports import FT, PLANS, PRE, record_finetune, record_pretrain

FIXTURE = REPO / "tests" / "fixtures" / "one_tower.toml"
STUDY = "json-demo"


# --- the schemas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SCHEMA_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_schema_is_a_draft_2020_12_schema_named_for_its_file(path: Path) -> None:
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    name = schema["properties"]["schema"]["const"]
    assert re.fullmatch(rf"ren\.{re.escape(path.stem)}/[1-9][0-9]*", name) and schema["title"] == name
    assert "schema" in schema["required"] and schema["additionalProperties"] is False


def _json_commands() -> set[str]:
    """Every command path of the real CLI that takes --json."""
    import typer

    from engine.cli import app

    found = set()

    def walk(command, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):  # a group (typer ships its own click)
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        elif any("--json" in param.opts for param in command.params):
            found.add(" ".join(path))

    walk(typer.main.get_command(app), ())
    return found


def test_every_json_command_has_a_schema_and_a_test() -> None:
    commands = _json_commands()
    assert {"runs", "show", "queue ls", "worker", "study status", "report", "eval task", "eval retrieval",
            "validate"} <= commands
    # "runs --mlflow" is `ren runs` with an option that prints a document of its own
    assert {name.split()[0] if name.startswith("worker") else name.split(" --")[0] for name in COMMANDS} == commands
    assert {schema_file(schema) for schema in COMMANDS.values()} == set(SCHEMA_DIR.glob("*.json"))
    tests = "\n".join(path.read_text() for path in (REPO / "tests").rglob("test_*.py"))
    untested = [schema for schema in COMMANDS.values() if f'"{schema}"' not in tests]
    assert not untested, f"no test checks a document of {untested}"


def test_the_schemas_ship_in_the_package() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in SCHEMA_DIR.glob("*.json"):
        shipped = path.relative_to(REPO / "engine" / "cli").as_posix()
        assert any(fnmatch.fnmatch(shipped, pattern) for pattern in data["engine.cli"]), shipped


# --- runs and show -------------------------------------------------------------------------------------------------


def _study_tag(variant: str, stage: str, file: Path, task: str | None = None) -> dict:
    return {"name": STUDY, "variant": variant, "seed": 0, "stage": stage, "task": task, "file": str(file)}


def _study(store: Store, tmp_path: Path):
    """A study of two variants, one seed, an easy-VQA finetune: variant none trained and scored, vision
    still planned. Returns (its file, the pretraining record, the finetune record)."""
    file = tmp_path / f"{STUDY}.toml"
    file.write_text(f'[study]\nname = "{STUDY}"\ndescription = "Freeze the vision tower or not."\n'
                    f'pretrain = "{PRE}"\nbaseline = "none"\nseeds = [0]\n\n'
                    '[variants]\nnone = {}\nvision = { "freeze.groups" = ["vision"] }\n\n'
                    f'[[finetune]]\nname = "easy-vqa"\npreset = "{FT}"\n')
    pre = record_pretrain(store, f"{STUDY}/none/s0", 0, PLANS["none", 0], study=_study_tag("none", "pretrain", file))
    ft = record_finetune(store, pre, 0, 0.8, study=_study_tag("none", "finetune", file, "easy-vqa"))
    return file, pre, ft


def test_runs_json_lists_the_stored_records_newest_first(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    _, pre, ft = _study(store, tmp_path)
    doc = ren_json("runs")
    assert doc["schema"] == "ren.runs/1"
    assert doc["store"] == str(ren_home) and doc["total"] == 2 and doc["unreadable"] == []
    assert [r["id"] for r in doc["runs"]] == [ft.id, pre.id]
    listed_ft, listed_pre = doc["runs"]
    assert listed_ft["final_scores"] == {"vqa_score": 0.8, "eval_samples": 600.0}
    assert listed_ft["best_scores"] == {"eval/vqa_score": 0.8} and listed_ft["init_from"] == f"run:{pre.id}"
    assert listed_ft["duration_s"] == 50.0 and listed_ft["started_at"] == ft.started_at
    assert listed_pre["train_s"] == PLANS["none", 0].wall_s and listed_pre["step"] == pre.step
    assert listed_pre["status"] == "finished" and listed_pre["stage"] == "pretrain"

    limited = ren_json("runs", "--limit", "1")
    assert [r["id"] for r in limited["runs"]] == [ft.id] and limited["total"] == 2


def test_runs_json_names_unreadable_records(ren_home: Path) -> None:
    store = Store(ren_home)
    good = store.create_run(name="good", stage="finetune", kind="one_tower", config={})
    index = json.loads(store.index_path.read_text())
    index["runs"]["99"] = {"id": "broken", "name": 3}
    store.index_path.write_text(json.dumps(index))
    doc = ren_json("runs")
    assert [r["id"] for r in doc["runs"]] == [good.id] and doc["total"] == 1
    (broken,) = doc["unreadable"]
    assert broken["id"] == "broken" and "field 'stage' is missing" in broken["reason"]


def test_show_json_gives_the_whole_record(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    _, pre, _ = _study(store, tmp_path)
    doc = ren_json("show", pre.id[:-1])  # a unique prefix, as `ren show` takes
    assert doc["schema"] == "ren.show/1"
    run = doc["run"]
    assert run["id"] == pre.id and run["config"] == pre.config and run["study"] == pre.study
    assert run["params"]["trainable"] == PLANS["none", 0].trainable and run["params"]["total"] == 1_000_000
    assert run["compute"]["pflops"] == 10.0 and run["compute"]["peak_memory_mb"] == 900.0
    assert run["duration_s"] == PLANS["none", 0].wall_s and run["ended_at"] - run["started_at"] == run["duration_s"]
    assert doc["run_dir"] == str(store.run_dir(pre.id))
    last = store.read_metrics(pre.id)[-1]
    assert doc["last_logged"]["step"] == 600 and doc["last_logged"]["loss"] == last["loss"]


def test_a_bad_run_id_with_json_prints_its_paragraph_on_stderr_and_exits_2() -> None:
    for args in (("show", "nope"), ("report", "nope"), ("worker", "stop"), ("study", "status", "no-such-study"),
                 ("eval", "task", "nope", "--device", "cpu")):
        result = ren(*args, "--json")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stdout == "" and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


# --- the queue and its worker --------------------------------------------------------------------------------------


def test_queue_ls_and_worker_status_json(ren_home: Path) -> None:
    assert ren("queue", "pause").returncode == 0  # nothing starts: the test reads the queue
    empty = ren_json("queue", "ls")
    assert empty["schema"] == "ren.queue-ls/1" and empty["paused"] and empty["queued"] == empty["running"] == []
    first = re.search(r"queued (\S+)", ren("queue", "add", str(FIXTURE), "--name", "first").stdout).group(1)
    second = re.search(r"queued (\S+)", ren("queue", "add", str(FIXTURE), "--name", "second", "--after", first,
                                            "--gpus", "1").stdout).group(1)
    doc = ren_json("queue", "ls")
    assert [(q["position"], q["id"], q["after"]) for q in doc["queued"]] == [(1, first, []), (2, second, [first])]
    assert doc["queued"][0]["waits"] == "the queue is paused" and f"waiting for {first}" in doc["queued"][1]["waits"]
    assert doc["queued"][0]["gpus"] == 1 and doc["queued"][0]["resume"] is False
    assert doc["queued"][0]["queued_at"] == Store(ren_home).get_run(first).queued_at
    info = worker_info(Store(ren_home))  # `ren queue add` started it
    assert info is not None and doc["worker"] == {"pid": info.pid, "host": info.host, "started_at": info.started}

    status = ren_json("worker", "status")
    assert status["schema"] == "ren.worker-status/1" and status["worker"]["pid"] == info.pid
    assert ren("worker", "stop").returncode == 0
    assert ren_json("worker", "status")["worker"] is None


# --- studies and reports -------------------------------------------------------------------------------------------


def test_study_status_json_has_a_row_per_planned_run(ren_home: Path, tmp_path: Path) -> None:
    file, pre, ft = _study(Store(ren_home), tmp_path)
    for ref in (str(file), STUDY):
        doc = ren_json("study", "status", ref)
        assert doc["schema"] == "ren.study-status/1"
        assert doc["study"] == {"name": STUDY, "file": str(file), "description": "Freeze the vision tower or not.",
                                "baseline": "none"}
        rows = {(r["variant"], r["stage"]): r for r in doc["runs"]}
        assert list(rows) == [("none", "pretrain"), ("none", "finetune"), ("vision", "pretrain"),
                              ("vision", "finetune")]
        assert rows["none", "pretrain"]["run_id"] == pre.id and rows["none", "pretrain"]["score"] is None
        assert rows["none", "finetune"]["run_id"] == ft.id and rows["none", "finetune"]["after"] == pre.id
        assert rows["none", "finetune"]["score"] == 0.8 and rows["none", "finetune"]["metric"] == "vqa_score"
        assert rows["vision", "pretrain"]["run_id"] is None and rows["vision", "pretrain"]["status"] == "planned"
        assert doc["counts"] == {"finished": 2, "planned": 2}


def test_report_json_gives_the_numbers_and_writes_the_files(ren_home: Path, tmp_path: Path) -> None:
    store = Store(ren_home)
    file, pre, ft = _study(store, tmp_path)
    other = record_pretrain(store, "other", 0, PLANS["vision", 0])
    result = ren("report", pre.id, other.id, "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    doc = json_document(result.stdout)
    assert doc["schema"] == "ren.report/1"
    assert [v["variant"] for v in doc["variants"]] == [pre.name, "other"] and doc["baseline"] == pre.name
    base, vision = doc["variants"]
    assert base["is_baseline"] and [r["id"] for r in base["pretrains"]] == [pre.id]
    assert [(r["id"], r["parent"], r["task"]) for r in base["finetunes"]] == [(ft.id, pre.id, "easy-vqa")]
    assert base["scores"]["easy-vqa"] == {"n": 1, "mean": 0.8, "std": None, "values": [0.8]}
    assert base["pflops"]["mean"] == 10.0 and vision["pflops"]["mean"] == 6.0
    assert vision["saved_pflops_pct"] == pytest.approx(40.0) and vision["trainable"] == PLANS["vision", 0].trainable
    assert vision["train_s"]["values"] == [PLANS["vision", 0].wall_s]
    assert doc["files"] and all(Path(f).is_file() for f in doc["files"])
    assert str(tmp_path / "out" / "report.md") in doc["files"]

    by_study = ren_json("report", str(file), "--out", str(tmp_path / "study"))
    assert by_study["name"] == STUDY and [v["variant"] for v in by_study["variants"]] == ["none", "vision"]
    assert by_study["variants"][0]["seed_scores"] == {"easy-vqa": [{"seed": 0, "score": 0.8}]}


# --- validate ------------------------------------------------------------------------------------------------------


def test_validate_json_names_its_schema() -> None:
    doc = ren_json("validate", str(PRESETS / "quickstart.toml"))
    assert doc["schema"] == "ren.validate/1"
    assert doc["params"]["total"] == sum(g["total"] for g in doc["params"]["groups"].values())
    assert doc["config"]["run"]["name"] == "quickstart"
