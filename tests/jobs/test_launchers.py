"""Launch commands for several processes and machines, the SLURM script, and [distributed]."""

from __future__ import annotations

import importlib.util
import os
import shlex
import socket
import stat
import subprocess
from pathlib import Path

import pytest

import engine.jobs.launchers as distributed
from engine.config import DistributedConfig, RunConfig, config_from_dict, load_preset
from engine.errors import ConfigError, RenError
from engine.jobs.launchers import check_strategy_available, free_port, launch_command, sbatch_script
from tests.helpers.paths import PRESETS

QUICKSTART = PRESETS / "quickstart.toml"
PY = "/opt/py/bin/python"
BASE = [PY, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no"]


def _cfg(*overrides: str) -> RunConfig:
    return load_preset(QUICKSTART, list(overrides))


def _flag(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} should appear once in {cmd}"
    return cmd[cmd.index(flag) + 1]


@pytest.fixture
def deepspeed_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(distributed.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real(name, *a))


# --- [distributed] in presets ---------------------------------------------------


def test_distributed_section_parses_and_defaults_to_ddp() -> None:
    assert _cfg().distributed == DistributedConfig(strategy="ddp")
    cfg = _cfg('distributed.strategy="fsdp"', 'distributed.fsdp_sharding="shard_grad_op"',
               "distributed.fsdp_offload=true")
    assert (cfg.distributed.strategy, cfg.distributed.fsdp_sharding, cfg.distributed.fsdp_offload) == (
        "fsdp", "shard_grad_op", True)
    cfg = _cfg('distributed.strategy="deepspeed"', "distributed.zero_stage=3")
    assert (cfg.distributed.zero_stage, cfg.distributed.zero_offload) == (3, False)


@pytest.mark.parametrize(("overrides", "key", "needs"), [
    (["distributed.fsdp_offload=true"], "fsdp_offload", '"fsdp"'),
    (['distributed.fsdp_sharding="no_shard"'], "fsdp_sharding", '"fsdp"'),
    (["distributed.zero_stage=3"], "zero_stage", '"deepspeed"'),
    (['distributed.strategy="fsdp"', "distributed.zero_offload=true"], "zero_offload", '"deepspeed"'),
])
def test_a_key_of_another_strategy_is_an_error_naming_it(overrides: list[str], key: str, needs: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert f"{key} only applies when strategy = {needs}" in str(err.value)


def test_offload_needs_a_zero_stage_with_optimizer_state() -> None:
    with pytest.raises(ConfigError, match="zero_offload needs zero_stage >= 1"):
        _cfg('distributed.strategy="deepspeed"', "distributed.zero_stage=0", "distributed.zero_offload=true")


def test_zero_stage_is_range_checked() -> None:
    with pytest.raises(ConfigError, match=r"distributed.zero_stage = 4 is out of range.*0 to 3"):
        _cfg('distributed.strategy="deepspeed"', "distributed.zero_stage=4")


def test_unknown_distributed_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'distributed.fsdp_sharding'"):
        _cfg('distributed.strategy="fsdp"', 'distributed.fsdp_shard="full_shard"')


@pytest.mark.parametrize(("overrides", "stored"), [
    ([], {"strategy": "ddp"}),
    (['distributed.strategy="fsdp"', 'distributed.fsdp_sharding="hybrid_shard"'],
     {"strategy": "fsdp", "fsdp_sharding": "hybrid_shard", "fsdp_offload": False}),
    (['distributed.strategy="deepspeed"', "distributed.zero_offload=true"],
     {"strategy": "deepspeed", "zero_stage": 2, "zero_offload": True}),
])
def test_stored_config_keeps_only_the_strategy_keys_and_round_trips(overrides: list[str], stored: dict) -> None:
    cfg = _cfg(*overrides)
    raw = cfg.to_dict()
    assert raw["distributed"] == stored
    assert config_from_dict(raw) == cfg


# --- launch_command ---------------------------------------------------------------


def test_one_ddp_process_runs_the_trainer_directly() -> None:
    ddp = DistributedConfig()
    assert launch_command("r1", processes=1, mixed_precision="no", dist=ddp, python=PY) == [
        PY, "-m", "engine.train", "r1"]
    assert launch_command("r1", processes=1, mixed_precision="bf16", dist=ddp, resume=True, python=PY,
                          main_process_port=1234) == [PY, "-m", "engine.train", "r1", "--resume"]


def test_two_ddp_processes_go_through_accelerate_launch() -> None:
    cmd = launch_command("r1", processes=2, mixed_precision="no", dist=DistributedConfig(), python=PY)
    assert cmd == [*BASE, "--multi_gpu", "-m", "engine.train", "r1"]
    resumed = launch_command("r1", processes=2, mixed_precision="no", dist=DistributedConfig(), python=PY,
                             resume=True)
    assert resumed[-4:] == ["-m", "engine.train", "r1", "--resume"]


def test_port_rank_and_address_pass_through() -> None:
    cmd = launch_command("r1", processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.7",
                         main_process_port=29600, mixed_precision="bf16", dist=DistributedConfig(), python=PY)
    assert _flag(cmd, "--num_processes") == "8"  # the total over both machines
    assert _flag(cmd, "--num_machines") == "2"
    assert _flag(cmd, "--machine_rank") == "1"
    assert _flag(cmd, "--main_process_ip") == "10.0.0.7"
    assert _flag(cmd, "--main_process_port") == "29600"
    assert _flag(cmd, "--mixed_precision") == "bf16"
    assert cmd[-3:] == ["-m", "engine.train", "r1"]


def test_bad_machine_splits_are_user_errors() -> None:
    with pytest.raises(RenError, match="split evenly"):
        launch_command("r1", processes=3, num_machines=2, machine_rank=0, main_process_ip="h",
                       mixed_precision="no", dist=DistributedConfig())
    with pytest.raises(RenError, match="machine rank and the main process address"):
        launch_command("r1", processes=4, num_machines=2, mixed_precision="no", dist=DistributedConfig())


def test_fsdp_flags_carry_the_configured_values() -> None:
    dist = _cfg('distributed.strategy="fsdp"', 'distributed.fsdp_sharding="hybrid_shard"',
                "distributed.fsdp_offload=true").distributed
    cmd = launch_command("r1", processes=2, mixed_precision="no", dist=dist, python=PY)
    assert cmd[:len(BASE)] == BASE and "--use_fsdp" in cmd and "--multi_gpu" not in cmd
    assert _flag(cmd, "--fsdp_sharding_strategy") == "HYBRID_SHARD"
    assert _flag(cmd, "--fsdp_offload_params") == "true"
    assert _flag(cmd, "--fsdp_auto_wrap_policy") == "SIZE_BASED_WRAP"
    assert _flag(cmd, "--fsdp_min_num_params") == str(distributed.FSDP_MIN_WRAP_PARAMS)
    assert _flag(cmd, "--fsdp_state_dict_type") == "SHARDED_STATE_DICT"
    assert cmd[-3:] == ["-m", "engine.train", "r1"]
    single = launch_command("r1", processes=1, mixed_precision="no", dist=DistributedConfig(strategy="fsdp"))
    assert "accelerate.commands.launch" in single and _flag(single, "--fsdp_offload_params") == "false"


def test_deepspeed_flags_carry_the_configured_values(deepspeed_installed: None) -> None:
    dist = _cfg('distributed.strategy="deepspeed"', "distributed.zero_stage=3",
                "distributed.zero_offload=true").distributed
    cmd = launch_command("r1", processes=2, mixed_precision="no", dist=dist, grad_clip=0.5, python=PY)
    assert cmd[:len(BASE)] == BASE and "--use_deepspeed" in cmd and "--multi_gpu" not in cmd
    assert _flag(cmd, "--zero_stage") == "3"
    assert _flag(cmd, "--offload_optimizer_device") == "cpu"
    assert _flag(cmd, "--gradient_clipping") == "0.5"
    assert "--deepspeed_multinode_launcher" not in cmd
    plain = launch_command("r1", processes=4, num_machines=2, machine_rank=0, main_process_ip="h",
                           mixed_precision="no", dist=DistributedConfig(strategy="deepspeed"), grad_clip=None)
    assert _flag(plain, "--zero_stage") == "2"
    assert _flag(plain, "--offload_optimizer_device") == "none"
    assert _flag(plain, "--gradient_clipping") == "0.0"  # optim.grad_clip unset: no clipping
    assert _flag(plain, "--deepspeed_multinode_launcher") == "standard"


def test_deepspeed_without_the_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(distributed.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    dist = DistributedConfig(strategy="deepspeed")
    with pytest.raises(RenError, match="pip install deepspeed"):
        check_strategy_available(dist)
    with pytest.raises(RenError, match="distributed.strategy"):
        launch_command("r1", processes=2, mixed_precision="no", dist=dist)
    check_strategy_available(DistributedConfig(strategy="fsdp"))  # needs nothing beyond torch


def test_accelerate_reads_the_fsdp_flags_as_intended(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argv goes through accelerate's own parser and environment, and the FSDP
    plugin built from that environment has the chosen settings."""
    import torch
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import dataclasses as accel_dc
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    dist = _cfg('distributed.strategy="fsdp"', 'distributed.fsdp_sharding="shard_grad_op"',
                "distributed.fsdp_offload=true").distributed
    cmd = launch_command("r1", processes=2, mixed_precision="bf16", dist=dist, main_process_port=free_port())
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert (args.module, args.training_script, args.training_script_args) == (True, "engine.train", ["r1"])
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # sync_module_states makes the plugin pick the device it initialises parameters on; pretend to be a CUDA box
    # through torch's public API only (accelerate's own helpers are private and move between releases).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    plugin = accel_dc.FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert plugin.cpu_offload.offload_params is True
    assert plugin.auto_wrap_policy is size_based_auto_wrap_policy
    assert plugin.min_num_params == distributed.FSDP_MIN_WRAP_PARAMS
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.use_orig_params and plugin.sync_module_states and not plugin.cpu_ram_efficient_loading


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# --- sbatch_script ------------------------------------------------------------------


def _script(tmp_path: Path, **kwargs) -> str:
    options = {"cfg": _cfg(), "nodes": 2, "gpus_per_node": 4, "ren_home": str(tmp_path / "ren home"),
               "python": PY, **kwargs}
    return sbatch_script("20250101-abc", **options)


def test_sbatch_script_has_the_directives_and_one_launch_per_node(tmp_path: Path) -> None:
    home = tmp_path / "ren home"
    text = _script(tmp_path, partition="gpu", time_limit="12:00:00", workdir="/src/ren",
                   extra_sbatch=["--cpus-per-task=32", "--account=vision"])
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=ren-20250101-abc",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        f"#SBATCH --output='{home}/runs/20250101-abc/logs/slurm-%j.log'",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=12:00:00",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --account=vision",
    ]
    assert "set -euo pipefail" in text
    assert f"export REN_HOME='{home}'" in text
    assert "cd /src/ren" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 ")
    assert f"bash -c '{PY} -m accelerate.commands.launch --num_processes 8 --num_machines 2 " in srun
    assert srun.endswith(" -m engine.train 20250101-abc'")


def test_sbatch_script_defers_the_machine_rank_to_each_node(tmp_path: Path) -> None:
    srun = next(line for line in _script(tmp_path).splitlines() if line.startswith("srun "))
    # Inside the single-quoted bash -c program: the batch host leaves it alone.
    assert ('--machine_rank "$SLURM_NODEID" --main_process_ip "$REN_MAIN_IP" '
            '--main_process_port "$REN_MAIN_PORT"') in srun
    program = shlex.split(srun)[-1]
    assert '--machine_rank "$SLURM_NODEID"' in program


def test_sbatch_script_passes_bash_syntax_check(tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(_script(tmp_path, workdir="/a dir/with 'quotes'", extra_sbatch=["--mem=0"]))
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _fake_tool(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# `scontrol show hostnames` lists the job's nodes; `scontrol show node NAME` describes one, NodeAddr included
# (the format of SLURM 22.05, which a real cluster in test_slurm_real.py answers with).
SCONTROL = """case "$2" in
    hostnames) printf "node-a\\nnode-b\\n" ;;
    node) printf "NodeName=%s Arch=x86_64 CoresPerSocket=2\\n   NodeAddr=%s NodeHostName=%s Version=22.05.8\\n" \\
              "$3" "${NODE_ADDR-10.0.0.1}" "$3" ;;
esac
"""


@pytest.mark.parametrize(("node_addr", "main_ip"), [("10.1.2.3", "10.1.2.3"), ("", "node-a")])
def test_sbatch_script_runs_one_launch_per_node_with_its_own_rank(tmp_path: Path, node_addr: str,
                                                                  main_ip: str) -> None:
    """The script under fake scontrol/srun (two nodes) and a fake python that records
    its argv and REN_HOME: each node's launch gets its own rank and the head node's
    address (its NodeAddr; its name where scontrol gives none), and REN_HOME with a
    space arrives whole."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    _fake_tool(bin_dir, "scontrol", SCONTROL)
    _fake_tool(bin_dir, "srun", 'while [ "$1" != bash ]; do shift; done\n'
                                'for rank in 0 1; do SLURM_NODEID=$rank "$@"; done\n')
    _fake_tool(bin_dir, "python", f'echo "$REN_HOME|$*" >> {shlex.quote(str(calls))}\n')
    home = tmp_path / "ren home"
    script = tmp_path / "job.sh"
    script.write_text(_script(tmp_path, python=str(bin_dir / "python")))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_NODEID": "9", "NODE_ADDR": node_addr}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        ren_home, argv = line.split("|")
        assert ren_home == str(home)
        assert (f"--machine_rank {rank} --main_process_ip {main_ip} --main_process_port {20000 + 4242}") in argv
        assert argv.endswith("-m engine.train 20250101-abc")


def test_sbatch_script_refuses_a_node_count_it_was_not_written_for(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(_script(tmp_path))
    env = {**os.environ, "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "1"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "written for 2 node(s), the job has 1" in result.stderr


def test_sbatch_script_for_one_gpu_trains_directly(tmp_path: Path) -> None:
    text = _script(tmp_path, nodes=1, gpus_per_node=1, resume=True)
    assert f"bash -c '{PY} -m engine.train 20250101-abc --resume'" in text


def test_sbatch_script_rejects_multi_line_extra_options(tmp_path: Path) -> None:
    with pytest.raises(RenError, match="one option per item"):
        _script(tmp_path, extra_sbatch=["--mem=0\nrm -rf /"])
