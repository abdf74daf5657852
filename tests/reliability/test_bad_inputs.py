"""Bad input through the `ren` entry point: each case exits 2 with one paragraph that names what was
wrong and where (the file, the key, the path), and never a traceback.

The cases run in-process through :func:`engine.cli.main` (the function the `ren` script calls), so 50 of
them take seconds; :func:`test_exit_codes_through_a_subprocess` runs a sample through a real `ren` process.
Fixtures are real files: TOML presets and study files, arrow files written as ViLT writes them, safetensors
checkpoints written by safetensors, and runs created through the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.arrow_fixtures import write_arrow_table, write_vqav2
from tests.helpers.cli import cli, ren
from tests.helpers.paths import PRESETS
from tests.helpers.presets import ONE_TOWER, TOKENIZER, preset, write_file


@dataclass(frozen=True)
class Case:
    """A bad input: ``setup`` builds its files under a temp directory and returns the `ren` arguments;
    every fragment (``{tmp}`` is that directory) must appear in the error message."""

    id: str
    setup: Callable[[Path], list[str]]
    fragments: tuple[str, ...]
    code: int = 2


def validate(body: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", str(preset(tmp, body)), *extra]


def two_tower(body: str) -> Callable[[Path], list[str]]:
    base = '[model]\nkind = "two_tower"\n[task]\nname = "vqa"\n'
    return lambda tmp: ["validate", str(write_file(tmp / "t.toml", base + body))]


def run(body: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["run", str(preset(tmp, body)), *extra]


def _raw(text: str | bytes) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", str(write_file(tmp / "raw.toml", text))]


def _hf_dir(tmp: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        write_file(tmp / "model" / name, text)
    (tmp / "model").mkdir(exist_ok=True)
    return str(tmp / "model")


def _pretrained(files: dict[str, str] | None, name: str | None = None) -> Callable[[Path], list[str]]:
    """A one-tower preset whose backbone is a pretrained model: a hub id or a local directory of ``files``."""

    def setup(tmp: Path) -> list[str]:
        where = name if files is None else _hf_dir(tmp, files)
        return ["validate", str(write_file(tmp / "hf.toml", '[model]\nkind = "one_tower"\n[model.backbone]\n'
                                  f'source = "pretrained"\nname = "{where}"\n[task]\nname = "vqa"\n'))]

    return setup


def _vqav2(make: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """A VQAv2 finetuning preset on the arrow directory ``tmp/arrows`` that ``make`` fills."""

    def setup(tmp: Path) -> list[str]:
        root = tmp / "arrows"
        make(root)
        return ["run", str(preset(tmp, f'[data]\ndataset = "vqav2"\nroot = "{root}"\n{TOKENIZER}'
                                       'train_split = "train"\neval_split = "val"\n'
                                       "[train]\nmax_steps = 1\nbatch_size = 2\n"))]

    return setup


def _empty_vqav2(root: Path) -> None:
    write_vqav2(root, "train", n=0)
    write_vqav2(root, "val", n=2)


def _corrupt_vqav2(root: Path) -> None:
    write_vqav2(root, "train", n=2, corrupt=(0, 1))
    write_vqav2(root, "val", n=2)


def _wrong_schema(root: Path) -> None:
    import pyarrow as pa

    write_arrow_table(root / "vqav2_train.arrow", pa.table({"image": pa.array([b"x"]), "caption": pa.array(["a"])}))
    write_vqav2(root, "val", n=2)


def _not_arrow(root: Path) -> None:
    write_file(root / "vqav2_train.arrow", b"PK\x03\x04 a zip file, not arrow")
    write_vqav2(root, "val", n=2)


def _ckpt_dir(tmp: Path, content: bytes) -> Path:
    return write_file(tmp / "ckpt" / "model.safetensors", content).parent


def _truncated_safetensors(tmp: Path) -> list[str]:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(tmp / "whole.safetensors"))
    whole = (tmp / "whole.safetensors").read_bytes()
    ckpt = _ckpt_dir(tmp, whole[: len(whole) // 2])
    return ["run", str(preset(tmp, f'[train]\ninit_from = "{ckpt}"\n'))]


def _garbage_safetensors(tmp: Path) -> list[str]:
    ckpt = _ckpt_dir(tmp, b"\x00" * 3)
    return ["run", str(preset(tmp, f'[train]\ninit_from = "{ckpt}"\n'))]


_TWO_TOWER_32 = ('[model]\nkind = "two_tower"\n[model.text]\nhidden_size = 32\nheads = 2\nlayers = 1\n'
                 "[model.vision]\nhidden_size = 32\nheads = 2\nlayers = 1\npatch_size = 16\nimage_size = 32\n"
                 '[model.fusion]\nhidden_size = 32\nlayers = 1\n[task]\nname = "vqa"\n')


def _init_from_run_of(other_preset: str) -> Callable[[Path], list[str]]:
    """init_from a finished run of the model ``other_preset`` describes, with that model's real weights."""

    def setup(tmp: Path) -> list[str]:
        from safetensors.torch import save_file

        from engine.config import load_preset
        from engine.models import build_model
        from engine.runs import create_run
        from engine.store import Store

        other = load_preset(write_file(tmp / "other.toml", other_preset))
        store = Store()
        record = create_run(store, other, str(tmp / "other.toml"))
        model = build_model(other, vocab_size=50, num_answers=13)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(store.run_dir(record.id) / "model.safetensors"))
        store.mark_ended(record.id, "finished")
        return ["run", str(preset(tmp, f'[train]\ninit_from = "run:{record.id}"\n'))]

    return setup


