"""Training and evaluation of one run: data -> model -> optimiser -> checkpoints -> COCO AP.

:func:`train` runs a whole training (resuming from the run folder's checkpoint when there is one),
:func:`evaluate` an evaluation-only run. Both work on one CPU process or under torch.distributed
(see :mod:`harness.run.distributed`).

Determinism and exact resume: the distributed sampler shuffles from ``(train.seed, epoch)`` and
each sample's augmentation is drawn from a generator seeded by ``(train.seed, epoch, dataset index)``
(:class:`harness.run.loaders.TrainSampler`), so neither depends on ``data.num_workers``; each epoch
starts by seeding Python, NumPy and torch (dropout, ...) from ``(train.seed, epoch, rank)``. So the
data order, the augmentation and dropout of epoch ``e`` do not depend on how many epochs this
process already ran. With the model, optimiser, scheduler and gradient-scaler states restored from
the checkpoint (which also carries the RNG states and sampler epoch), a run stopped after epoch ``e``
and resumed ends with the same weights as one that never stopped (bit-identical on CPU; on GPU up to
the non-determinism of CUDA kernels).

Batching: ``train.batch_size_per_gpu`` images per process and step; gradients are accumulated over
``round(total_batch_size / (batch_size_per_gpu * world_size))`` steps when
``train.accumulate_to_total`` is set, so a run on fewer GPUs keeps the paper's total batch of 32 (a
warning says when the effective total differs). ``train.max_iters_per_epoch`` counts loader steps.

Length: a little over 400 lines, because training and the evaluation-only entry share their set-up
(device, model, checkpoints, loaders) and splitting them would spread one flow over two files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import random
import shutil
import time
import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch

from harness.config import amp_dtype as amp_dtype_of
from harness.data import dataset_root
from harness.run import checkpointing
from harness.run import distributed as dist_utils
from harness.run.evaluation import autocast, run_evaluation
from harness.run.loaders import build_eval_loader, build_train_loader
from harness.run.optim import build_optimizer, build_scheduler, current_lrs
from harness.store.files import append_jsonl
from model import build_model
from model.checkpoint import load_checkpoint, load_state


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch, iteration and loss terms."""


class TrainingInterrupted(SystemExit):
    """``should_stop()`` asked to stop (pre-emption, time-out); a mid-epoch checkpoint was written and
    the next :func:`train` call carries on from it. A ``SystemExit``, so job code that marks failures
    on ``Exception`` leaves the run to its requeued attempt."""


class _Stop(Exception):
    def __init__(self, iteration: int, sums: Dict[str, float]):
        super().__init__(iteration)
        self.iteration, self.sums = iteration, sums


# ----------------------------------------------------------------------------------------- set-up

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


def _model_num_classes(run_cfg) -> Optional[int]:
    return getattr(run_cfg.model, "num_classes", None)


