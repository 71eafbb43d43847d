"""The process environment of jobs: submitit's job environment exported as torch.distributed's env://
variables (the one place that does it), and the variables a submission must not pass on to its jobs."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import submitit

ENV_WORKDIR = "HARNESS_SUBMIT_CWD"
ENV_SNAPSHOT = "HARNESS_CODE_SNAPSHOT"

_JOB_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    ENV_WORKDIR,
    ENV_SNAPSHOT,
)
_KEPT_VARIABLES = ("SLURM_CONF",)  # where the cluster's config is: a property of the cluster, not of a job


@contextmanager
def without_job_variables() -> Iterator[None]:
    """Submitting from inside a job (an interactive allocation, a job that submits the next step):
    the new jobs must not inherit this job's SLURM_*, submitit and rank variables (sbatch would take
    SLURM_* settings as its own). User defaults for sbatch (SBATCH_*) stay."""
    hidden = {
        k: os.environ.pop(k)
        for k in list(os.environ)
        if k not in _KEPT_VARIABLES
        and (k.startswith(("SLURM_", "SLURMD_", "SRUN_", "SUBMITIT_")) or k in _JOB_VARIABLES)
    }
    try:
        yield
    finally:
        os.environ.update(hidden)


@contextmanager
def environment_for_local_jobs(snapshot_dir: Optional[Path], workdir: Path) -> Iterator[None]:
    """Local jobs are processes started by ``submit``: they inherit its working directory and environment."""
    if snapshot_dir is None:
        yield
        return
    old_cwd, old_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(snapshot_dir) + (os.pathsep + old_path if old_path else "")
    os.chdir(snapshot_dir)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    job_id: Optional[str] = None


def master_port_for(job_id: Optional[str]) -> int:
    """A port in [20000, 40000) derived from the job id: concurrent jobs on one node differ.

    The numeric job id gives the port: SLURM's own ``SLURM_JOB_ID`` (unique per array task too) where the
    job has one; for an id ``<array>_<task>``, the array's id.
    """
    digits = "".join(ch for ch in str(job_id or "").split("_")[0] if ch.isdigit())
    if not digits:
        digits = str(int(hashlib.sha256(str(job_id).encode()).hexdigest()[:8], 16))
    return 20000 + int(digits) % 20000


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    return True


def slurm_node_addr(node: str) -> Optional[str]:
    """The address SLURM reaches ``node`` at (``scontrol show node``: NodeAddr), None when it does not say."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for field in out.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or None
    return None


def master_addr_for(hostnames: List[str]) -> str:
    """The rendezvous address: the job's first node, by name where the name resolves; otherwise the address
    SLURM itself uses for that node (its NodeAddr), as on clusters whose node names are not in DNS."""
    first = hostnames[0] if hostnames else "127.0.0.1"
    if _resolves(first):
        return first
    addr = slurm_node_addr(first)
    if addr and addr != first:
        return addr
    launch = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")  # the batch step's node: the job's first
    return launch or first


def distributed_env_from_submitit(export: bool = True) -> DistributedEnv:
    """Ranks and rendezvous from submitit's ``JobEnvironment``; exported as torch's env:// variables.

    Outside a submitit job: a single process (rank 0 of 1) on localhost, unless ``RANK`` and
    ``WORLD_SIZE`` are already set (torchrun), which are then kept.
    """
    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:
        job_env = None
    if job_env is None:
        env = DistributedEnv(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT", 29500)),
        )
    else:
        num_tasks = job_env.num_tasks
        hostnames = list(job_env.hostnames) or ["127.0.0.1"]
        if num_tasks > 1:
            master_addr = master_addr_for(hostnames)
        else:  # a single task: no rendezvous over the network
            master_addr = hostnames[0] if _resolves(hostnames[0]) else "127.0.0.1"
        port_id = os.environ.get("SLURM_JOB_ID") if getattr(job_env, "cluster", None) == "slurm" else None
        env = DistributedEnv(
            rank=job_env.global_rank,
            world_size=num_tasks,
            local_rank=job_env.local_rank,
            local_world_size=max(1, num_tasks // max(1, job_env.num_nodes)),
            master_addr=master_addr,
            master_port=master_port_for(port_id or job_env.job_id),
            job_id=str(job_env.job_id),
        )
    if export:
        os.environ.update(
            {
                "RANK": str(env.rank),
                "WORLD_SIZE": str(env.world_size),
                "LOCAL_RANK": str(env.local_rank),
                "LOCAL_WORLD_SIZE": str(env.local_world_size),
                "MASTER_ADDR": env.master_addr,
                "MASTER_PORT": str(env.master_port),
            }
        )
    return env
