"""Security: presets and overrides are data, run names and ids stay inside the store, weights load
without unpickling, and the queue worker listens on no network port.

Every probe that could run code would create a marker file; each test asserts the marker never appears.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import time
from pathlib import Path

import pytest

from tests.helpers.cli import cli, cli_streams, ren
from tests.helpers.paths import REPO
from tests.helpers.presets import ONE_TOWER, TOKENIZER, preset

ENGINE = REPO / "engine"


class _Marker:
    """Unpickling this calls ``open(path, "w")``: code a malicious pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def malicious_pickle(path: Path, marker: Path) -> Path:
    """A pickle whose loading creates ``marker`` (protocol 2, as torch.save writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state": _Marker(marker)}, protocol=2))
    return path


def test_the_malicious_pickle_does_run_code_when_unpickled(tmp_path: Path) -> None:
    """Control: plain unpickling of the probe file creates the marker, so its absence below means something."""
    marker = tmp_path / "marker"
    pickle.loads(malicious_pickle(tmp_path / "x.pkl", marker).read_bytes())
    assert marker.exists()


def tree(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under ``root`` (relative), leaving out ``skip`` and what is under it."""
    out = set()
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        out.add(str(path.relative_to(root)))
    return out


# --- presets and overrides are data ----------------------------------------------------------------------------

CODE_LIKE = (
    "__import__('os').system('touch {marker}')",
    "$(touch {marker})",
    "`touch {marker}`",
    "{{{{ ''.__class__.__mro__ }}}}; open('{marker}', 'w')",
    "!!python/object/apply:os.system ['touch {marker}']",
)