def _resume_running(tmp: Path) -> list[str]:
    import os
    import socket

    from engine.config import load_preset
    from engine.runs import create_run
    from engine.store import Store

    store = Store()
    record = create_run(store, load_preset(ONE_TOWER), str(ONE_TOWER))
    store.mark_running(record.id, pid=os.getpid(), host=socket.gethostname(), device="cpu")
    return ["run", "--resume", record.id]


def _extends_cycle(tmp: Path) -> list[str]:
    write_file(tmp / "a.toml", 'extends = "b.toml"\n')
    write_file(tmp / "b.toml", 'extends = "a.toml"\n')
    return ["validate", str(tmp / "a.toml")]


def _init_from_preset_cycle(tmp: Path) -> list[str]:
    preset(tmp, '[train]\ninit_from = "preset:b.toml"\n', "a.toml")
    preset(tmp, '[train]\ninit_from = "preset:a.toml"\n', "b.toml")
    return ["run", str(tmp / "a.toml")]


def _study(text: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["study", "run", str(write_file(tmp / "s.toml", text)), "--dry-run"]


_STUDY_HEAD = f'[study]\nname = "s"\npretrain = "{PRESETS / "studies" / "easyvqa_two_tower_pretrain_short.toml"}"\n'


def _store_is_file(tmp: Path) -> list[str]:
    return ["runs"]


CASES = [
    # --- the preset file ------------------------------------------------------------------------------------
    Case("toml-syntax", _raw("[train\nmax_steps = 3\n"), ("{tmp}/raw.toml is not valid TOML", "line 1")),
    Case("toml-duplicate-key", _raw("[train]\nmax_steps = 1\nmax_steps = 2\n"),
         ("{tmp}/raw.toml is not valid TOML", "Cannot overwrite a value", "line 3")),
    Case("toml-not-utf8", _raw(b'[run]\nname = "\xff\xfe"\n'), ("{tmp}/raw.toml is not UTF-8 text",)),
    Case("toml-binary", _raw(b"\x89PNG\r\n\x1a\n\x00\x00"), ("{tmp}/raw.toml",)),
    Case("preset-missing", lambda tmp: ["validate", str(tmp / "nope.toml")],
         ("Preset file not found: {tmp}/nope.toml",)),
    Case("preset-is-directory", lambda tmp: ["validate", str(tmp)], ("Preset path {tmp} is a directory",)),
    Case("preset-empty", _raw(""), ("{tmp}/raw.toml: invalid preset", "missing required key 'model'")),
    # --- unknown keys ---------------------------------------------------------------------------------------
    Case("unknown-section", validate("[trian]\nmax_steps = 3\n"), ("unknown key 'trian'", "did you mean 'train'?")),
    Case("unknown-key-typo", validate("[optim]\nlearning_rate = 0.1\n"), ("unknown key 'optim.learning_rate'",
                                                                          "valid keys in optim: lr")),
    Case("unknown-key-did-you-mean", validate("[train]\ncheckpoint_evry = 3\n"),
         ("unknown key 'train.checkpoint_evry'", "did you mean 'train.checkpoint_every'?")),
    Case("key-of-other-kind", validate("[model.fusion]\nlayers = 2\n"),
         ("unknown key 'model.fusion'", "does not apply to kind 'one_tower'", "two_tower")),
    # --- wrong types ----------------------------------------------------------------------------------------
    Case("type-str-for-int", validate('[train]\nmax_steps = "ten"\n'), ("train.max_steps = 'ten' has the wrong type",)),
    Case("type-float-for-int", validate("[train]\nbatch_size = 2.5\n"),
         ("train.batch_size = 2.5 has the wrong type", "got a number with a fractional part")),
    Case("type-scalar-for-pair", validate("[optim]\nbetas = 0.9\n"), ("optim.betas = 0.9 has the wrong type",)),
    Case("type-str-for-list", validate('[freeze]\ngroups = "vision"\n'), ("freeze.groups = 'vision'",)),
    Case("type-value-for-table", _raw('model = "one_tower"\n[task]\n'), ("model", "'one_tower'")),
    Case("bad-kind", validate('[model]\nkind = "three_tower"\n'),
         ("model: 'kind' must be one of 'one_tower', 'two_tower', 'dual_encoder'", "three_tower")),
    Case("bad-literal", validate('[task]\nname = "captioning"\n'), ("task.name = 'captioning' is not allowed",)),
    # --- out of range ---------------------------------------------------------------------------------------
    Case("range-negative-lr", validate("[optim]\nlr = -0.1\n"), ("optim.lr = -0.1 is out of range",
                                                                 "allowed range 0 to 10")),
    Case("range-zero-batch", validate("[train]\nbatch_size = 0\n"), ("train.batch_size = 0 is out of range",)),
    Case("range-huge-text", validate("[data]\nmax_text_len = 100000\n"),
         ("data.max_text_len = 100000 is out of range",)),
    Case("range-layers", validate("[model.backbone]\nlayers = 1000\n"),
         ("model.backbone.layers = 1000 is out of range",)),
    Case("range-dropout", validate("[model.backbone]\ndropout = 1.0\n"),
         ("model.backbone.dropout = 1.0 is out of range",)),
    # --- impossible architectures ---------------------------------------------------------------------------
    Case("fusion-width-vs-heads", two_tower("[model.fusion]\nhidden_size = 100\nheads = 3\n"),
         ("model.fusion", "hidden_size (100) must be divisible by heads (3)")),
    Case("image-vs-patch", validate("[model.backbone]\nimage_size = 100\npatch_size = 16\n"),
         ("model.backbone", "image_size (100) must be a multiple of patch_size (16)")),
    Case("vision-image-vs-patch", two_tower("[model.vision]\nimage_size = 50\npatch_size = 16\n"),
         ("model.vision", "image_size (50) must be a multiple of patch_size (16)")),
    Case("text-width-vs-heads", two_tower("[model.text]\nhidden_size = 130\nheads = 4\n"),
         ("model.text", "hidden_size (130) must be divisible by heads (4)")),
    Case("conv-stem-patch", validate('[model.backbone]\nmodality = "text"\nimage_embedding = "conv"\npatch_size = 12\n'
                                     "image_size = 48\n"),
         ("model.backbone", 'image_embedding = "conv" needs a power-of-two patch_size (got 12)')),
    Case("freeze-everything", validate('[freeze]\ngroups = ["nothing.here"]\n'),
         ("pattern 'nothing.here' matches no layer group",)),
    Case("pretrain-and-finetune", validate("[objectives.mlm]\n"), ("both are set",)),
    # --- models ---------------------------------------------------------------------------------------------
    Case("hub-id-offline", _pretrained(None, "no-such-org/no-such-model"),
         ("model.backbone.name = 'no-such-org/no-such-model'", "the Hugging Face hub cannot be reached")),
    Case("model-dir-missing", lambda tmp: _pretrained(None, str(tmp / "absent"))(tmp),
         ("model.backbone.name = '{tmp}/absent'", "the directory {tmp}/absent does not exist")),
    Case("model-dir-empty", _pretrained({}), ("model.backbone.name = '{tmp}/model'", "could not load a model from",
                                              "must hold a Hugging Face model")),
    Case("model-dir-bad-config", _pretrained({"config.json": "{not json"}),
         ("model.backbone.name = '{tmp}/model'", "{tmp}/model")),
    Case("model-dir-unknown-type", _pretrained({"config.json": json.dumps({"model_type": "no_such_arch"})}),
         ("model.backbone.name = '{tmp}/model'", "{tmp}/model")),
    Case("manual-size-on-pretrained", validate('[model.backbone]\nsource = "pretrained"\nname = "x/y"\nlayers = 2\n'),
         ("model.backbone: layers only applies when source = \"manual\"",)),
    # --- data -----------------------------------------------------------------------------------------------
    Case("data-root-missing",
         lambda tmp: ["run", str(preset(tmp, f'[data]\ndataset = "vqav2"\nroot = "{tmp}/no"\n{TOKENIZER}'))],
         ("{tmp}/no does not exist",)),
    Case("data-root-no-files", _vqav2(lambda root: root.mkdir()),
         ("No vqav2 arrow file for the split", "{tmp}/arrows")),
    Case("data-root-needed", validate(f'[data]\ndataset = "vqav2"\n{TOKENIZER}'), ("data", "needs 'root'")),
    Case("data-empty-arrow", _vqav2(_empty_vqav2),
         ("The 'train' split of the vqav2 data has no rows: {tmp}/arrows/vqav2_train.arrow holds none",)),
    Case("data-corrupt-images", _vqav2(_corrupt_vqav2), ("unreadable",)),
    Case("data-wrong-schema", _vqav2(_wrong_schema), ("{tmp}/arrows/vqav2_train.arrow is not a vqav2 arrow file",)),
    Case("data-not-arrow", _vqav2(_not_arrow), ("{tmp}/arrows/vqav2_train.arrow is not an Arrow IPC file",)),
    Case("data-hf-dir-missing", lambda tmp: ["run", str(preset(tmp, f'[data]\ndataset = "vqav2"\n{TOKENIZER}[data.hf]\n'
                                                                     f'path = "{tmp}/hfdata"\nformat = "disk"\n'))],
         ("{tmp}/hfdata",)),
    # --- checkpoints ----------------------------------------------------------------------------------------
    Case("init-from-missing-path", lambda tmp: ["run", str(preset(tmp, f'[train]\ninit_from = "{tmp}/none"\n'))],
         ("train.init_from = '{tmp}/none'", "does not exist")),
    Case("init-from-truncated", _truncated_safetensors, ("train.init_from", "{tmp}/ckpt/model.safetensors")),
    Case("init-from-garbage", _garbage_safetensors, ("train.init_from", "{tmp}/ckpt/model.safetensors")),
    Case("init-from-other-kind", _init_from_run_of(_TWO_TOWER_32),
         ("train.init_from = 'run:", "is another architecture", "model.kind 'two_tower' there, 'one_tower' here")),
    Case("init-from-other-size", _init_from_run_of(f'extends = "{ONE_TOWER}"\n[model.backbone]\nhidden_size = 32\n'),
         ("is another architecture", "model.backbone.hidden_size 32 there, 64 here")),
    Case("init-from-unknown-run", run('[train]\ninit_from = "run:nope"\n'),
         ("train.init_from = 'run:nope': No run with id 'nope'",)),
    Case("validate-init-from-unknown-run",
         lambda tmp: ["validate", str(preset(tmp, '[train]\ninit_from = "run:nope"\n'))],
         ("train.init_from = 'run:nope': No run with id 'nope'",)),
    Case("queue-add-init-from-missing",
         lambda tmp: ["queue", "add", str(preset(tmp, f'[train]\ninit_from = "{tmp}/none.safetensors"\n'))],
         ("train.init_from = '{tmp}/none.safetensors': {tmp}/none.safetensors does not exist",)),
    Case("init-from-preset-loop", _init_from_preset_cycle, ("start from each other in a loop",)),
    # --- the command line -----------------------------------------------------------------------------------
    Case("resume-unknown-run", lambda tmp: ["run", "--resume", "nope"], ("No run with id 'nope'",)),
    Case("resume-running-run", _resume_running, ("is still running", "stop it before continuing it")),
    Case("resume-with-preset", lambda tmp: ["run", str(ONE_TOWER), "--resume", "x"],
         ("--resume continues a stored run with its stored config",)),
    Case("run-without-preset", lambda tmp: ["run"], ("give a preset file",)),
    Case("gpus-zero", lambda tmp: ["run", str(ONE_TOWER), "--gpus", "0"],
         ("--gpus 0: a run needs at least one GPU",)),
    Case("unknown-option", lambda tmp: ["validate", str(ONE_TOWER), "--frobnicate"], ("No such option",)),
    Case("submit-without-backend", lambda tmp: ["submit", str(ONE_TOWER)], ("needs a backend: --slurm",)),
    Case("show-unknown-run", lambda tmp: ["show", "nope"], ("No run with id 'nope'",)),
    Case("logs-unknown-run", lambda tmp: ["logs", "nope"], ("No run with id 'nope'",)),
    Case("queue-mv-unknown", lambda tmp: ["queue", "mv", "nope", "1"], ("No run with id 'nope'",)),
    Case("queue-config-unknown", lambda tmp: ["queue", "config", "cpu_slotz=2"], ("cpu_slotz",)),
    Case("queue-config-bad-value", lambda tmp: ["queue", "config", "cpu_slots=many"], ("cpu_slots", "many")),
    # --- --set ----------------------------------------------------------------------------------------------
    Case("set-no-equals", validate("", "--set", "train.max_steps"), ("--set 'train.max_steps' is not of the form",)),
    Case("set-empty-segment", validate("", "--set", "train..lr=3"), ("is not a dotted key",)),
    Case("set-into-value", validate("", "--set", "train.max_steps.x=3"), ("train.max_steps is a value, not a table",)),
    Case("set-unknown-key", validate("", "--set", "train.max_stepz=3"), ("did you mean 'train.max_steps'?",)),
    Case("set-wrong-type", validate("", "--set", "train.batch_size=[1,2]"), ("train.batch_size = [1, 2]",)),
    # --- extends --------------------------------------------------------------------------------------------
    Case("extends-cycle", _extends_cycle, ("Presets extend each other in a loop", "{tmp}/a.toml", "{tmp}/b.toml")),
    Case("extends-self", lambda tmp: ["validate", str(write_file(tmp / "s.toml", 'extends = "s.toml"\n'))],
         ("in a loop", "{tmp}/s.toml")),
    Case("extends-missing", lambda tmp: ["validate", str(write_file(tmp / "m.toml", 'extends = "gone.toml"\n'))],
         ("{tmp}/m.toml: extends = 'gone.toml'", "{tmp}/gone.toml does not exist")),
    Case("extends-not-string", lambda tmp: ["validate", str(write_file(tmp / "m.toml", "extends = 3\n"))],
         ("{tmp}/m.toml: 'extends' must be a file name string",)),
    # --- study files ----------------------------------------------------------------------------------------
    Case("study-missing", lambda tmp: ["study", "run", str(tmp / "none.toml")], ("Study file not found",)),
    Case("study-bad-toml", _study("[study\n"), ("{tmp}/s.toml is not valid TOML",)),
    Case("study-unknown-key", _study(_STUDY_HEAD + 'seedz = [1]\n[variants]\na = {}\n'),
         ("{tmp}/s.toml: invalid study file", "seedz")),
    Case("study-bad-variant-key", _study(_STUDY_HEAD + '[variants]\na = { "train.max_stepz" = 3 }\n'),
         ("{tmp}/s.toml", "max_stepz")),
    Case("study-baseline-unknown", _study(_STUDY_HEAD.replace('"s"', '"s"\nbaseline = "nonne"')
                                          + "[variants]\nnone = {}\n"),
         ("study.baseline = 'nonne' is not a variant", "did you mean 'none'?")),
    Case("study-bad-name", _study(_STUDY_HEAD.replace('"s"', '"../../etc"') + "[variants]\na = {}\n"),
         ("{tmp}/s.toml: invalid study file", "study.name")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_naming_what_and_where(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = case.setup(tmp_path)
    code, err = cli(args, monkeypatch, capsys)
    message = " ".join(err.split())
    assert "Traceback" not in err, err
    assert code == case.code, err
    for fragment in case.fragments:
        assert " ".join(fragment.format(tmp=tmp_path).split()) in message, message


def test_store_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """REN_HOME naming a file, or a directory below a file: the message names the store path."""
    write_file(tmp_path / "store", "a file")
    for home in (tmp_path / "store", tmp_path / "store" / "below"):
        monkeypatch.setenv("REN_HOME", str(home))
        for args in (["runs"], ["run", str(ONE_TOWER)], ["queue", "ls"]):
            code, err = cli(args, monkeypatch, capsys)
            assert "Traceback" not in err, err
            assert code == 2, err
            assert f"Cannot create the store at {home}" in " ".join(err.split())


SUBPROCESS_SAMPLE = ("toml-syntax", "unknown-key-did-you-mean", "set-no-equals", "resume-unknown-run",
                     "unknown-option", "extends-cycle")


def test_exit_codes_through_a_subprocess(tmp_path: Path) -> None:
    """The same exit codes and messages from a real `ren` process as in-process."""
    by_id = {c.id: c for c in CASES}
    for name in SUBPROCESS_SAMPLE:
        case = by_id[name]
        where = tmp_path / name
        where.mkdir()
        result = ren(*case.setup(where))
        assert result.returncode == case.code, (name, result.stderr)
        assert "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        for fragment in case.fragments:
            assert " ".join(fragment.format(tmp=where).split()) in message, (name, message)
    write_file(tmp_path / "store", "a file")
    result = ren("runs", env={"REN_HOME": str(tmp_path / "store")})
    assert result.returncode == 2 and "Cannot create the store at" in result.stderr, result.stderr
