"""A real SLURM cluster on this machine, for the tests of `ren submit --slurm`.

:func:`slurm_cluster` writes a minimal ``slurm.conf`` into a temporary directory, starts ``munged`` with a key of
its own, ``slurmctld`` and one ``slurmd`` per node (all in the foreground, ``-D``, so that they are this process's
children), waits until ``sinfo`` shows every node idle, and on leaving cancels what still runs and stops every
process of the cluster. Nothing outside the directory is read or written: clients find the cluster through
``SLURM_CONF`` (:attr:`SlurmCluster.env`) and munge through the socket that ``AuthInfo`` names.

Choices made for a container: process tracking by process group and no task plugin (the cgroup plugins need a
cgroup hierarchy of their own), no accounting daemon (``sacct`` has nothing to read: job states come from
``squeue --states=all``, which keeps ended jobs for ``MinJobAge`` seconds). Each node declares one GPU whose
"device" is ``/dev/null``: ``ren submit`` writes ``--gpus-per-node``, which a cluster without GPUs refuses, while
torch finds no CUDA and trains on the CPU. Several nodes on one host are several ``slurmd``, each with its own
port and node name (``slurmd -N``), which Debian's SLURM 22.05 accepts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from engine.jobs.launchers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun")
START_S = 60.0  # for the daemons to start and every node to register as idle
STOP_S = 30.0  # for the jobs left to end, then for each daemon to exit
T = TypeVar("T")


def unavailable() -> str | None:
    """Why a cluster cannot be started here (a reason to skip), or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): the real-SLURM tests need "
                "`apt-get install slurm-wlm munge` (.ci/run installs them when it runs as root)")
    if os.geteuid() != 0:
        return "the real-SLURM tests start slurmd, which runs jobs as their users and so needs root"
    return None


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class ClusterError(RuntimeError):
    """The cluster did not come up, or a client command failed."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: tuple[str, ...]
    env: dict[str, str]  # os.environ plus SLURM_CONF: pass it to every client, and to `ren submit --now`

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A SLURM client command (``squeue``, ``scancel``, ...) against this cluster."""
        result = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode:
            raise ClusterError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """What ``squeue`` says of job ``job_id``, ended or not: its state, exit code and nodes
        ({} once slurmctld has forgotten it)."""
        out = self.run("squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T|%N|%D").stdout
        for line in out.splitlines():
            state, nodes, count = line.strip().split("|")
            return {"state": state, "nodes": nodes, "node_count": count}
        return {}

    def job_state(self, job_id: str) -> str:
        return self.job(job_id).get("state", "")

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        """Poll until job ``job_id`` is in one of ``states``; its state. A job that ends in another state, or
        not within ``timeout`` seconds, fails with what the cluster's logs say."""
        ended = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED")
        return wait_for(lambda: self._settled(job_id, states, ended), timeout,
                        lambda: f"job {job_id} in {states} (it is {self.job_state(job_id) or 'gone'})\n"
                                + self.logs())

    def _settled(self, job_id: str, states: tuple[str, ...], ended: tuple[str, ...]) -> str | None:
        state = self.job_state(job_id)
        if state in states:
            return state
        if state in ended:
            raise ClusterError(f"job {job_id} ended {state}, not {states}\n{self.logs()}")
        return None

    def logs(self, lines: int = 15) -> str:
        """The last lines of each daemon's log (for a failure message)."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def wait_for(probe: Callable[[], T], timeout: float, what: Callable[[], str]) -> T:
    """Poll ``probe()`` every 0.2 s until it returns something truthy, and return that; after ``timeout``
    seconds fail, saying ``what()``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what()}")
        time.sleep(0.2)


