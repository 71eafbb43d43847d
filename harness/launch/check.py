"""A tiny resumable distributed job: checks a launcher end to end without the detector.

``toy_train(spec)`` runs ``spec["epochs"]`` epochs; in each, every rank draws a seeded vector, the
vectors are summed with a gloo ``all_reduce`` and folded into a state; rank 0 writes a checkpoint after
every epoch (atomically) and the next attempt resumes from it. The result depends only on the seed,
the number of epochs and the world size, so a run interrupted and requeued any number of times gives
what :func:`expected_state` computes. Like the training engine, it stops after an epoch when the job is asked to
(a stop signal: pre-emption, time-out, requeue), so that the requeued job resumes from that epoch.

    python -m harness.launch.check [--executor auto|slurm|local] [--tasks 2] [--epochs 3] DIR

submits one such job and prints its result: a quick check that SLURM, submitit, the code snapshot and
torch.distributed work together on a cluster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from harness.config import EXECUTORS, LauncherConfig
from harness.launch.slurm import wait
from harness.launch.submit import submit
from harness.launch.wrapper import stop_requested

STATE_SIZE = 4


def _draw(seed: int, epoch: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(seed * 100003 + epoch * 101 + rank)
    return torch.rand(STATE_SIZE, generator=g, dtype=torch.float64)


def expected_state(seed: int, epochs: int, world_size: int) -> List[float]:
    """The final state of an uninterrupted run, computed here without any process group."""
    import torch

    state = torch.zeros(STATE_SIZE, dtype=torch.float64)
    for epoch in range(epochs):
        total = sum(_draw(seed, epoch, rank) for rank in range(world_size))
        state = 0.5 * state + total
    return state.tolist()


def _append(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def task_info(spec: Any) -> Dict[str, Any]:
    """What a task sees: its ranks and rendezvous (as exported by the launcher), code and folders."""
    if isinstance(spec, dict) and spec.get("fail"):
        raise ValueError(f"asked to fail: {spec['fail']}")
    keys = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "HARNESS_CODE_SNAPSHOT",
        "HARNESS_SUBMIT_CWD",
    )
    return {
        "spec": spec,
        "env": {k: os.environ.get(k) for k in keys},
        "cwd": os.getcwd(),
        "module": __file__,
        "pid": os.getpid(),
    }


def toy_train(spec: Dict[str, Any]) -> Dict[str, Any]:
    """spec: ``out_dir`` (shared folder), ``epochs``, ``seed``, ``sleep_s`` (per epoch)."""
    import torch
    import torch.distributed as dist

    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group(
            "gloo", init_method="env://", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=5)
        )
    try:
        ckpt = out / "checkpoint.pt"
        state = torch.zeros(STATE_SIZE, dtype=torch.float64)
        start = 0
        if ckpt.exists():
            saved = torch.load(ckpt, weights_only=True)
            state, start = saved["state"], int(saved["epoch"]) + 1
        if rank == 0:
            _append(
                out / "attempts.jsonl",
                {
                    "start_epoch": start,
                    "world_size": world_size,
                    "job_id": os.environ.get("SLURM_JOB_ID"),
                    "restarts": os.environ.get("SLURM_RESTART_COUNT", "0"),
                    "code": os.environ.get("HARNESS_CODE_SNAPSHOT"),
                    "module": __file__,
                    "time": time.time(),
                },
            )
        for epoch in range(start, int(spec["epochs"])):
            time.sleep(float(spec.get("sleep_s", 0.0)))
            x = _draw(int(spec["seed"]), epoch, rank)
            if world_size > 1:
                dist.all_reduce(x)
            state = 0.5 * state + x
            if rank == 0:
                tmp = out / "checkpoint.pt.tmp"
                torch.save({"state": state, "epoch": epoch}, tmp)
                os.replace(tmp, ckpt)
                _append(out / "epochs.jsonl", {"epoch": epoch, "time": time.time()})
            # asked to stop (pre-emption, requeue): every rank agrees, then exits after its checkpoint as the
            # training engine does; the requeued job resumes from it
            stop = torch.tensor([float(stop_requested())], dtype=torch.float64)
            if world_size > 1:
                dist.all_reduce(stop)
            if stop.item() > 0 and epoch + 1 < int(spec["epochs"]):
                raise SystemExit(f"stopped on request after epoch {epoch}")
            if world_size > 1:
                dist.barrier()
        return {
            "state": state.tolist(),
            "world_size": world_size,
            "rank": rank,
            "start_epoch": start,
            "epochs": int(spec["epochs"]),
            "cwd": os.getcwd(),
            "module": __file__,
            "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
            "node": os.environ.get("SLURMD_NODENAME"),
        }
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a folder every node can reach")
    parser.add_argument("--executor", default="auto", choices=EXECUTORS)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--partition")
    parser.add_argument("--timeout-min", type=int, default=10)
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    cfg = LauncherConfig(
        partition=args.partition,
        gpus_per_node=0,
        tasks_per_node=args.tasks,
        cpus_per_task=1,
        timeout_min=args.timeout_min,
        mem_gb=None,
    )
    spec = {"out_dir": str(root / f"run-{int(time.time())}"), "epochs": args.epochs, "seed": 0, "sleep_s": 1.0}
    from harness.launch.check import toy_train as fn  # by reference (not __main__), so the snapshot runs it

    (job,) = submit(
        [spec],
        fn,
        cfg,
        root / "logs",
        executor=args.executor,
        job_name="launch-check",
        snapshot_root=root / ".snapshots",
    )
    print(f"submitted {job.job_id}; waiting", flush=True)
    ((outcome, value),) = wait([job], timeout_s=args.timeout_min * 60)
    if outcome != "success":
        print(f"failed: {value}", file=sys.stderr)
        return 1
    want = expected_state(0, args.epochs, args.tasks)
    ok = all(abs(a - b) < 1e-9 for a, b in zip(value["state"], want))
    print(json.dumps({**value, "expected": want, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
