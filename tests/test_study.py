"""Studies: the file, its expansion into runs, queuing with dependencies, re-runs, the CLI,
and one study trained end to end by the real queue worker."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from engine.config import config_from_dict, load_preset
from engine.errors import ConfigError
from engine.inspector import _as_random
from engine.jobs.worker import worker_info
from engine.store import Store
from engine.study import load_study, models_to_build, plan_study, run_study, study_runs, study_table
from tests.helpers.cli import HEAVY, modules_after, ren
from tests.helpers.paths import PRESETS

STUDIES = sorted(p for p in (PRESETS / "studies").glob("*.toml") if p.read_text().lstrip().startswith("#")
                 and "\n[study]\n" in p.read_text())

MODEL = """
[model]
kind = "one_tower"
[model.backbone]
source = "manual"
modality = "vision"
hidden_size = 32
layers = 2
heads = 2
patch_size = 16
image_size = 32
"""


def _presets(root: Path, cache: Path | None = None) -> None:
    data = f'[data]\ncache_dir = "{cache}"\neval_max_samples = 16\n' if cache else ""
    train = "max_steps = 2\nbatch_size = 4\nlog_every = 1\neval_every = 100000\ncheckpoint_every = 100000\n" \
            "cpu_threads = 1\n"
    (root / "pre.toml").write_text('[run]\nname = "pre"\ntags = ["small"]\n[objectives.mlm]\n[objectives.itm]\n'
                                   + MODEL + data + "[train]\n" + train)
    (root / "ft.toml").write_text('[run]\nname = "ft"\n[task]\nname = "vqa"\nloss = "ce"\n' + MODEL + data
                                  + '[train]\ninit_from = "preset:pre.toml"\n' + train)


STUDY = """\
[study]
name = "tiny"
description = "two variants of a tiny one-tower"
pretrain = "pre.toml"
baseline = "none"
seeds = [0, 1]

[variants]
none = {}
frozen = { "freeze.groups" = ["backbone.layers[0]"] }
deeper = { "model.backbone.layers" = 3, "optim.lr" = 3e-4 }

