"""Command lines that train a stored run in several processes or on several machines.

:func:`launch_command` is the argv of one training launch: plain ``python -m
engine.train`` for one DDP process, else ``accelerate launch`` with the flags of
the preset's ``[distributed]`` strategy. :func:`sbatch_script` wraps it in a
SLURM batch script that starts one ``accelerate launch`` per node.

This module imports neither torch nor accelerate: it only builds command lines.
"""

from __future__ import annotations

import importlib.util
import shlex
import socket
import sys
from collections.abc import Sequence

from engine.config import DistributedConfig, RunConfig
from engine.errors import RenError

# FSDP wraps every submodule that holds at least this many parameters not yet in a
# smaller wrapped unit. Transformer-based wrapping needs the layer class names
# (or a ``_no_split_modules`` that ren's composite models lack), and they differ
# between BERT, ELECTRA, ViT, DeiT and timm towers; a size threshold fits any of
# them. 1M parameters makes one unit per layer at width 384 and units of a few
# million (attention, MLP) at 768-1024, so the whole model is never gathered at once.
FSDP_MIN_WRAP_PARAMS = 1_000_000

# Shell variables that sbatch_script passes through launch_command; they are
# written double-quoted so that each node's shell expands them.
_NODE_VARS = ("$SLURM_NODEID", "$REN_MAIN_IP", "$REN_MAIN_PORT")


