"""``impl="auto"`` under torch.distributed (DDP): one self-check per node, one decision for every rank.

Without coordination every rank would walk the chain itself: the ranks of a node would queue on the verdict's
file lock, a self-check that timed out would be rerun rank after rank while the others wait in the first
all-reduce (and the process group times out), and ranks whose checks end differently (one times out, one
passes) would train with different kernels. Instead, when the default process group spans several ranks and
gradients are enabled (training; under ``torch.no_grad`` each rank decides alone, as evaluation on one rank
must not wait for the others), for each candidate of the chain in turn:

- the node's leader (its lowest rank; nodes told apart by ``GROUP_RANK``, ``SLURM_NODEID`` or the host name)
  prepares it and runs its self-check, within a time limit below the process group's time-out;
- the other ranks only prepare it (load the library) and wait for the leaders, at most
  :func:`wait_timeout` (below the process group's time-out, so that they report instead of hanging);
- every rank posts its result in the process group's key-value store, and reads everyone's: the candidate is
  used when it passed on every node and was prepared on every rank, else all ranks move to the next one.

The decision is the same on every rank, by construction; no collective operation is used (the store is
independent of the process group's collectives), so ranks can never mix kernels. A rank that never reports
(it crashed) makes the others raise after the wait, with a message naming it, instead of hanging.
``DEFORMABLE_DETR_OPS_DISTRIBUTED=0`` switches this off (every rank decides alone).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from typing import Callable

import torch

STORE_PREFIX = "deformable_detr/ms_deform_attn/"
_group: "Group | None" = None


def active() -> bool:
    """Whether decisions are shared: a default process group of several ranks, gradients on, not tracing."""
    if os.environ.get("DEFORMABLE_DETR_OPS_DISTRIBUTED", "1") == "0" or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return False
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_group_timeout() -> float:
    """Seconds after which the default process group's collectives (and its store's waits) give up: the smallest of
    its backends' time-outs and its store's, else torch's default for the backend."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeouts = []
    group = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            timeouts.append(group._get_backend(torch.device(device)).options._timeout.total_seconds())
        except Exception:  # noqa: BLE001 - no backend for that device, or an older torch
            pass
    try:
        timeouts.append(c10d._get_default_store().timeout.total_seconds())
    except Exception:  # noqa: BLE001
        pass
    if not timeouts:
        timeouts.append(c10d._get_default_timeout(dist.get_backend()).total_seconds())
    return min(t for t in timeouts if t > 0) if any(t > 0 for t in timeouts) else 1800.0


def wait_timeout(pg_timeout: float | None = None) -> float:
    """How long a rank waits for the others' results: 80% of the process group's time-out."""
    return 0.8 * (process_group_timeout() if pg_timeout is None else pg_timeout)


def check_timeout(pg_timeout: float | None = None) -> float:
    """The leader's self-check time limit: the usual one (:func:`model.ops.selfcheck.timeout_s`), but at most half
    the process group's time-out, so that it ends (passed, failed or timed out) well before the others stop
    waiting."""
    from .selfcheck import timeout_s

    return min(timeout_s(), 0.5 * (process_group_timeout() if pg_timeout is None else pg_timeout))


def node_id() -> str:
    for variable in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(variable, "") != "":
            return f"{variable}={os.environ[variable]}"
    return socket.gethostname()


class Group:
    """This process in the default process group: its rank, its node's leader, the shared key-value store."""

    def __init__(self):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.store_id = id(c10d._get_default_store())
        self.store = dist.PrefixStore(STORE_PREFIX, c10d._get_default_store())
        self.pg_timeout = process_group_timeout()
        self.node = node_id()
        self.store.set(f"node/{self.rank}", self.node)
        self._wait([f"node/{r}" for r in range(self.world_size)], "the node names")
        nodes = [self.store.get(f"node/{r}").decode() for r in range(self.world_size)]
        self.leader_rank = min(r for r in range(self.world_size) if nodes[r] == self.node)
        self.leader = self.rank == self.leader_rank
        self.nodes = nodes

    def _wait(self, keys: list[str], what: str, timeout: float | None = None) -> None:
        timeout = wait_timeout(self.pg_timeout) if timeout is None else timeout
        try:
            self.store.wait(keys, timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001 - the store's time-out error
            missing = [k for k in keys if not self.store.check([k])]
            raise RuntimeError(
                f"ms_deform_attn: rank {self.rank} waited {timeout:.0f} s for {what} of every rank (80% of the process "
                f"group's time-out of {self.pg_timeout:.0f} s); missing: {', '.join(missing) or '?'} ({e}). A rank "
                f"died, or is not running the same model; set DEFORMABLE_DETR_OPS_DISTRIBUTED=0 to let every rank "
                f"choose its implementation alone."
            ) from e

    def agree(
        self,
        decision: str,
        candidates: list[str],
        leader_check: Callable[[str], str | None],
        follower_check: Callable[[str], str | None],
        describe: Callable[[str], str] = str,
        checked: Callable[[str], bool] = lambda name: True,
    ) -> tuple[str | None, list[tuple[str, str]]]:
        """The first of ``candidates`` accepted by every rank: the leaders' ``leader_check`` (prepare and self-check)
        and the other ranks' ``follower_check`` (prepare) return None for accepted, else the reason (``checked``:
        whether the leaders self-check a candidate, for the waiting message). Returns it
        (None when none is) and the (candidate, reason) of those passed over, the same on every rank."""
        passed_over = []
        for name in candidates:
            key = f"{decision}/{name}"
            if self.leader:
                reason = leader_check(name)
            else:
                reason = follower_check(name)
                if checked(name):
                    print(
                        f"ms_deform_attn: rank {self.rank} waits for the self-check of the {describe(name)} by "
                        f"rank {self.leader_rank}, its node's leader (at most {wait_timeout(self.pg_timeout):.0f} "
                        f"s)",
                        file=sys.stderr,
                        flush=True,
                    )
            self.store.set(
                f"{key}/{self.rank}", json.dumps({"reason": reason, "leader": self.leader, "node": self.node})
            )
            self._wait([f"{key}/{r}" for r in range(self.world_size)], f"the verdict on the {describe(name)}")
            results = [json.loads(self.store.get(f"{key}/{r}")) for r in range(self.world_size)]
            refused = [(r, result) for r, result in enumerate(results) if result["reason"] is not None]
            if not refused:
                return name, passed_over
            r, result = refused[0]
            who = f"rank {r} ({'the leader of ' if result['leader'] else ''}node {result['node']})"
            more = f" (and {len(refused) - 1} more rank{'s' if len(refused) > 2 else ''})" if len(refused) > 1 else ""
            passed_over.append((name, f"on {who}{more}: {result['reason']}"))
        return None, passed_over


def group() -> Group:
    """This process's :class:`Group` (made once: every rank posts its node's name)."""
    global _group
    from torch.distributed import distributed_c10d as c10d

    if _group is None or _group.store_id != id(c10d._get_default_store()):  # a new process group
        _group = Group()
    return _group