def _config(root: Path, nodes: tuple[str, ...], *, cpus: int, memory_mb: int) -> str:
    ctld_port, *node_ports = (free_port() for _ in range(len(nodes) + 1))
    lines = [
        "ClusterName=ren-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "GresTypes=gpu",
        "KillWait=30",  # a cancelled run saves its checkpoint within this, before SIGKILL
        "MinJobAge=600",  # squeue --states=all keeps ended jobs this long
        "SlurmdTimeout=120",
        "SlurmctldTimeout=120",
    ]
    lines += [f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
              f"RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN" for node, port in zip(nodes, node_ports)]
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def slurm_cluster(nodes: int = 1, *, cpus: int = 2, memory_mb: int = 2048) -> Iterator[SlurmCluster]:
    """A running cluster of ``nodes`` nodes (``node1``, ``node2``, ...) of ``cpus`` CPUs, one GPU and
    ``memory_mb`` MB each, in partition ``debug``; every process of it is stopped on leaving."""
    reason = unavailable()
    if reason:
        raise ClusterError(reason)
    # munged wants its socket's directory, and every directory above it, searchable by all: not pytest's
    # 0700 tmp_path, so a directory of its own
    root = Path(tempfile.mkdtemp(prefix="ren-slurm-"))
    root.chmod(0o755)
    names = tuple(f"node{i}" for i in range(1, nodes + 1))
    for sub in ("munge", "state", *(f"spool/{n}" for n in names)):
        (root / sub).mkdir(parents=True)
    (root / "munge").chmod(0o755)
    key_dir = root / "munge-key"
    key_dir.mkdir(mode=0o700)
    key = key_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, names, cpus=cpus, memory_mb=memory_mb))
    (root / "gres.conf").write_text("Name=gpu File=/dev/null\n")  # read from slurm.conf's directory
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen[bytes]] = []
    cluster = SlurmCluster(root, conf, names, env)

    def start(name: str, *args: str) -> None:
        out = open(root / f"{name}.out.log", "wb")  # the child keeps its own descriptor
        procs.append(subprocess.Popen([_which(args[0]) or args[0], *args[1:]], stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=root))
        out.close()

    try:
        start("munged", "munged", "--foreground", f"--socket={root / 'munge' / 'munge.socket'}",
              f"--key-file={key}", f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
              f"--seed-file={root / 'munge' / 'seed'}")
        wait_for(lambda: (root / "munge" / "munge.socket").exists(), START_S, lambda: "munged's socket")
        start("slurmctld", "slurmctld", "-D", "-i")  # -i: no state to recover, start clean
        for name in names:
            start(f"slurmd-{name}-daemon", "slurmd", "-D", "-N", name)
        wait_for(lambda: _all_idle(cluster, procs), START_S,
                 lambda: f"nodes {', '.join(names)} to be idle in sinfo\n{cluster.logs()}")
        yield cluster
    finally:
        _stop(cluster, procs)


def _all_idle(cluster: SlurmCluster, procs: list[subprocess.Popen[bytes]]) -> bool:
    for proc in procs:
        if proc.poll() is not None:
            raise ClusterError(f"{proc.args[0]} exited {proc.returncode} while starting\n{cluster.logs()}")
    result = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
    states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
    return result.returncode == 0 and all(states.get(n) == "idle" for n in cluster.nodes)


def _stop(cluster: SlurmCluster, procs: list[subprocess.Popen[bytes]]) -> None:
    """Cancel the jobs left, stop the daemons (slurmd first, munged last), then kill any process still carrying
    this cluster's SLURM_CONF (a job step slurmd left behind), and remove the directory."""
    if any(p.args[0].endswith("slurmctld") and p.poll() is None for p in procs):
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--user=root", check=False)
            wait_for(lambda: not cluster.run("squeue", "--noheader", check=False).stdout.strip(), STOP_S,
                     lambda: "the cancelled jobs to end")
    for proc in sorted(procs, key=lambda p: ("slurmd" not in p.args[0], "munged" in p.args[0])):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for pid in _processes_of(cluster.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(cluster.root, ignore_errors=True)


def _processes_of(conf: Path) -> list[int]:
    """The processes whose environment names ``conf`` as SLURM_CONF: the daemons, the job steps and the jobs'
    own processes (a job inherits the environment it was submitted from)."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found