def free_port() -> int:
    """A TCP port no socket on this machine is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def check_strategy_available(dist: DistributedConfig) -> None:
    """Raise :class:`RenError` when ``dist.strategy`` needs a package this interpreter lacks."""
    if dist.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise RenError(
            "The preset sets distributed.strategy = \"deepspeed\", but the deepspeed package is "
            f"not installed for {sys.executable}. Run `pip install deepspeed` in the environment "
            "of every machine that trains (it builds against the installed torch and CUDA), or "
            "choose strategy = \"fsdp\", which needs no extra package."
        )


def launch_command(run_id: str, *, processes: int, mixed_precision: str, dist: DistributedConfig,
                   resume: bool = False, main_process_port: int | str | None = None,
                   num_machines: int = 1, machine_rank: int | str | None = None,
                   main_process_ip: str | None = None, grad_clip: float | None = 1.0,
                   python: str = sys.executable) -> list[str]:
    """The argv that trains ``run_id`` in ``processes`` processes over ``num_machines`` machines.

    ``processes`` is the total over all machines (accelerate's ``--num_processes``).
    A multi-machine launch runs this command once per machine, each with its own
    ``machine_rank``. ``grad_clip`` is the run's ``optim.grad_clip``: DeepSpeed
    clips inside its engine and must be told (None turns clipping off).
    Port, rank and address may be strings such as shell variable references.
    """
    check_strategy_available(dist)
    if processes < 1 or num_machines < 1 or processes % num_machines:
        raise RenError(
            f"{processes} processes cannot be split evenly over {num_machines} machines; give a "
            "multiple of the machine count (accelerate starts processes/machines on each)."
        )
    if num_machines > 1 and (machine_rank is None or main_process_ip is None):
        raise RenError(f"a launch over {num_machines} machines needs the machine rank and the main process address.")
    train = ["-m", "engine.train", run_id, *(["--resume"] if resume else [])]
    if processes == 1 and num_machines == 1 and dist.strategy == "ddp":
        return [python, *train]
    cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", str(num_machines), "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    for flag, value in (("--machine_rank", machine_rank), ("--main_process_ip", main_process_ip),
                        ("--main_process_port", main_process_port)):
        if value is not None:
            cmd += [flag, str(value)]
    return [*cmd, *_strategy_flags(dist, num_machines, grad_clip), *train]


def _strategy_flags(dist: DistributedConfig, num_machines: int, grad_clip: float | None) -> list[str]:
    if dist.strategy == "fsdp":
        return [
            "--use_fsdp",
            # FSDP1: the only version that takes a sharding strategy (FSDP2 has a reshard flag).
            "--fsdp_version", "1",
            "--fsdp_sharding_strategy", dist.fsdp_sharding.upper(),
            "--fsdp_offload_params", str(dist.fsdp_offload).lower(),
            "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP",
            "--fsdp_min_num_params", str(FSDP_MIN_WRAP_PARAMS),
            # save_state/load_state write and read each process's shard: no gather of the
            # whole model and optimizer on one process; resume needs the same process count.
            "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
            # FSDP1's own default, which accelerate turns off unless asked: fetch the next
            # unit's parameters while the current unit's gradients are computed.
            "--fsdp_backward_prefetch", "BACKWARD_PRE",
            # Frozen groups can mix trainable and frozen parameters in one wrapped unit,
            # and the optimizer's parameter groups refer to the original parameters.
            "--fsdp_use_orig_params", "true",
            # Every process builds the whole model (and loads init_from weights) before
            # wrapping, as the trainer expects; rank 0's weights are then broadcast.
            "--fsdp_cpu_ram_efficient_loading", "false",
            "--fsdp_sync_module_states", "true",
        ]
    if dist.strategy == "deepspeed":
        flags = [
            "--use_deepspeed",
            "--zero_stage", str(dist.zero_stage),
            "--offload_optimizer_device", "cpu" if dist.zero_offload else "none",
            # Else ZeRO-3 makes transformers build towers already partitioned, while the
            # trainer builds the whole model and loads init_from weights into it first.
            "--zero3_init_flag", "false",
            # accelerate.clip_grad_norm_ does not clip under DeepSpeed; the engine clips
            # with this value (0: off). Gradient accumulation is taken from the trainer.
            "--gradient_clipping", str(grad_clip or 0.0),
        ]
        if num_machines > 1:
            # One launcher per machine (srun, a scheduler) instead of DeepSpeed's pdsh/ssh fan-out.
            flags += ["--deepspeed_multinode_launcher", "standard"]
        return flags
    # Without it accelerate starts a single process unless this machine has 2+ GPUs
    # (one GPU per node over several nodes would not be distributed at all). Without
    # GPUs the processes each train alone unless ACCELERATE_USE_CPU=1 is set for them.
    return ["--multi_gpu"]


def sbatch_script(run_id: str, *, cfg: RunConfig, nodes: int, gpus_per_node: int, ren_home: str,
                  python: str = sys.executable, workdir: str | None = None,
                  partition: str | None = None, time_limit: str | None = None,
                  extra_sbatch: Sequence[str] = (), resume: bool = False) -> str:
    """A SLURM batch script that trains the stored run ``run_id`` with ``cfg`` on
    ``nodes`` nodes of ``gpus_per_node`` GPUs: one process per GPU, one
    ``accelerate launch`` per node (started by ``srun``)."""
    if nodes < 1 or gpus_per_node < 1:
        raise RenError(f"a SLURM job needs at least one node and one GPU per node (got {nodes} and {gpus_per_node}).")
    for line in extra_sbatch:
        if "\n" in line or "\r" in line:
            raise RenError(f"extra #SBATCH option {line!r} spans several lines; give one option per item.")
    multi = nodes > 1
    command = launch_command(
        run_id, processes=nodes * gpus_per_node, mixed_precision=cfg.train.mixed_precision,
        dist=cfg.distributed, resume=resume, main_process_port="$REN_MAIN_PORT", num_machines=nodes,
        machine_rank="$SLURM_NODEID" if multi else None, main_process_ip="$REN_MAIN_IP" if multi else None,
        grad_clip=cfg.optim.grad_clip, python=python,
    )
    per_node = " ".join(f'"{arg}"' if arg in _NODE_VARS else shlex.quote(arg) for arg in command)
    logs = f"{ren_home.rstrip('/')}/runs/{run_id}/logs"
    directives = [f"--job-name={shlex.quote(f'ren-{run_id}')}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={gpus_per_node}", f"--output={shlex.quote(logs + '/slurm-%j.log')}"]
    if partition:
        directives.append(f"--partition={shlex.quote(partition)}")
    if time_limit:
        directives.append(f"--time={shlex.quote(time_limit)}")
    directives += extra_sbatch
    lines = [
        "#!/bin/bash",
        f"# ren: train run {run_id} ({cfg.distributed.strategy}) on {nodes} node(s) x {gpus_per_node} GPU(s).",
        "#",
        "# REN_HOME must be on a filesystem that every node mounts at the same path:",
        "# all processes read the run's config and checkpoints from it, and the main",
        "# process writes metrics, checkpoints and the run status to it. SLURM opens the",
        "# log file before the job starts, so create its directory first. Submit with:",
        "#",
        f"#   mkdir -p {shlex.quote(logs)} && sbatch THIS_FILE",
        "#",
        "# CPUs per task (data loading, tokenisation) are yours to choose, e.g. an extra",
        "# option --cpus-per-task=32.",
        *(f"#SBATCH {d}" for d in directives),
        "",
        "set -euo pipefail",
        f"export REN_HOME={shlex.quote(ren_home)}",
    ]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)}")
    lines += [
        f'if [ "$SLURM_NNODES" -ne {nodes} ]; then',
        f'    echo "this script was written for {nodes} node(s), the job has $SLURM_NNODES" >&2',
        "    exit 1",
        "fi",
        "# Since Slurm 22.05 srun does not inherit --cpus-per-task from the batch job.",
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi',
        "# The first node hosts the rendezvous, at the address SLURM itself reaches it by (its",
        "# NodeAddr): a node's name need not resolve on the other nodes. The port follows the",
        "# job id so that jobs sharing a node do not collide.",
        'REN_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        'REN_MAIN_IP=$(scontrol show node "$REN_HEAD" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')',
        'REN_MAIN_IP=${REN_MAIN_IP:-$REN_HEAD}',
        "REN_MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export REN_MAIN_IP REN_MAIN_PORT",
        "# Single quotes: $SLURM_NODEID is expanded by the shell on each node, not here.",
        f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(per_node)}",
        "",
    ]
    return "\n".join(lines)
