"""The one optimiser step of training: :class:`OptimiserStep`, which the engine runs for every batch and the
training-step measurement (:func:`measure_run_train_step`, timed by :func:`harness.measure.speed.time_train_step`)
times, so the reported training-step time is the engine's.

One call takes one batch: forward (under autocast for ``train.amp``), the weighted loss, its terms reduced
over the ranks and checked to be finite (every rank stops at the same iteration), backward of the loss
divided by the accumulation group's size (through the gradient scaler for fp16; DDP's all-reduce only on the
group's last batch). On the group's last batch it also takes the optimiser step: unscale, clip the gradient
norm to ``train.clip_max_norm``, step (the scaler's step for fp16), zero the gradients and step the
learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch

from harness.config import amp_dtype as amp_dtype_of
from harness.measure import speed
from harness.measure.inputs import fixed_size_input, synthetic_targets
from harness.provenance import current_device
from harness.run import distributed as dist_utils
from harness.run.evaluation import autocast
from harness.run.optim import build_optimizer, build_scheduler
from model import build_model


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch, iteration and loss terms."""


def to_device(targets, device):
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


class OptimiserStep:
    """``step(images, mask, targets, group_size, last_of_group)``: one batch of training (see the module's
    docstring); returns the batch's loss and loss terms, averaged over the ranks."""

    def __init__(
        self,
        model,
        criterion,
        optimizer,
        scheduler=None,
        scaler=None,
        amp_dtype=None,
        clip_max_norm: float = 0.0,
        device=None,
    ):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.scheduler, self.scaler, self.amp_dtype, self.clip_max_norm = scheduler, scaler, amp_dtype, clip_max_norm
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.needs_targets = getattr(getattr(model, "module", model), "needs_targets", False)
        self._checked_unused = False

    def __call__(
        self, images, mask, targets, group_size: int = 1, last_of_group: bool = True, where: str = ""
    ) -> Dict[str, float]:
        device, model = self.device, self.model
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = to_device(targets, device)
        sync = last_of_group or not hasattr(model, "no_sync")
        with autocast(device, self.amp_dtype), contextlib.nullcontext() if sync else model.no_sync():
            outputs = model(images, mask, targets=targets) if self.needs_targets else model(images, mask)
            loss_dict = self.criterion(outputs, targets)
            weight_dict = self.criterion.weight_dict
            loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
            # the check is on values reduced over ranks, so every rank stops at the same iteration
            values = {k: float(v.detach()) for k, v in loss_dict.items() if k in weight_dict}
            values["loss"] = float(loss.detach())
            values = dist_utils.reduce_mean(values, device=device if device.type == "cuda" else None)
            if not math.isfinite(values["loss"]):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if k != "loss")
                raise NonFiniteLossError(
                    f"non-finite loss {values['loss']} at {where or 'this step'} "
                    f"(loss terms: {terms}); stopping. The last good checkpoint is kept."
                )
            scaled = loss / group_size
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if last_of_group:
            self.update()
        return values

    def update(self) -> None:
        """The optimiser step on the accumulated gradients, then the schedule's."""
        optimizer, scaler = self.optimizer, self.scaler
        if not self._checked_unused and hasattr(self.model, "no_sync"):
            _check_all_parameters_used(self.model)
            self._checked_unused = True
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def build_step(model, criterion, train_cfg, device, total_batch: int, steps_per_epoch: int = 1) -> OptimiserStep:
    """The engine's optimiser (parameter groups), schedule, gradient scaler and step for ``train_cfg``."""
    optimizer = build_optimizer(model, train_cfg, total_batch)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch, total_batch)
    amp_dtype = amp_dtype_of(train_cfg.amp)
    scaler = torch.amp.GradScaler(torch.device(device).type) if amp_dtype == torch.float16 else None
    return OptimiserStep(model, criterion, optimizer, scheduler, scaler, amp_dtype, train_cfg.clip_max_norm, device)


def _check_all_parameters_used(ddp_model) -> None:
    """DDP without ``find_unused_parameters`` never reduces a bucket holding a parameter that got no
    gradient, and the ranks silently drift apart; say which parameters instead."""
    if getattr(ddp_model, "find_unused_parameters", False):
        return
    unused = [n for n, p in ddp_model.module.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        shown = ", ".join(unused[:6]) + (f", ... ({len(unused)} in all)" if len(unused) > 6 else "")
        raise RuntimeError(
            f"trainable parameters without a gradient under DDP: {shown}. Freeze them, drop them "
            "from the model, or set the model attribute ddp_find_unused_parameters = True"
        )


# ------------------------------------------------------------------------------------ measurement


def measure_run_train_step(
    run_cfg,
    device=None,
    amp: Optional[str] = None,
    batch_size: int = 2,
    image_size: Tuple[int, int] = (800, 1199),
    iters: int = 10,
    warmup: int = 3,
) -> dict:
    """Seconds per training iteration of ``run_cfg`` (the engine's :class:`OptimiserStep`, optimiser and
    schedule; no accumulation: one optimiser step per iteration) on a batch of ``batch_size`` 3 x H x W images
    with synthetic targets (the paper's training-time measurements use batch 2 per GPU); ``amp`` defaults to
    ``run_cfg.train.amp``. What :func:`harness.measure.speed.time_train_step` returns."""
    device = torch.device(device) if device else current_device()
    train_cfg = dataclasses.replace(run_cfg.train, amp=amp or run_cfg.train.amp)
    model_cfg = dataclasses.replace(run_cfg.model, pretrained_backbone=False, backbone_weights=None)
    model, criterion, _ = build_model(model_cfg)
    model, criterion = model.to(device), criterion.to(device)
    step = build_step(model, criterion, train_cfg, device, total_batch=batch_size)
    images = torch.cat([fixed_size_input(*image_size, seed=i)[0][0] for i in range(batch_size)])
    mask = torch.zeros((batch_size,) + tuple(image_size), dtype=torch.bool)
    targets: List[dict] = synthetic_targets(batch_size, num_classes=model_cfg.num_classes)
    return speed.time_train_step(step, images, mask, targets, amp=train_cfg.amp, iters=iters, warmup=warmup)