def check_output_dir(output_dir: str, model: Optional[torch.nn.Module] = None) -> None:
    """A clear error now, not after an epoch, for an unwritable folder or one without room for checkpoints."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"results folder {output_dir} is not writable: {e}") from None
    if model is not None:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        need = 2 * 3 * params + (64 << 20)       # two checkpoints of weights + two Adam moments, and slack
        free = shutil.disk_usage(output_dir).free
        if free < need:
            raise OSError(f"not enough disk space in {output_dir}: {free / 2**20:.0f} MiB free, checkpoints need "
                          f"about {need / 2**20:.0f} MiB")


def _build_model(run_cfg, device):
    model, criterion, postprocessor = build_model(run_cfg.model, num_detections=run_cfg.eval.num_detections)
    return model.to(device), criterion.to(device), postprocessor


def _to_device(targets, device):
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def _default_log_fn(output_dir: str) -> Callable[[dict], None]:
    return lambda record: append_jsonl(os.path.join(output_dir, "log.jsonl"), record)


def _silent(*args, **kwargs):
    pass


def _fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


# --------------------------------------------------------------------------------------- training

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


def train(run_cfg, output_dir: str, log_fn: Optional[Callable[[dict], None]] = None, resume: bool = True,
          print_fn: Callable[[str], None] = print, should_stop: Optional[Callable[[], bool]] = None
          ) -> Dict[str, float]:
    """Train ``run_cfg`` into ``output_dir`` and evaluate it; returns the final metrics (every rank).

    With ``eval.eval_only`` it only evaluates ``eval.checkpoint`` (see :func:`evaluate`).
    Resumes from ``output_dir``'s checkpoint when ``resume`` (falling back to the previous one if the
    newest is corrupt). Without one, ``eval.checkpoint`` (if set) initialises the weights. Writes
    ``checkpoint.pth`` after every epoch, calls ``log_fn(record)`` on rank 0 once per epoch (default:
    append to ``<output_dir>/log.jsonl``) and saves the COCO results JSON of each evaluation.
    ``should_stop`` (e.g. "SLURM sent its pre-emption signal") is polled after every optimiser step;
    when it says yes, a mid-epoch checkpoint is written and :class:`TrainingInterrupted` raised; the
    next call resumes there, with the same final weights as a run that never stopped.
    Call :func:`harness.run.distributed.init_distributed` first for multi-process runs.
    """
    train_cfg, eval_cfg = run_cfg.train, run_cfg.eval
    if eval_cfg.eval_only:
        metrics = evaluate(run_cfg, output_dir, checkpoint=eval_cfg.checkpoint, print_fn=print_fn)
        if dist_utils.is_main_process():
            (log_fn or _default_log_fn(output_dir))(dict(epoch=None, eval_only=True, **metrics))
        return dict(metrics, epochs=0)
    verbose = print_fn is not None
    print_fn = print_fn or _silent
    main = dist_utils.is_main_process()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if main:
        check_output_dir(output_dir)
    if log_fn is None and main:
        log_fn = _default_log_fn(output_dir)
    amp_dtype = amp_dtype_of(train_cfg.amp)

    seed_everything(train_cfg.seed + rank)
    root = dataset_root(run_cfg.data, output_dir)
    num_classes = _model_num_classes(run_cfg)
    train_set, sampler, train_loader = build_train_loader(run_cfg, root, num_classes)
    val_set, val_loader = build_eval_loader(run_cfg, root, num_classes=num_classes)
    annotated = getattr(val_set, "has_annotations", True)

    model, criterion, postprocessor = _build_model(run_cfg, device)
    if main:
        check_output_dir(output_dir, model)
        n_params = sum(p.numel() for p in model.parameters())
        print_fn(f"model: {n_params:,} parameters; train {len(train_set)} images, eval {len(val_set)} images; "
                 f"world size {world}, device {device}")
    accum = accumulation_steps(train_cfg, world)
    total_batch = train_cfg.batch_size_per_gpu * world * accum
    optimizer = build_optimizer(model, train_cfg, total_batch)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch(len(train_loader), train_cfg, accum),
                                total_batch)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, partial = 0, None
    found = checkpointing.load_latest(output_dir, log=print_fn if main else None) if resume else None
    if found is not None:
        state, path = found
        load_state(model, state["model"], path)
        optimizer.load_state_dict(state["optimizer"])
        if "lr_lambdas" not in state["lr_scheduler"]:     # an epoch-stepped StepLR of an earlier version
            raise checkpointing.CheckpointError(path, "its learning-rate schedule was stepped per epoch; this "
                                                "version steps per optimiser step: start the run afresh")
        scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("rng") is not None:
            checkpointing.set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        partial = state.get("partial")
        if main:
            where = f"epoch {partial['epoch']}, iteration {partial['iteration']}" if partial else \
                f"the end of epoch {state['epoch']}"
            print_fn(f"resumed from {path} at {where}")
    elif eval_cfg.checkpoint:
        load_checkpoint(eval_cfg.checkpoint, model)

    model_without_ddp = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(model, "ddp_find_unused_parameters", False))

    metrics: Dict[str, float] = {}
    last_eval_epoch = -1
    for epoch in range(start_epoch, train_cfg.epochs):
        seed_everything(epoch_seed(train_cfg.seed, epoch, rank))
        sampler.set_epoch(epoch)
        t0 = time.time()
        lrs = current_lrs(optimizer)
        resume_from = None
        if partial is not None and partial["epoch"] == epoch:
            rngs = partial["rng"]
            resume_from = dict(iteration=partial["iteration"], sums=partial["sums"],
                               rng=rngs[rank] if len(rngs) == world else None)
        try:
            losses = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, train_cfg, accum,
                                     scaler, amp_dtype, train_cfg.max_iters_per_epoch, print_fn if verbose else None,
                                     should_stop=should_stop, resume_from=resume_from, scheduler=scheduler)
        except _Stop as stop:
            rngs = dist_utils.all_gather_object(checkpointing.rng_state())
            if main:
                checkpointing.save_checkpoint(output_dir, dict(
                    model=model_without_ddp.state_dict(), optimizer=optimizer.state_dict(),
                    lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                    epoch=epoch - 1, rng=rngs[0], sampler=dict(epoch=epoch, seed=train_cfg.seed),
                    partial=dict(epoch=epoch, iteration=stop.iteration, rng=rngs, sums=stop.sums),
                    world_size=world, accumulation_steps=accum, config=_config_dict(run_cfg)))
                print_fn(f"stopped at epoch {epoch}, iteration {stop.iteration}: checkpoint saved")
            dist_utils.barrier()
            raise TrainingInterrupted(f"training stopped at epoch {epoch}, iteration {stop.iteration}; "
                                      f"a checkpoint was saved in {output_dir}") from None
        partial = None
        train_time = time.time() - t0
        if main:
            checkpointing.save_checkpoint(output_dir, dict(
                model=model_without_ddp.state_dict(), optimizer=optimizer.state_dict(),
                lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                epoch=epoch, rng=checkpointing.rng_state(), sampler=dict(epoch=epoch + 1, seed=train_cfg.seed),
                world_size=world, accumulation_steps=accum, config=_config_dict(run_cfg)))
        dist_utils.barrier()
        record = dict(epoch=epoch, **{f"train_{k}": v for k, v in losses.items()}, **lrs,
                      epoch_time_s=round(train_time, 3))
        last = epoch == train_cfg.epochs - 1
        # a split without annotations (test-dev) has no metrics to follow: it is evaluated once, at the end
        periodic = train_cfg.eval_every > 0 and (epoch + 1) % train_cfg.eval_every == 0 and annotated
        if last or periodic:
            t1 = time.time()
            metrics = run_evaluation(model_without_ddp, postprocessor, val_loader, val_set, device, eval_cfg,
                                     run_cfg.data, _results_file(output_dir, run_cfg, eval_cfg), amp_dtype,
                                     verbose=verbose)
            record.update(metrics, eval_time_s=round(time.time() - t1, 3))
            last_eval_epoch = epoch
        if main:
            print_fn(f"epoch {epoch} done in {_fmt_eta(train_time)}: " +
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
            if log_fn is not None:
                log_fn(record)
    if last_eval_epoch != train_cfg.epochs - 1:      # already finished before (resumed at the end)
        metrics = run_evaluation(model_without_ddp, postprocessor, val_loader, val_set, device, eval_cfg,
                                 run_cfg.data, _results_file(output_dir, run_cfg, eval_cfg), amp_dtype,
                                 verbose=verbose)
    return dict(metrics, epochs=train_cfg.epochs)


def _config_dict(run_cfg):
    try:
        return dataclasses.asdict(run_cfg)
    except TypeError:
        return None


def _results_file(output_dir, run_cfg, eval_cfg):
    if not eval_cfg.save_detections or output_dir is None:
        return None
    return os.path.join(output_dir, f"detections_{run_cfg.data.val_split}.json")


# ------------------------------------------------------------------------------------- evaluation

def evaluate(run_cfg, output_dir: Optional[str] = None, model: Optional[torch.nn.Module] = None,
             postprocessor=None, checkpoint: Optional[str] = None, split: Optional[str] = None,
             print_fn: Callable[[str], None] = print) -> Dict[str, float]:
    """Evaluation-only run: COCO metrics of ``model`` (or a model built from ``run_cfg.model`` with the
    weights of ``checkpoint`` / ``eval.checkpoint`` / ``output_dir``'s latest checkpoint) on ``split``
    (default ``data.val_split``). The COCO results JSON goes to ``output_dir``; for a split without
    annotations (test-dev) that file is the result and the metrics are empty."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    verbose = print_fn is not None
    print_fn = print_fn or _silent
    if output_dir is not None and dist_utils.is_main_process():
        check_output_dir(output_dir)
    root = dataset_root(run_cfg.data, output_dir)
    dataset, loader = build_eval_loader(run_cfg, root, split, num_classes=_model_num_classes(run_cfg))
    if model is None:
        model, _, postprocessor = _build_model(run_cfg, device)
        path = checkpoint or run_cfg.eval.checkpoint
        if path:
            load_checkpoint(path, model)
        else:
            found = checkpointing.load_latest(output_dir, log=print_fn) if output_dir is not None else None
            if found is None:
                raise checkpointing.CheckpointError(output_dir or "eval.checkpoint",
                                                    "nothing to evaluate: no checkpoint given or found")
            state, path = found
            load_state(model, state["model"], path)
        if dist_utils.is_main_process():
            print_fn(f"evaluating {path} on {split or run_cfg.data.val_split}")
    elif postprocessor is None:
        raise ValueError("evaluate(model=...) needs its postprocessor too")
    run_name = split or run_cfg.data.val_split
    results_file = (os.path.join(output_dir, f"detections_{run_name}{'_tta' if run_cfg.eval.tta else ''}.json")
                    if output_dir is not None and run_cfg.eval.save_detections else None)
    return run_evaluation(model.to(device), postprocessor, loader, dataset, device, run_cfg.eval, run_cfg.data,
                          results_file, amp_dtype_of(run_cfg.train.amp), verbose=verbose)


__all__ = ["train", "evaluate", "train_one_epoch", "accumulation_steps", "NonFiniteLossError", "seed_everything"]
