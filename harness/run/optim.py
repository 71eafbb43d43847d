"""Optimiser and learning-rate schedule of a run, as its ``train`` section states them.

Parameter groups (as ``main.py`` of the official Deformable DETR builds them, by parameter name):

1. everything else: ``lr`` (2e-4);
2. the backbone trunk (names containing ``backbone.0``, or ``detector.backbone.body`` in the Faster R-CNN
   wrapper): ``lr_backbone`` (2e-5);
3. the linear projections predicting sampling offsets and reference points (names containing
   ``sampling_offsets`` or ``reference_points``): ``lr * lr_linear_proj_mult`` (2e-5).

Weight decay applies to all groups, as in the official code (and in Detectron2, whose only exception,
normalisation layers, has nothing to train here: the trunks use frozen BatchNorm). Frozen parameters are
left out.

Optimisers: ``adamw`` (the DETR family) or ``sgd`` with ``momentum`` (Detectron2's Faster R-CNN).

Schedule: one factor per optimiser step, so the engine steps the scheduler after every optimiser step.

- ``step``: x0.1 every ``lr_drop`` epochs (the official ``StepLR(lr_drop)``; one drop when
  ``lr_drop < epochs <= 2 * lr_drop``);
- ``multistep``: x0.1 at each epoch of ``lr_milestones``.

Drops fall on epoch boundaries: milestones are epochs, so a run keeps its schedule whatever its total
batch or number of GPUs. ``warmup_iters`` > 0 adds Detectron2's linear warm-up: the factor goes from
``warmup_factor`` at the first optimiser step to 1 at step ``warmup_iters``.

Linear scaling rule: with ``lr_reference_batch`` set, the learning rates are stated for that total batch
and multiplied by ``total_batch / lr_reference_batch``, and the warm-up (stated in steps at the
reference batch) is divided by the same ratio, so it covers the same number of images (as Detectron2
rescales a config for another batch).
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional

import torch

BACKBONE_NAMES = ("backbone.0", "detector.backbone.body")
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")
LR_GAMMA = 0.1  # each drop of the step and multistep schedules (official and Detectron2)


def _match(name: str, keys) -> bool:
    return any(k in name for k in keys)


def batch_scale(train_cfg, total_batch: Optional[int] = None) -> float:
    """``total_batch / lr_reference_batch`` (1 without a reference batch). ``total_batch`` is the batch one
    optimiser step sees (default: ``train.total_batch_size``)."""
    if train_cfg.lr_reference_batch is None:
        return 1.0
    total = train_cfg.total_batch_size if total_batch is None else total_batch
    return total / train_cfg.lr_reference_batch


def param_groups(model: torch.nn.Module, train_cfg, total_batch: Optional[int] = None) -> List[Dict]:
    scale = batch_scale(train_cfg, total_batch)
    lr, lr_backbone = train_cfg.lr * scale, train_cfg.lr_backbone * scale
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if _match(n, BACKBONE_NAMES) and not _match(n, LINEAR_PROJ_NAMES)]
    linear_proj = [p for n, p in named if _match(n, LINEAR_PROJ_NAMES)]
    ids = {id(p) for p in backbone + linear_proj}
    rest = [p for _, p in named if id(p) not in ids]
    groups = [
        dict(params=rest, lr=lr, name="default"),
        dict(params=backbone, lr=lr_backbone, name="backbone"),
        dict(params=linear_proj, lr=lr * train_cfg.lr_linear_proj_mult, name="linear_proj"),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, train_cfg, total_batch: Optional[int] = None) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`param_groups`; ``total_batch``: see :func:`batch_scale`."""
    groups = param_groups(model, train_cfg, total_batch)
    lr = groups[0]["lr"] if groups else train_cfg.lr
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"train.optimizer: got {train_cfg.optimizer!r}, expected 'adamw' or 'sgd'")


def warmup_steps(train_cfg, total_batch: Optional[int] = None) -> int:
    """Warm-up length in optimiser steps at this run's total batch."""
    if train_cfg.warmup_iters <= 0:
        return 0
    return max(1, round(train_cfg.warmup_iters / batch_scale(train_cfg, total_batch)))


def lr_factor(train_cfg, steps_per_epoch: int, total_batch: Optional[int] = None):
    """The schedule as a function: optimiser steps taken so far -> multiplier of each group's initial lr."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup = warmup_steps(train_cfg, total_batch)
    warmup_factor = train_cfg.warmup_factor
    milestones = sorted(train_cfg.lr_milestones)
    multistep = train_cfg.lr_schedule == "multistep"
    step_size = max(1, train_cfg.lr_drop)  # as StepLR(max(1, lr_drop)) before

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        drops = bisect.bisect_right(milestones, epoch) if multistep else epoch // step_size
        value = LR_GAMMA**drops
        if step < warmup:
            alpha = step / warmup
            value *= warmup_factor * (1 - alpha) + alpha
        return value

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg, steps_per_epoch: int = 1, total_batch: Optional[int] = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor`, to be stepped after every optimiser step.

    A ``LambdaLR`` over a plain function: its state (the step count) goes into checkpoints, the schedule
    itself always comes from the config, so a resumed run continues at the saved step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train_cfg, steps_per_epoch, total_batch))


def current_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
