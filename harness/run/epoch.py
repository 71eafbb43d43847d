"""One pass over the training data: :func:`train_one_epoch`, its batching (gradient accumulation to the
experiment's total batch), seeding, and the stop between optimiser steps. Each batch goes through the one
optimiser step of :mod:`harness.run.step`.

Batching: ``train.batch_size_per_gpu`` images per process and step; gradients are accumulated over
``round(total_batch_size / (batch_size_per_gpu * world_size))`` steps when ``train.accumulate_to_total`` is
set (:func:`accumulation_steps`), so a run on fewer GPUs keeps the paper's total batch of 32 (a warning says
when the effective total differs). ``train.max_iters_per_epoch`` counts loader steps.

Stopping: ``should_stop()`` is asked after every optimiser step (any rank saying yes stops all); the pass
then ends with :class:`_Stop`, whose iteration and loss sums the caller writes into a mid-epoch checkpoint.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch

from harness.run import checkpointing
from harness.run import distributed as dist_utils
from harness.run.optim import current_lrs
from harness.run.step import OptimiserStep


class _Stop(Exception):
    def __init__(self, iteration: int, sums: Dict[str, float]):
        super().__init__(iteration)
        self.iteration, self.sums = iteration, sums


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


def accumulation_steps(train_cfg, world_size: int, warn: bool = True) -> int:
    per_step = train_cfg.batch_size_per_gpu * world_size
    steps = max(1, round(train_cfg.total_batch_size / per_step)) if train_cfg.accumulate_to_total else 1
    effective = per_step * steps
    if warn and effective != train_cfg.total_batch_size:
        message = (
            f"effective total batch is {effective} ({train_cfg.batch_size_per_gpu} per process x "
            f"{world_size} processes x {steps} accumulation steps), not the experiment's "
            f"total_batch_size {train_cfg.total_batch_size}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if dist_utils.is_main_process():
            print(f"WARNING: {message}", flush=True)
    return steps


def steps_per_epoch(loader_len: int, train_cfg, accum_steps: int) -> int:
    """Optimiser steps in one epoch: loader steps (cut at ``max_iters_per_epoch``) in groups of
    ``accum_steps``, the last group possibly shorter (as :func:`train_one_epoch` steps)."""
    n_iters = loader_len if train_cfg.max_iters_per_epoch is None else min(loader_len, train_cfg.max_iters_per_epoch)
    return max(1, math.ceil(n_iters / accum_steps))


def train_one_epoch(
    step: OptimiserStep,
    loader,
    epoch: int,
    accum_steps: int = 1,
    max_iters: Optional[int] = None,
    tracker=None,
    should_stop: Optional[Callable[[], bool]] = None,
    resume_from: Optional[dict] = None,
) -> Dict[str, float]:
    """One pass over ``loader`` with ``step`` (:class:`~harness.run.step.OptimiserStep`: its optimiser step
    falls on the last batch of each group of ``accum_steps``); returns the epoch means of the weighted loss and
    its terms (all ranks).

    ``tracker`` (:class:`~harness.run.tracking.Tracker`) is told of every iteration (progress lines,
    TensorBoard). ``should_stop()`` is asked after every optimiser step (any rank saying yes stops all); the
    pass then ends with ``_Stop``. ``resume_from`` (``iteration``, this rank's ``rng`` state there, loss
    ``sums``) replays the loader up to that iteration without training, so the data and augmentation stay
    those of an uninterrupted epoch, then restores the generators and goes on.
    """
    step.model.train()
    step.criterion.train()
    device = step.device
    n_iters = len(loader) if max_iters is None else min(len(loader), max_iters)
    sums: Dict[str, float] = dict(resume_from["sums"]) if resume_from else {}
    skip = resume_from["iteration"] if resume_from else 0
    if tracker is not None:
        tracker.begin_epoch(epoch, n_iters, skip)
    step.optimizer.zero_grad(set_to_none=True)
    for it, (images, mask, targets) in enumerate(loader):
        if it >= n_iters:
            break
        if it < skip:
            if it == skip - 1 and resume_from.get("rng") is not None:
                checkpointing.set_rng_state(resume_from["rng"])
            continue
        group_start = (it // accum_steps) * accum_steps
        group_size = min(accum_steps, n_iters - group_start)
        last_of_group = it == group_start + group_size - 1
        values = step(images, mask, targets, group_size, last_of_group, where=f"epoch {epoch}, iteration {it}")
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if tracker is not None:
            tracker.iteration(it, values, sums, current_lrs(step.optimizer))
        if last_of_group and should_stop is not None and it + 1 < n_iters:
            flag = torch.tensor([1.0 if should_stop() else 0.0], device=device if device.type == "cuda" else None)
            if float(dist_utils.reduce_sum_tensor(flag)) > 0:
                raise _Stop(it + 1, sums)
    n = max(1, min(n_iters, len(loader)))
    return {k: v / n for k, v in sums.items()}