@pytest.mark.parametrize("template", CODE_LIKE)
def test_code_like_values_are_kept_as_plain_strings(template: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """In the preset and through --set alike, a value that looks like code is stored verbatim; where a
    key reads it as a name (the tokenizer), it is refused as an unknown name."""
    marker = tmp_path / "marker"
    value = template.format(marker=marker)
    path = preset(tmp_path, f"[run]\nnotes = {json.dumps(value)}\ntags = [{json.dumps(value)}]\n")
    code, out, err = cli_streams(["validate", str(path), "--json", "--set", f"optim.schedule={value}"],
                                 monkeypatch, capsys)
    assert code == 2 and "optim.schedule" in err and "is not allowed" in err, err
    code, out, err = cli_streams(["validate", str(path), "--json", "--set", f"freeze.groups=[{json.dumps(value)}]"],
                                 monkeypatch, capsys)
    assert code == 2 and "matches no layer group" in err, err
    code, out, err = cli_streams(["validate", str(path), "--json", "--set", f"run.name={value[:80]}",
                                  "--set", f"run.notes={value}"], monkeypatch, capsys)
    assert code == 0, err
    config = json.loads(out)["config"]
    assert config["run"] == {**config["run"], "name": value[:80], "notes": value, "tags": [value]}
    code, _, err = cli_streams(["validate", str(path), "--set", "data.dataset=\"vqav2\"", "--set", "data.root=\"/x\"",
                                "--set", f"data.tokenizer={value}"], monkeypatch, capsys)
    assert code == 2 and f"Could not load the tokenizer {value!r} (data.tokenizer)" in " ".join(err.split()), err
    assert not marker.exists()


def test_extends_of_a_python_file_is_read_as_toml_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w')\n")
    child = tmp_path / "child.toml"
    child.write_text('extends = "evil.py"\n')
    code, err = cli(["validate", str(child)], monkeypatch, capsys)
    assert code == 2 and f"{evil} is not valid TOML" in " ".join(err.split())
    code, err = cli(["validate", str(ONE_TOWER), "--set", f"extends={evil}"], monkeypatch, capsys)
    assert code == 2 and "unknown key 'extends'" in err
    assert not marker.exists()


def test_a_model_directory_with_custom_code_is_not_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A local HF model whose config asks for its own Python code (auto_map): ren never trusts remote code."""
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    model.mkdir()
    code_line = f"open({str(marker)!r}, 'w')\n"
    (model / "configuration_evil.py").write_text(code_line + "from transformers import BertConfig as EvilConfig\n")
    (model / "modeling_evil.py").write_text(code_line + "from transformers import BertModel as EvilModel\n")
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil", "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
        "intermediate_size": 64, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                              "AutoModel": "modeling_evil.EvilModel"}}))
    path = tmp_path / "p.toml"
    path.write_text(f'[model]\nkind = "one_tower"\n[model.backbone]\nsource = "pretrained"\nname = "{model}"\n'
                    '[task]\nname = "vqa"\n')
    code, err = cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 2 and f"model.backbone.name = '{model}'" in " ".join(err.split()), err
    assert not marker.exists()


def _calls(tree_: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree_):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                name = func.id
            elif isinstance(func, ast.Attribute):  # obj.method(): "module.method" when obj is a plain name
                name = f"{func.value.id if isinstance(func.value, ast.Name) else '?'}.{func.attr}"
            else:
                name = "?"
            out.append((name, node))
    return out


def test_engine_has_no_code_execution_of_user_strings() -> None:
    """No eval/exec/compile/__import__/import_module, no pickle or yaml loading except the data-only
    unpickler, no torch.load without weights_only=True, no shell=True, no trust_remote_code=True."""
    found = []
    for path in sorted([*ENGINE.rglob("*.py"), *(REPO / "ren_tui").rglob("*.py")]):
        for name, node in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "compile", "__import__", "importlib.import_module", "import_module",
                        "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "marshal.loads"):
                found.append(where)
            if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                             and keywords["weights_only"].value is True):
                found.append(where)
            for flag in ("shell", "trust_remote_code", "allow_pickle"):
                if isinstance(keywords.get(flag), ast.Constant) and keywords[flag].value is True:
                    found.append(f"{where} {flag}=True")
    assert not found, found


# --- run names and ids stay in the store ------------------------------------------------------------------------

TRAVERSALS = ("../../escape", "/etc/passwd", "a/../../b", "..", ".", "runs/../..", "x" * 5000, "~root")


def _a_run(tmp_path: Path) -> str:
    from engine.config import load_preset
    from engine.runs import create_run
    from engine.store import Store

    return create_run(Store(), load_preset(ONE_TOWER), str(ONE_TOWER)).id


@pytest.mark.parametrize("command", [
    ["show", "{id}"], ["logs", "{id}"], ["queue", "cancel", "{id}"], ["queue", "retry", "{id}"],
    ["queue", "mv", "{id}", "1"], ["run", "--resume", "{id}"], ["eval", "task", "{id}"], ["report", "{id}", "{id}"],
])
def test_run_ids_cannot_reach_outside_the_store(command: list[str], tmp_path: Path, ren_home: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    existing = _a_run(tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("x")
    before, store_before = tree(tmp_path, skip=ren_home), tree(ren_home)
    for bad in (*TRAVERSALS, f"{existing}/..", f"../ren_home/runs/{existing}", "bad\x00id"):
        code, err = cli([part.format(id=bad) for part in command], monkeypatch, capsys)
        assert code == 2, (bad, err)
        assert "Traceback" not in err and "No run with id" in err, (bad, err)
    assert tree(tmp_path, skip=ren_home) == before
    assert tree(ren_home) - store_before <= {"index.lock"}


def test_init_from_run_cannot_name_a_path(tmp_path: Path, ren_home: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(tmp_path, skip=ren_home)
    for bad in ("../..", "../../escape", "/etc", f"{ren_home}/runs"):
        path = preset(tmp_path, f'[train]\ninit_from = "run:{bad}"\n', "init.toml")
        code, err = cli(["run", str(path)], monkeypatch, capsys)
        assert code == 2 and f"train.init_from = 'run:{bad}': No run with id" in " ".join(err.split()), err
    assert tree(tmp_path, skip=ren_home) == before | {"init.toml"}
    assert not list((ren_home / "runs").iterdir())


def test_run_names_are_data_and_ids_stay_in_the_store(tmp_path: Path, ren_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A name may hold any text (study runs are named ``study/variant/s0/task``); the run's id and
    directory are a slug of it, so no name reaches outside ``$REN_HOME/runs``. Training then stops at
    the (missing) data, before anything is written but the run's record."""
    path = preset(tmp_path, f'[data]\ndataset = "vqav2"\nroot = "{tmp_path / "none"}"\n{TOKENIZER}', "n.toml")
    before = tree(tmp_path, skip=ren_home)
    names = ("../../escape", "/etc/passwd", "a/../../b", "..", "nul\x00byte", "$(touch marker)")
    for name in names:
        code, err = cli(["run", str(path), "--name", name], monkeypatch, capsys)
        assert code == 2 and "does not exist" in err, err
    code, err = cli(["run", str(path), "--name", "x" * 81], monkeypatch, capsys)
    assert code == 2 and "run.name" in err and "at most 80 characters" in err
    assert tree(tmp_path, skip=ren_home) == before
    from engine.store import Store

    records = Store().list_runs()
    assert sorted(r.name for r in records) == sorted(names)
    dirs = sorted(p.name for p in (ren_home / "runs").iterdir())
    assert dirs == sorted(r.id for r in records)
    for run_dir in dirs:
        assert all(c.isalnum() or c == "-" for c in run_dir) and not run_dir.startswith("-"), run_dir


# --- checkpoints load without unpickling ------------------------------------------------------------------------

def test_init_from_a_pickle_is_refused_unloaded(tmp_path: Path, ren_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    for name in ("pytorch_model.bin", "model.pt", "model.pkl"):
        malicious_pickle(ckpt / name, marker)
    cases = {str(ckpt): f"{ckpt}/model.safetensors does not exist",
             str(ckpt / "model.pt"): f"{ckpt}/model.pt is not a readable safetensors file"}
    malicious_pickle(tmp_path / "disguised" / "model.safetensors", marker)
    cases[str(tmp_path / "disguised")] = f"{tmp_path}/disguised/model.safetensors is not a readable safetensors file"
    for source, expected in cases.items():
        path = preset(tmp_path, f'[train]\ninit_from = "{source}"\n', "ft.toml")
        code, err = cli(["run", str(path)], monkeypatch, capsys)
        assert code == 2 and expected in " ".join(err.split()), err
    assert not marker.exists()
    assert not list((ren_home / "runs").iterdir())


@pytest.mark.slow
def test_resume_from_a_checkpoint_holding_a_pickle_runs_no_code(tmp_path: Path, ren_home: Path, data_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A real checkpoint (1 pretraining step) whose optimizer and RNG state files are swapped for
    malicious pickles: resuming refuses them (weights-only unpickling) with a clear error."""
    marker = tmp_path / "marker"
    path = tmp_path / "pre.toml"
    path.write_text('[model]\nkind = "one_tower"\n[model.backbone]\nhidden_size = 32\nheads = 2\nlayers = 1\n'
                    f'patch_size = 16\nimage_size = 32\n[objectives.mlm]\n[data]\ncache_dir = "{data_cache}"\n'
                    "[train]\nmax_steps = 1\nbatch_size = 4\ncheckpoint_every = 1\ncpu_threads = 1\n")
    code, err = cli(["run", str(path)], monkeypatch, capsys)
    assert code == 0, err
    from engine.store import Store

    store = Store()
    (record,) = store.list_runs()
    step_dir = next((store.run_dir(record.id) / "checkpoints").glob("step_*"))
    for name in ("optimizer.bin", "random_states_0.pkl"):
        assert (step_dir / name).exists()
        malicious_pickle(step_dir / name, marker)
    store.update_run(record.id, status="failed")  # as a run killed after this checkpoint: a finished one is no resume
    code, err = cli(["run", "--resume", record.id], monkeypatch, capsys)
    assert code == 2, err
    message = " ".join(err.split())
    assert f"its checkpoint {step_dir} was refused: it names the Python object io.open" in message, message
    assert "weights-only unpickling refuses" in message and "\x1b" not in err
    assert not marker.exists()


# --- the worker listens on no port -------------------------------------------------------------------------------

def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _inet_sockets(pid: int) -> list[str]:
    """The process's inet sockets as ``"tcp 0.0.0.0:8080 state 0A"`` lines (its own network namespace's tables)."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        mine = _socket_inodes(pid)
        for line in lines:
            fields = line.split()
            if fields[9] in mine:
                found.append(f"{table} {fields[1]} state {fields[3]}")
    return found


@pytest.mark.slow
def test_the_socket_probe_sees_a_listening_port() -> None:
    """Control: the probe finds a port this process listens on."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = f"{server.getsockname()[1]:04X}"
        assert any(line.startswith("tcp ") and line.split()[1].endswith(f":{port}") and line.endswith("state 0A")
                   for line in _inet_sockets(os.getpid()))


def test_worker_opens_no_network_port(ren_home: Path) -> None:
    """The real detached worker (`ren worker start`), idle with the queue paused, and after a queue
    command woke it: it owns no inet socket at all, listening or not."""
    assert ren("queue", "pause").returncode == 0
    started = ren("worker", "start")
    assert started.returncode == 0, started.stderr
    from engine.jobs.worker import worker_info
    from engine.store import Store

    store = Store(ren_home)
    deadline = time.monotonic() + 60
    info = worker_info(store)
    while (info is None or not info.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
        info = worker_info(store)
    assert info is not None and info.pid, "the worker did not start"
    assert ren("queue", "config", "cpu_slots=1").returncode == 0
    time.sleep(1.0)
    assert Path(f"/proc/{info.pid}").exists()
    assert _inet_sockets(info.pid) == []
    cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\x00")
    assert b"engine.jobs.worker" in cmdline
    assert ren("worker", "stop").returncode == 0
