"""One pass over the training data: :func:`train_one_epoch`, its batching (gradient accumulation to the
experiment's total batch), seeding, and the stop between optimiser steps.

Batching: ``train.batch_size_per_gpu`` images per process and step; gradients are accumulated over
``round(total_batch_size / (batch_size_per_gpu * world_size))`` steps when ``train.accumulate_to_total`` is
set (:func:`accumulation_steps`), so a run on fewer GPUs keeps the paper's total batch of 32 (a warning says
when the effective total differs). ``train.max_iters_per_epoch`` counts loader steps.

Stopping: ``should_stop()`` is asked after every optimiser step (any rank saying yes stops all); the pass
then ends with :class:`_Stop`, whose iteration and loss sums the caller writes into a mid-epoch checkpoint.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import random
import time
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch

from harness.run import checkpointing
from harness.run import distributed as dist_utils
from harness.run.evaluation import autocast


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch, iteration and loss terms."""


class _Stop(Exception):
    def __init__(self, iteration: int, sums: Dict[str, float]):
        super().__init__(iteration)
        self.iteration, self.sums = iteration, sums


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2 ** 63


def accumulation_steps(train_cfg, world_size: int, warn: bool = True) -> int:
    per_step = train_cfg.batch_size_per_gpu * world_size
    steps = max(1, round(train_cfg.total_batch_size / per_step)) if train_cfg.accumulate_to_total else 1
    effective = per_step * steps
    if warn and effective != train_cfg.total_batch_size:
        message = (f"effective total batch is {effective} ({train_cfg.batch_size_per_gpu} per process x "
                   f"{world_size} processes x {steps} accumulation steps), not the experiment's "
                   f"total_batch_size {train_cfg.total_batch_size}")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if dist_utils.is_main_process():
            print(f"WARNING: {message}", flush=True)
    return steps


def steps_per_epoch(loader_len: int, train_cfg, accum_steps: int) -> int:
    """Optimiser steps in one epoch: loader steps (cut at ``max_iters_per_epoch``) in groups of
    ``accum_steps``, the last group possibly shorter (as :func:`train_one_epoch` steps)."""
    n_iters = loader_len if train_cfg.max_iters_per_epoch is None else min(loader_len, train_cfg.max_iters_per_epoch)
    return max(1, math.ceil(n_iters / accum_steps))


def _to_device(targets, device):
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def _fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def train_one_epoch(model, criterion, loader, optimizer, device, epoch: int, train_cfg, accum_steps: int = 1,
                    scaler=None, amp_dtype=None, max_iters: Optional[int] = None, print_fn=print,
                    should_stop: Optional[Callable[[], bool]] = None, resume_from: Optional[dict] = None,
                    scheduler=None) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch means of the weighted loss and its terms (all ranks).

    ``scheduler`` (if given) is stepped after every optimiser step: warm-up changes the learning rate
    within an epoch, and the schedule's step count is what checkpoints save.

    ``should_stop()`` is asked after every optimiser step (any rank saying yes stops all); the pass then
    ends with ``_Stop``. ``resume_from`` (``iteration``, this rank's ``rng`` state there, loss ``sums``)
    replays the loader up to that iteration without training, so the data and augmentation stay those
    of an uninterrupted epoch, then restores the generators and goes on.
    """
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    needs_targets = getattr(getattr(model, "module", model), "needs_targets", False)
    n_iters = len(loader) if max_iters is None else min(len(loader), max_iters)
    sums: Dict[str, float] = dict(resume_from["sums"]) if resume_from else {}
    skip = resume_from["iteration"] if resume_from else 0
    start = time.time()
    optimizer.zero_grad(set_to_none=True)
    for it, (images, mask, targets) in enumerate(loader):
        if it >= n_iters:
            break
        if it < skip:
            if it == skip - 1 and resume_from.get("rng") is not None:
                checkpointing.set_rng_state(resume_from["rng"])
            continue
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = _to_device(targets, device)
        group_start = (it // accum_steps) * accum_steps
        group_size = min(accum_steps, n_iters - group_start)
        last_of_group = it == group_start + group_size - 1
        sync = last_of_group or not hasattr(model, "no_sync")
        with autocast(device, amp_dtype), (contextlib.nullcontext() if sync else model.no_sync()):
            outputs = model(images, mask, targets=targets) if needs_targets else model(images, mask)
            loss_dict = criterion(outputs, targets)
            loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
            # the check is on values reduced over ranks, so every rank stops at the same iteration
            values = {k: float(v.detach()) for k, v in loss_dict.items() if k in weight_dict}
            values["loss"] = float(loss.detach())
            values = dist_utils.reduce_mean(values, device=device if device.type == "cuda" else None)
            if not math.isfinite(values["loss"]):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if k != "loss")
                raise NonFiniteLossError(f"non-finite loss {values['loss']} at epoch {epoch}, iteration {it} "
                                         f"(loss terms: {terms}); stopping. The last good checkpoint is kept.")
            scaled = loss / group_size
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if last_of_group:
            if it + 1 == group_size and hasattr(model, "no_sync"):
                _check_all_parameters_used(model)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if train_cfg.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_max_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if last_of_group and should_stop is not None and it + 1 < n_iters:
            flag = torch.tensor([1.0 if should_stop() else 0.0], device=device if device.type == "cuda" else None)
            if float(dist_utils.reduce_sum_tensor(flag)) > 0:
                raise _Stop(it + 1, sums)
        if print_fn is not None and dist_utils.is_main_process() and (
                it % max(1, train_cfg.print_freq) == 0 or it == n_iters - 1):
            elapsed = time.time() - start
            eta = elapsed / (it + 1 - skip) * (n_iters - it - 1)
            print_fn(f"epoch {epoch} [{it + 1}/{n_iters}] loss {values['loss']:.4f} "
                     f"(mean {sums['loss'] / (it + 1):.4f}) lr {optimizer.param_groups[0]['lr']:.2e} "
                     f"eta {_fmt_eta(eta)}")
    n = max(1, min(n_iters, len(loader)))
    return {k: v / n for k, v in sums.items()}


def _check_all_parameters_used(ddp_model) -> None:
    """DDP without ``find_unused_parameters`` never reduces a bucket holding a parameter that got no
    gradient, and the ranks silently drift apart; say which parameters instead."""
    if getattr(ddp_model, "find_unused_parameters", False):
        return
    unused = [n for n, p in ddp_model.module.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        shown = ", ".join(unused[:6]) + (f", ... ({len(unused)} in all)" if len(unused) > 6 else "")
        raise RuntimeError(f"trainable parameters without a gradient under DDP: {shown}. Freeze them, drop them "
                           "from the model, or set the model attribute ddp_find_unused_parameters = True")
