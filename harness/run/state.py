"""A training's state while it runs (:class:`Training`) and what makes it resumable: restoring the run folder's
checkpoint (:func:`resume`), the checkpoints written at the end of an epoch (:func:`checkpoint_epoch`) and on a
stop request mid-epoch (:func:`checkpoint_stop`), each a :func:`snapshot` of the model, optimiser, schedule,
gradient scaler, generators and sampler. Built and driven by :mod:`harness.run.engine`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from harness.run import checkpointing
from harness.run import distributed as dist_utils
from harness.run.step import OptimiserStep
from harness.run.tracking import Tracker
from model.checkpoint import load_checkpoint, load_state
from model.released import local_file


@dataclasses.dataclass
class Training:
    """What one training holds while it runs (built by :func:`harness.run.engine._set_up`)."""

    cfg: object
    output_dir: str
    device: torch.device
    main: bool
    rank: int
    world: int
    model: torch.nn.Module  # DistributedDataParallel around model_without_ddp when world > 1
    model_without_ddp: torch.nn.Module
    postprocessor: object
    step: OptimiserStep
    sampler: object
    train_loader: object
    val_set: object
    val_loader: object
    accum: int
    log_fn: Optional[Callable[[dict], None]]
    print_fn: Callable[[str], None]
    verbose: bool
    should_stop: Optional[Callable[[], bool]]
    tracker: Optional[Tracker] = None

    @property
    def iters_per_epoch(self) -> int:
        limit = self.cfg.train.max_iters_per_epoch
        return len(self.train_loader) if limit is None else min(len(self.train_loader), limit)

    def evaluates(self, epoch: int) -> bool:
        """Whether ``epoch`` ends with an evaluation: every ``eval_every`` epochs and the last; a split without
        annotations (test-dev) has no metrics to follow: it is evaluated once, at the end."""
        train_cfg = self.cfg.train
        return (
            epoch == train_cfg.epochs - 1
            or train_cfg.eval_every > 0
            and (epoch + 1) % train_cfg.eval_every == 0
            and getattr(self.val_set, "has_annotations", True)
        )


def resume(t: Training, enabled: bool = True):
    """Restore the run folder's latest checkpoint (else ``eval.checkpoint``'s weights, if set); returns
    ``(start_epoch, partial, pending)``: the epoch to train next, the stopped epoch's state (mid-epoch
    checkpoint) and the finished epoch whose record may not be logged yet (stopped in its evaluation)."""
    step = t.step
    found = checkpointing.load_latest(t.output_dir, log=t.print_fn if t.main else None) if enabled else None
    if found is None:
        if t.cfg.eval.checkpoint:
            load_checkpoint(local_file(t.cfg.eval.checkpoint, t.cfg.eval.checkpoint_sha256), t.model_without_ddp)
        return 0, None, None
    state, path = found
    load_state(t.model_without_ddp, state["model"], path)
    step.optimizer.load_state_dict(state["optimizer"])
    if "lr_lambdas" not in state["lr_scheduler"]:  # an epoch-stepped StepLR of an earlier version
        raise checkpointing.CheckpointError(
            path,
            "its learning-rate schedule was stepped per epoch; this "
            "version steps per optimiser step: start the run afresh",
        )
    step.scheduler.load_state_dict(state["lr_scheduler"])
    if step.scaler is not None and state.get("scaler"):
        step.scaler.load_state_dict(state["scaler"])
    if state.get("rng") is not None:
        checkpointing.set_rng_state(state["rng"])
    partial = state.get("partial")
    pending = None if partial else state.get("pending")  # the epoch's record, maybe not logged yet
    if t.main:
        where = (
            f"epoch {partial['epoch']}, iteration {partial['iteration']}"
            if partial
            else f"the end of epoch {state['epoch']}"
        )
        t.print_fn(f"resumed from {path} at {where}")
    return state["epoch"] + 1, partial, pending


def distribute(t: Training) -> None:
    if t.world > 1:
        t.model = t.step.model = torch.nn.parallel.DistributedDataParallel(
            t.model_without_ddp,
            device_ids=[t.device.index] if t.device.type == "cuda" else None,
            find_unused_parameters=getattr(t.model_without_ddp, "ddp_find_unused_parameters", False),
        )


def snapshot(t: Training, epoch: int, rng, sampler_epoch: int, **extra) -> dict:
    step = t.step
    return dict(
        model=t.model_without_ddp.state_dict(),
        optimizer=step.optimizer.state_dict(),
        lr_scheduler=step.scheduler.state_dict(),
        scaler=step.scaler.state_dict() if step.scaler is not None else None,
        epoch=epoch,
        rng=rng,
        sampler=dict(epoch=sampler_epoch, seed=t.cfg.train.seed),
        world_size=t.world,
        accumulation_steps=t.accum,
        config=config_dict(t.cfg),
        **extra,
    )


def checkpoint_epoch(t: Training, record: dict, evaluate: bool) -> None:
    """The end-of-epoch checkpoint, holding the epoch's record until it is logged (``pending``)."""
    if t.main:
        checkpointing.save_checkpoint(
            t.output_dir,
            snapshot(
                t,
                record["epoch"],
                checkpointing.rng_state(),
                record["epoch"] + 1,
                pending=dict(record=record, evaluate=evaluate),
            ),
        )
    dist_utils.barrier()


def config_dict(run_cfg):
    try:
        return dataclasses.asdict(run_cfg)
    except TypeError:
        return None


def checkpoint_stop(t: Training, epoch: int, iteration: int, sums: dict) -> None:
    """The mid-epoch checkpoint of a stop request after ``iteration`` iterations of ``epoch`` (every rank's
    generators, the epoch's loss sums so far)."""
    rngs = dist_utils.all_gather_object(checkpointing.rng_state())
    if t.main:
        checkpointing.save_checkpoint(
            t.output_dir,
            snapshot(t, epoch - 1, rngs[0], epoch, partial=dict(epoch=epoch, iteration=iteration, rng=rngs, sums=sums)),
        )
        t.print_fn(f"stopped at epoch {epoch}, iteration {iteration}: checkpoint saved")
    dist_utils.barrier()
