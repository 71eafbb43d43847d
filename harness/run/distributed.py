"""torch.distributed set-up and the few collectives the engine needs.

Ranks come from torch's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), as torchrun sets them; under SLURM/submitit,
:func:`harness.launch.environment.distributed_env_from_submitit` fills them from submitit's ``JobEnvironment``
first. Without them the run is
a single process and every function here degrades to the identity. NCCL on GPUs, gloo on CPU.

Two time limits keep a multi-node job from waiting until its wall time; each is the launcher's setting
(``launcher.rendezvous_timeout_min`` / ``launcher.collective_timeout_min``, passed by the job), and an
environment variable in the submitting shell overrides it (sbatch exports the environment to the jobs):

* the rendezvous (``HARNESS_RENDEZVOUS_TIMEOUT_S``, default 10 min): rank 0 opens a TCP store at
  ``MASTER_ADDR:MASTER_PORT`` and waits for every rank; a rank that cannot reach it, or a rank 0 that
  some rank never reaches, fails with a :class:`RendezvousError` naming the address, the port and the ranks;
* collectives (``HARNESS_COLLECTIVE_TIMEOUT_S``, default 30 min): a collective that a lost rank never joins
  fails after that time (NCCL: with asynchronous error handling on, the process is ended), and the job
  ends with the reason in its record instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from harness.config import LauncherConfig
from harness.provenance import current_device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


RENDEZVOUS_TIMEOUT_ENV = "HARNESS_RENDEZVOUS_TIMEOUT_S"
COLLECTIVE_TIMEOUT_ENV = "HARNESS_COLLECTIVE_TIMEOUT_S"
_DEFAULTS = LauncherConfig()  # the launcher's defaults, for callers that pass no setting (torchrun, tests)


class RendezvousError(RuntimeError):
    """The ranks of a job could not meet: the address and port tried, and what to check.

    ``ends_the_job`` on rank 0's: the ranks that never arrived are in no collective that could notice the failure
    (a rank stuck before its rendezvous would hold its node until the wall time), so the job launcher ends the job
    once rank 0 has recorded it (:mod:`harness.launch.wrapper`)."""

    def __init__(self, message: str, ends_the_job: bool = False) -> None:
        super().__init__(message)
        self.ends_the_job = ends_the_job


@dataclass(frozen=True)
class Limit:
    """A time limit in seconds and where it came from (``launcher.x_min=0.5`` or ``HARNESS_X_S=30``)."""

    seconds: float
    source: str


def _limit(env: str, key: str, minutes: Optional[float], default_min: float) -> Limit:
    """``env`` (seconds) when the shell sets it, else ``minutes`` (the launcher's ``key``), else the default."""
    value = os.environ.get(env)
    if not value:
        minutes = default_min if minutes is None else minutes
        return Limit(60.0 * minutes, f"launcher.{key}={minutes:g}")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{env}={value!r} must be positive")
    return Limit(seconds, f"{env}={value} (overrides launcher.{key})")


def rendezvous_limit(minutes: Optional[float] = None) -> Limit:
    """How long the ranks may take to meet: ``HARNESS_RENDEZVOUS_TIMEOUT_S``, else ``minutes``, else 10 min."""
    return _limit(RENDEZVOUS_TIMEOUT_ENV, "rendezvous_timeout_min", minutes, _DEFAULTS.rendezvous_timeout_min)


def collective_limit(minutes: Optional[float] = None) -> Limit:
    """How long a collective may wait for a rank: ``HARNESS_COLLECTIVE_TIMEOUT_S``, else ``minutes``, else 30 min."""
    return _limit(COLLECTIVE_TIMEOUT_ENV, "collective_timeout_min", minutes, _DEFAULTS.collective_timeout_min)


def _where() -> str:
    return f"{socket.gethostname()} ({os.environ.get('SLURMD_NODENAME') or 'no SLURM node name'})"


def _wait_until_served(addr: str, port: int, deadline: float) -> None:
    """Until ``addr:port`` accepts a connection (rank 0 serves the rendezvous there), at most until ``deadline``
    (``time.monotonic()``); else a TimeoutError. torch's own client would retry a failed connection once with
    the whole timeout again, failing only after about twice the limit."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.5, min(5.0, left))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepted a connection at {addr}:{port}: {err}") from err
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def rendezvous_store(addr: str, port: int, rank: int, world_size: int, limit: Limit):
    """The TCP store the ranks meet at: rank 0 serves it and waits for every rank, the others connect; both
    within ``limit``, else a :class:`RendezvousError` that names the address and port."""
    start = time.monotonic()
    try:
        if rank != 0:
            _wait_until_served(addr, port, start + limit.seconds)
        return dist.TCPStore(
            addr,
            port,
            world_size,
            rank == 0,
            timeout=datetime.timedelta(seconds=limit.seconds),
            wait_for_workers=True,
            multi_tenant=False,
        )
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError / DistStoreError / DistNetworkError
        waited = time.monotonic() - start
        if rank == 0:
            what = (
                f"rank 0 on {_where()} served the rendezvous at {addr}:{port} but not all {world_size} ranks "
                f"reached it within {waited:.0f} s"
            )
        else:
            what = (
                f"rank {rank} on {_where()} could not reach the rendezvous at {addr}:{port} (rank 0's node) "
                f"within {waited:.0f} s"
            )
        raise RendezvousError(
            f"{what} ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
            f"check that {addr} is this job's first node and reachable from every node on port {port} "
            f"(MASTER_ADDR comes from SLURM's NodeAddr where node names do not resolve); the limit is "
            f"{limit.source}",
            ends_the_job=rank == 0,
        ) from err


def init_distributed(
    backend: str = None, rendezvous_timeout_min: Optional[float] = None, collective_timeout_min: Optional[float] = None
) -> Dict[str, Any]:
    """Initialise the default process group from the environment (nothing when WORLD_SIZE is unset or 1).

    Returns ``{"rank", "world_size", "local_rank", "device"}``. On CUDA the process takes the GPU
    ``LOCAL_RANK`` and NCCL; on CPU, gloo. The rendezvous is bounded by :func:`rendezvous_limit`, every
    collective by :func:`collective_limit` (the launcher's minutes given here, unless the shell overrides them).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = current_device()
    if world_size > 1 and not is_dist():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE is {world_size} but {key} is not set; "
                    "set it, or call harness.launch.environment.distributed_env_from_submitit() inside a submitit job"
                )
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl":
            # a collective that times out (a lost rank) ends the process instead of hanging in the kernel
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = rendezvous_store(addr, port, rank, world_size, rendezvous_limit(rendezvous_timeout_min))
        kwargs = dict(
            backend=backend,
            store=store,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(seconds=collective_limit(collective_timeout_min).seconds),
        )
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return dict(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def barrier():
    if is_dist():
        dist.barrier()


def all_gather_object(obj) -> List[Any]:
    """The list of ``obj`` from every rank (rank order)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_mean(values: Dict[str, float], device=None) -> Dict[str, float]:
    """Mean over ranks of a dict of numbers (same keys on every rank)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= get_world_size()
    return {k: v for k, v in zip(keys, t.tolist())}


def reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
    return t
