"""torch.distributed set-up and the few collectives the engine needs.

Ranks come from torch's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), as torchrun sets them; under SLURM/submitit,
:func:`harness.launch.environment.distributed_env_from_submitit` fills them from submitit's ``JobEnvironment``
first. Without them the run is
a single process and every function here degrades to the identity. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(backend: str = None, timeout_min: int = 30) -> Dict[str, Any]:
    """Initialise the default process group from the environment (nothing when WORLD_SIZE is unset or 1).

    Returns ``{"rank", "world_size", "local_rank", "device"}``. On CUDA the process takes the GPU
    ``LOCAL_RANK`` and NCCL; on CPU, gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not is_dist():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE is {world_size} but {key} is not set; "
                                   "set it, or call harness.launch.environment.distributed_env_from_submitit() inside a submitit job")
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = dict(backend=backend, init_method="env://", world_size=world_size, rank=rank,
                      timeout=datetime.timedelta(minutes=timeout_min))
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