[[finetune]]
name = "vqa"
preset = "ft.toml"
"""


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    _presets(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(STUDY)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the file ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message", "key"),
    [
        ("seeds = [0, 1]", "seed = [0, 1]", "unknown key 'study.seed' — did you mean 'study.seeds'?", "study.seed"),
        ('baseline = "none"', 'baseline = "nonee"', "study.baseline = 'nonee' is not a variant — did you mean "
         "'none'? The variants are: none, frozen, deeper.", "study.baseline"),
        ('"freeze.groups"', '"freeze.grups"', "variant 'frozen' (pre.toml with the variant's overrides): invalid "
         "preset. unknown key 'freeze.grups' — did you mean 'freeze.groups'?", "freeze.grups"),
        ('"optim.lr" = 3e-4', '"optim.lr" = -1', "variant 'deeper' (pre.toml with the variant's overrides): invalid "
         "preset. optim.lr = -1 is out of range", "optim.lr"),
        ("deeper = {", 'deeper = { "run.seed" = 3, ', "variant 'deeper': run.seed is set by [study] seeds; remove it.",
         "run.seed"),
        ("deeper = {", 'deeper = { "train.init_from" = "preset:pre.toml", ', "variant 'deeper': train.init_from = "
         "'preset:pre.toml'; a study's pretraining may start from a run", "train.init_from"),
        ('preset = "ft.toml"', 'preset = "ft.toml"\nset = { "train.init_from" = "run:x" }', "[[finetune]] 'vqa' "
         "set: train.init_from is set by the study (each finetune starts from its pretraining run)", "train.init_from"),
        ("none = {}", "none = 3", "variants.none = 3 must be a table of preset overrides", "variants.none"),
        ("none = {}", '"no ne" = {}', "variants.no ne: names may use letters, digits", None),
        ('pretrain = "pre.toml"', 'pretrain = "nope.toml"', "[study] pretrain = 'nope.toml', but", "study.pretrain"),
        ('pretrain = "pre.toml"', 'pretrain = "ft.toml"', "is a finetuning preset ([task])", "study.pretrain"),
        ("seeds = [0, 1]", "seeds = [0, 0]", "seeds lists a seed twice", "study.seeds"),
        ('name = "vqa"', 'name = "vqa"\ninherit = ["data.root"]', "inherit names 'data.root', which the "
         "pretraining config of variant 'none' does not set", "data.root"),
        ('name = "vqa"', 'nmae = "vqa"', "missing required key '[[finetune]] #1.name'", "finetune.0.name"),
        ("[variants]", "[axes.a]\nx = {}\n[variants]", "either as [variants] (one axis of named overrides) or as "
         "[axes.<name>] tables (a grid); both are set", None),
        ('name = "tiny"', 'name = "ti ny"', "study.name = 'ti ny': names may use letters, digits", "study.name"),
        ('name = "vqa"', 'name = "vqa"\nqqqqqq = 1', "unknown key '[[finetune]] #1.qqqqqq'; valid keys in "
         "[[finetune]] #1: name, preset, set, inherit.", "finetune.0.qqqqqq"),
        ('name = "vqa"', 'name = "vqa"\ninherit = [3]', "[[finetune]] #1.inherit[0] = 3 has the wrong type",
         "finetune.0.inherit.0"),
        ("[variants]", "[axes.a]\nnone = 3\n[variants]", "axes.a.none = 3 must be a table of preset overrides",
         "axes.a.none"),
    ],
)
def test_bad_study_files_name_the_key(study_file: Path, old: str, new: str, message: str, key: str | None) -> None:
    assert old in STUDY
    _write(study_file, STUDY.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_study(study_file)
    assert message in " ".join(str(info.value).split())
    if key is not None:
        assert info.value.key == key


def test_a_bad_variant_fails_the_whole_study_and_queues_nothing(study_file: Path, ren_home: Path) -> None:
    _write(study_file, STUDY.replace('"optim.lr" = 3e-4', '"optim.lr" = "fast"'))
    store = Store(ren_home)
    with pytest.raises(ConfigError, match=r"(?s)variant 'deeper'.*optim.lr = 'fast' has the wrong type"):
        run_study(store, study_file, start_worker=False)
    assert store.list_runs() == []


def test_expansion_plans_every_variant_seed_and_finetune(study_file: Path) -> None:
    study = load_study(study_file)
    assert study.path == study_file.resolve() and study.pretrain == (study_file.parent / "pre.toml").resolve()
    planned = study.expand()
    assert len(planned) == 3 * 2 * 2
    assert [p.name for p in planned[:4]] == ["tiny/none/s0", "tiny/none/s0/vqa", "tiny/none/s1", "tiny/none/s1/vqa"]
    by_name = {p.name: p for p in planned}
    deeper, deeper_ft = by_name["tiny/deeper/s1"], by_name["tiny/deeper/s1/vqa"]
    assert deeper.config.run.seed == 1 and deeper.config.run.name == "tiny/deeper/s1"
    assert deeper.config.model.backbone.layers == 3 and deeper.config.optim.lr == 3e-4
    assert deeper.overrides == {"model.backbone.layers": 3, "optim.lr": 3e-4}
    assert deeper.config.run.tags == ("small", "tiny")  # the preset's, and the study's name
    assert by_name["tiny/frozen/s0"].config.freeze.groups == ("backbone.layers[0]",)
    # The finetune trains the pretrained architecture (inherit = ["model"]), unfrozen, with the preset's lr.
    assert deeper_ft.config.model.backbone.layers == 3 and deeper_ft.config.optim.lr != 3e-4
    assert by_name["tiny/frozen/s0/vqa"].config.freeze.groups == ()
    assert deeper_ft.stage == "finetune" and deeper_ft.task == "vqa" and deeper_ft.config.run.seed == 1
    assert deeper_ft.pretrain_key == deeper.key and deeper_ft.metric == "vqa_score"
    assert deeper_ft.config.train.init_from is None  # the ft preset's "preset:pre.toml" is replaced
    assert deeper_ft.resolved("abc").train.init_from == "run:abc"


def test_axes_expand_into_a_grid(study_file: Path) -> None:
    grid = STUDY.replace(
        'baseline = "none"', 'baseline = "freeze=none,lr=low"').replace(
        '[variants]\nnone = {}\nfrozen = { "freeze.groups" = ["backbone.layers[0]"] }\n'
        'deeper = { "model.backbone.layers" = 3, "optim.lr" = 3e-4 }\n',
        '[axes.freeze]\nnone = {}\nfirst = { "freeze.groups" = ["backbone.layers[0]"] }\n'
        '[axes.lr]\nlow = { optim = { lr = 1e-4 } }\nhigh = { "optim.lr" = 1e-3 }\n')
    study = load_study(_write(study_file, grid))
    assert list(study.variants) == ["freeze=none,lr=low", "freeze=none,lr=high", "freeze=first,lr=low",
                                    "freeze=first,lr=high"]
    cfg = {p.variant: p.config for p in study.expand() if p.stage == "pretrain" and p.seed == 0}
    assert cfg["freeze=first,lr=high"].optim.lr == 1e-3 and cfg["freeze=first,lr=high"].freeze.groups
    assert cfg["freeze=none,lr=low"].optim.lr == 1e-4 and not cfg["freeze=none,lr=low"].freeze.groups
    clash = grid.replace('high = { "optim.lr" = 1e-3 }', 'high = { "freeze.groups" = [] }')
    with pytest.raises(ConfigError, match=r"axes.freeze.first and axes.lr.high both set freeze.groups"):
        load_study(_write(study_file, clash))


def test_the_electra_variant_is_the_shipped_electra_preset() -> None:
    study = load_study(PRESETS / "studies" / "base-model-paper.toml")
    electra = next(p for p in study.expand() if p.variant == "start=electra,embeddings=fresh" and p.stage == "pretrain")
    raw, shipped = electra.config.to_dict(), load_preset(PRESETS / "coco_vg_one_tower_electra_pretrain.toml").to_dict()
    raw.pop("run"), shipped.pop("run")
    assert raw == shipped
    random = next(p for p in study.expand()
                  if p.variant == "start=random-electra,embeddings=fresh" and p.stage == "finetune")
    assert random.config.model.backbone.source == "random" and random.config.model.kind == "one_tower"
    assert random.config.data.tokenizer == "google/electra-small-discriminator"  # inherited
    assert random.config.data.dataset in ("vqav2", "nlvr2", "snli_ve")


def test_metric_names_follow_the_tasks() -> None:
    from engine.study import _TASK_METRIC
    from engine.tasks import METRICS

    assert _TASK_METRIC == METRICS


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_shipped_study_loads_expands_and_builds(path: Path) -> None:
    """Every planned config validates and its model builds (meta device; hub towers from the
    fixture cache's configs, as the preset test does), with something left to train."""
    import torch

    from engine.data.pipeline import build_tokenizer, num_answers
    from engine.freeze import apply_freeze
    from engine.models import build_model

    study = load_study(path)
    planned = study.expand()
    assert len(planned) == len(study.variants) * len(study.seeds) * (1 + len(study.finetunes))
    assert study.baseline in study.variants and study.finetunes
    built: dict[str, int] = {}
    for p in planned:
        cfg = p.resolved("some-run")
        assert config_from_dict(cfg.to_dict()) == cfg
        key = repr({k: v for k, v in cfg.to_dict().items() if k in ("model", "freeze", "task", "objectives")})
        if key in built:
            continue
        tokenizer = build_tokenizer(cfg)
        with torch.device("meta"):
            model = build_model(_as_random(cfg), vocab_size=len(tokenizer), num_answers=num_answers(cfg))
        report = apply_freeze(model, cfg.freeze)
        assert 0 < report.trainable <= report.total
        built[key] = report.trainable
    distinct = set()
    for p in planned:
        if p.stage == "pretrain" and p.seed == study.seeds[0]:
            raw = p.config.to_dict()
            raw.pop("run")
            distinct.add(repr(raw))
    assert len(distinct) == len(study.variants)  # no two variants train the same thing


@pytest.mark.parametrize("name", ["base-model-easyvqa.toml", "base-model-paper.toml"])
def test_base_model_studies_follow_the_papers_protocol_and_ask_the_other(name: str) -> None:
    """The paper keeps only the encoder layers of each start (fresh embeddings: the baseline's and the
    presets' protocol); keeping the start's own embedding (ViLT's) is the second axis."""
    study = load_study(PRESETS / "studies" / name)
    protocol = {p.variant: p.config.model.backbone.embeddings for p in study.expand() if p.stage == "pretrain"}
    assert protocol[study.baseline] == "fresh"
    assert sorted(set(protocol.values())) == ["backbone", "fresh"]
    assert all(variant.split(",")[1] == f"embeddings={used}" for variant, used in protocol.items())
    assert load_preset(study.pretrain).model.backbone.embeddings == "fresh"


def test_shipped_study_files_open_with_a_how_to_run_comment() -> None:
    names = {p.name for p in STUDIES}
    assert {"freezing-easyvqa.toml", "freezing-paper.toml", "base-model-paper.toml"} <= names
    for path in (PRESETS / "studies").glob("*.toml"):
        assert path.read_text().startswith("#"), f"{path.name} should open with a comment saying how to run it"
        if path not in STUDIES:  # the studies' own presets validate alone too
            assert load_preset(path).run.name


def test_models_ren_builds_are_listed_for_building_before_the_runs(ren_home: Path) -> None:
    """`ren study run` builds these first, so no run's wall time includes a build; random-init towers
    read only the config and need none, and runs already kept need nothing."""
    store = Store(ren_home)
    freezing = load_study(PRESETS / "studies" / "freezing-easyvqa.toml")
    assert models_to_build(plan_study(store, freezing)) == ["ren:easyvqa-vit", "ren:easyvqa-bert"]
    base = load_study(PRESETS / "studies" / "base-model-easyvqa.toml")
    steps = plan_study(store, base)
    assert models_to_build(steps) == ["ren:easyvqa-vit", "ren:easyvqa-bert"]
    random_only = [s for s in steps if s.planned.variant.startswith("start=random,")]
    assert random_only and models_to_build(random_only) == []
    kept = [dataclasses.replace(s, action="keep") for s in steps]
    assert models_to_build(kept) == []
    out = ren("study", "run", str(freezing.path), "--dry-run", env={"COLUMNS": "250", "REN_HOME": str(ren_home)})
    assert out.returncode == 0, out.stderr
    assert "would first build ren:easyvqa-vit, ren:easyvqa-bert" in out.stdout
    assert not (ren_home / "models").exists()  # a dry run builds nothing


# --- queuing -----------------------------------------------------------------------------------------------------


def test_run_study_queues_pretraining_then_finetunes_that_wait_for_it(study_file: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    records = run_study(store, study_file, gpus=2, start_worker=False)
    assert worker_info(store) is None
    assert len(records) == 12 and all(r.status == "queued" and r.gpus == 2 for r in records)
    pre, ft = records[0], records[1]
    assert pre.name == "tiny/none/s0" and pre.stage == "pretrain" and pre.after == ()
    assert ft.name == "tiny/none/s0/vqa" and ft.after == (pre.id,)
    assert ft.config["train"]["init_from"] == f"run:{pre.id}" and ft.init_from == f"run:{pre.id}"
    stored = store.get_run(ft.id)
    assert stored.study == {"name": "tiny", "variant": "none", "seed": 0, "stage": "finetune", "task": "vqa",
                            "file": str(study_file.resolve())}
    assert "tiny" in stored.tags and store.get_run(pre.id).study["stage"] == "pretrain"
    assert [r.id for r in store.queued_runs()] == [r.id for r in records]
    assert [r.id for r in study_runs(store, "tiny")] == [r.id for r in records]
    assert (store.run_dir(ft.id) / "config.toml").exists()


def _checkpoint(store: Store, run_id: str) -> None:
    ckpt = store.run_dir(run_id) / "checkpoints"
    (ckpt / "step_00000001").mkdir(parents=True)
    (ckpt / "step_00000001" / "trainer_state.json").write_text('{"step": 1}')
    (ckpt / "latest").write_text("step_00000001")


def test_rerunning_keeps_existing_runs_and_requeues_failed_ones(study_file: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    first = run_study(store, study_file, start_worker=False)
    again = run_study(store, study_file, start_worker=False)
    assert [r.id for r in again] == [r.id for r in first] and len(store.list_runs()) == 12
    assert {s.action for s in plan_study(store, load_study(study_file))} == {"keep"}

    pre, ft, other_pre = first[0], first[1], first[2]
    store.mark_ended(pre.id, "failed", error="boom")
    store.mark_ended(ft.id, "cancelled", error="the run it waits for ended without finishing")
    store.mark_ended(other_pre.id, "failed", error="boom")
    _checkpoint(store, pre.id)
    actions = {s.planned.name: s.action for s in plan_study(store, load_study(study_file))}
    assert actions["tiny/none/s0"] == actions["tiny/none/s0/vqa"] == actions["tiny/none/s1"] == "retry"
    assert actions["tiny/frozen/s0"] == "keep"
    third = run_study(store, study_file, start_worker=False)
    assert [r.id for r in third] == [r.id for r in first] and len(store.list_runs()) == 12
    retried, retried_ft, fresh = (store.get_run(r.id) for r in (pre, ft, other_pre))
    assert retried.status == retried_ft.status == fresh.status == "queued"
    assert retried.resume and not fresh.resume  # no checkpoint: resuming would skip nothing but init weights
    assert not retried_ft.resume and retried_ft.after == (pre.id,)


def test_a_changed_study_queues_the_new_config_and_keeps_the_old_run(study_file: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    first = {r.name: r for r in run_study(store, study_file, start_worker=False)}
    store.mark_ended(first["tiny/deeper/s0"].id, "finished")
    _write(study_file, STUDY.replace('"optim.lr" = 3e-4', '"optim.lr" = 5e-4'))
    steps = {s.planned.name: s for s in plan_study(store, load_study(study_file))}
    assert steps["tiny/deeper/s0"].action == "changed" and steps["tiny/deeper/s0"].changes == ("optim.lr",)
    assert steps["tiny/deeper/s0/vqa"].action == "changed"  # its pretraining is a new run
    assert steps["tiny/none/s0"].action == steps["tiny/none/s0/vqa"].action == "keep"
    second = {r.name: r for r in run_study(store, study_file, start_worker=False)}
    assert len(store.list_runs()) == 12 + 4
    new_pre, new_ft = second["tiny/deeper/s0"], second["tiny/deeper/s0/vqa"]
    assert new_pre.id != first["tiny/deeper/s0"].id and new_pre.config["optim"]["lr"] == 5e-4
    assert new_ft.after == (new_pre.id,) and new_ft.init_from == f"run:{new_pre.id}"
    assert store.get_run(first["tiny/deeper/s0"].id).status == "finished"  # the old run is kept
    assert second["tiny/none/s0"].id == first["tiny/none/s0"].id
    rows = {(r.variant, r.seed, r.stage): r for r in study_table(store, load_study(study_file))}
    assert rows[("deeper", 0, "pretrain")].run_id == new_pre.id and rows[("deeper", 0, "pretrain")].current


def test_rows_by_name_come_from_the_stored_runs(study_file: Path, ren_home: Path) -> None:
    store = Store(ren_home)
    records = run_study(store, study_file, start_worker=False)
    store.update_run(records[1].id, final_scores={"vqa_score": 0.75, "eval_samples": 10.0})
    store.mark_ended(records[1].id, "finished")
    rows = study_table(store, "tiny")
    assert len(rows) == 12
    row = next(r for r in rows if r.run_id == records[1].id)
    assert (row.variant, row.seed, row.stage, row.task, row.status) == ("none", 0, "finetune", "vqa", "finished")
    assert row.metric == "vqa_score" and row.score == 0.75 and row.after == records[0].id
    planned = study_table(store, load_study(study_file))
    assert [r.to_dict() for r in planned] == [r.to_dict() for r in rows]


# --- the command line --------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_queues_nothing(study_file: Path, ren_home: Path) -> None:
    out = ren("study", "run", str(study_file), "--dry-run", env={"COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("tiny/none/s0", "tiny/frozen/s1/vqa", "tiny/deeper/s1"):
        assert name in text
    assert 'freeze.groups = ["backbone.layers[0]"]' in text and "model.backbone.layers = 3" in text
    assert "    model from the pretraining" in text and "tiny/deeper/s1/vqa  finetune ft.toml, after tiny/deeper/s1: " \
        "new run" in text
    assert "dry run: nothing queued" in text and "queue 12" in text
    assert not Store(ren_home).list_runs()


def test_study_run_and_status_on_the_command_line(study_file: Path, ren_home: Path) -> None:
    assert ren("queue", "pause").returncode == 0  # the worker starts nothing: this test reads the queue
    out = ren("study", "run", str(study_file), env={"COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    assert "queued 12 run(s), kept 0" in out.stdout
    store = Store(ren_home)
    pre = next(r for r in store.list_runs() if r.name == "tiny/none/s0")
    again = ren("study", "run", str(study_file), "--dry-run", env={"COLUMNS": "250"})
    assert f"keep {pre.id} (queued)" in again.stdout and "keep 12" in again.stdout
    for ref, columns in (("tiny", "250"), (str(study_file), "80")):  # a table when wide, else a line per run
        status = ren("study", "status", ref, env={"COLUMNS": columns})
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert "12 queued" in status.stdout and "study tiny" in status.stdout
        assert sum(line.split(" ")[0] == "none" for line in lines) == 1  # one group per variant
        assert f"waiting for {pre.id}" in status.stdout and "the queue is paused" in status.stdout
        pre_line = next(line for line in lines if pre.id in line and "waiting" not in line)
        assert "0/2" in pre_line and "queued" in pre_line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("study", "run", "nope.toml"), "Study file not found"),
        (("study", "status", "no-such-study"), "No study 'no-such-study' in the store"),
        (("study", "status", "studies/nope"), "Study file not found"),
        (("study", "run", "freezing-easyvqa.tom"), "Did you mean presets/studies/freezing-easyvqa.toml?"),
        (("study", "run", "STUDY", "--gpus", "0"), "at least one GPU"),
    ],
)
def test_bad_study_input_exits_2(args: tuple[str, ...], message: str, study_file: Path) -> None:
    result = ren(*(str(study_file) if a == "STUDY" else a for a in args))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_a_bad_study_file_exits_2_naming_the_variant(study_file: Path) -> None:
    _write(study_file, STUDY.replace('"freeze.groups"', '"freeze.grups"'))
    result = ren("study", "run", str(study_file))
    assert result.returncode == 2 and "variant 'frozen'" in result.stderr and "freeze.grups" in result.stderr
    assert "Traceback" not in result.stderr


def test_study_modules_import_no_torch() -> None:
    loaded = modules_after("import engine.study, engine.cli.study")
    assert "engine.study" in loaded and not loaded & set(HEAVY)


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_study_trains_end_to_end_under_the_worker(tmp_path: Path, ren_home: Path, data_cache: Path) -> None:
    _presets(tmp_path, data_cache)
    study_file = _write(tmp_path / "e2e.toml", STUDY.replace('name = "tiny"', 'name = "e2e"')
                        .replace("seeds = [0, 1]", "seeds = [0]")
                        .replace('deeper = { "model.backbone.layers" = 3, "optim.lr" = 3e-4 }\n', ""))
    store = Store(ren_home)
    records = run_study(store, study_file)  # starts a worker
    assert len(records) == 4
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        rows = study_table(store, load_study(study_file))
        if all(r.status in ("finished", "failed", "cancelled", "crashed") for r in rows):
            break
        time.sleep(0.5)
    assert [(r.variant, r.stage, r.status) for r in rows] == [
        ("none", "pretrain", "finished"), ("none", "finetune", "finished"),
        ("frozen", "pretrain", "finished"), ("frozen", "finetune", "finished")], [r.error for r in rows]
    for pre, ft in (rows[:2], rows[2:]):
        assert pre.step == pre.max_steps == 2 and pre.train_s > 0 and pre.score is None
        assert ft.after == pre.run_id and ft.metric == "vqa_score" and 0 <= ft.score <= 1
        assert store.get_run(ft.run_id).started_at >= store.get_run(pre.run_id).ended_at
    frozen = store.get_run(rows[2].run_id).params
    assert frozen["frozen"] > 0 and store.get_run(rows[0].run_id).params["frozen"] == 0
    assert {s.action for s in plan_study(store, load_study(study_file))} == {"keep"}
