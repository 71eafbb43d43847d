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

The steps of :func:`train`: set-up (:func:`_set_up`: seeds, data, model, the optimiser step), resume
(:func:`harness.run.state.resume`), then per epoch: one pass over the data (:func:`_train_epoch`, through
:func:`harness.run.epoch.train_one_epoch`, its batching and gradient accumulation, and the one optimiser step of
:mod:`harness.run.step`), its checkpoint (:func:`harness.run.state.checkpoint_epoch`), its evaluation and log
record (:func:`_finish_epoch`); and the final evaluation. Progress lines, TensorBoard and W&B:
:mod:`harness.run.tracking`.

Stopping: ``should_stop()`` (a stop signal: :mod:`harness.launch.wrapper`) is polled after every optimiser
step and before every evaluation batch. Mid-epoch, a checkpoint of the iteration is written; in an
evaluation, the epoch's checkpoint is complete already and holds the epoch's record (``pending``), so a
resumed run that finds that record missing from ``log.jsonl`` evaluates and logs the epoch first.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Dict, Optional

import torch

from harness.config import amp_dtype as amp_dtype_of
from harness.data import dataset_root
from harness.launch.wrapper import JobInterrupted
from harness.provenance import current_device
from harness.run import checkpointing, state
from harness.run import distributed as dist_utils
from harness.run.checkpointing import check_output_dir
from harness.run.epoch import _Stop, accumulation_steps, epoch_seed, seed_everything, steps_per_epoch, train_one_epoch
from harness.run.evaluation import EvaluationInterrupted, detections_file, run_evaluation
from harness.run.loaders import build_eval_loader, build_train_loader
from harness.run.optim import current_lrs
from harness.run.state import Training, config_dict
from harness.run.step import NonFiniteLossError, OptimiserStep, build_step  # noqa: F401 (re-exported)
from harness.run.tracking import Tracker, ap_text
from harness.store.files import append_jsonl
from model import build_model
from model.checkpoint import load_checkpoint, load_state
from model.released import local_file


class TrainingInterrupted(JobInterrupted):
    """``should_stop()`` asked to stop (Ctrl-C, a cancel, pre-emption, time-out); a checkpoint was written and
    the next :func:`train` call carries on from it. A ``SystemExit``, so job code that marks failures
    on ``Exception`` leaves the run to its next attempt."""


# ----------------------------------------------------------------------------------------- set-up


def _model_num_classes(run_cfg) -> Optional[int]:
    return getattr(run_cfg.model, "num_classes", None)


def _build_model(run_cfg, device):
    model, criterion, postprocessor = build_model(run_cfg.model, num_detections=run_cfg.eval.num_detections)
    return model.to(device), criterion.to(device), postprocessor


def _default_log_fn(output_dir: str) -> Callable[[dict], None]:
    return lambda record: append_jsonl(os.path.join(output_dir, "log.jsonl"), record)


def _logged_epochs(output_dir: str) -> set:
    """The epochs ``<output_dir>/log.jsonl`` has a record of (a job's log_fn writes there too)."""
    try:
        with open(os.path.join(output_dir, "log.jsonl"), encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return set()
    epochs = set()
    for line in lines:
        with contextlib.suppress(ValueError, AttributeError):
            epochs.add(json.loads(line).get("epoch"))
    return epochs


def _silent(*args, **kwargs):
    pass


def _print(text: str) -> None:
    print(text, flush=True)  # a job's stdout is its log: each line there as it is printed


# --------------------------------------------------------------------------------------- training


def _set_up(run_cfg, output_dir, log_fn, print_fn, should_stop) -> Training:
    """Seeds, data, model, optimiser step; checks the output folder (rank 0)."""
    train_cfg = run_cfg.train
    verbose = print_fn is not None
    print_fn = print_fn or _silent
    main = dist_utils.is_main_process()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    device = current_device()
    if main:
        check_output_dir(output_dir)
    if log_fn is None and main:
        log_fn = _default_log_fn(output_dir)

    seed_everything(train_cfg.seed + rank)
    root = dataset_root(run_cfg.data, output_dir)
    num_classes = _model_num_classes(run_cfg)
    train_set, sampler, train_loader = build_train_loader(run_cfg, root, num_classes)
    val_set, val_loader = build_eval_loader(run_cfg, root, num_classes=num_classes)

    model, criterion, postprocessor = _build_model(run_cfg, device)
    if main:
        check_output_dir(output_dir, model)
        n_params = sum(p.numel() for p in model.parameters())
        print_fn(
            f"model: {n_params:,} parameters; train {len(train_set)} images, eval {len(val_set)} images; "
            f"world size {world}, device {device}"
        )
    accum = accumulation_steps(train_cfg, world)
    total_batch = train_cfg.batch_size_per_gpu * world * accum
    step = build_step(
        model, criterion, train_cfg, device, total_batch, steps_per_epoch(len(train_loader), train_cfg, accum)
    )
    return Training(
        run_cfg,
        output_dir,
        device,
        main,
        rank,
        world,
        model,
        model,
        postprocessor,
        step,
        sampler,
        train_loader,
        val_set,
        val_loader,
        accum,
        log_fn,
        print_fn,
        verbose,
        should_stop,
    )


def _train_epoch(t: Training, epoch: int, partial: Optional[dict]) -> dict:
    """One epoch (from a mid-epoch checkpoint's iteration when ``partial`` is of this epoch); returns its record.
    A stop request writes a mid-epoch checkpoint and raises :class:`TrainingInterrupted`."""
    seed_everything(epoch_seed(t.cfg.train.seed, epoch, t.rank))
    t.sampler.set_epoch(epoch)
    t0 = time.time()
    lrs = current_lrs(t.step.optimizer)
    resume_from = None
    if partial is not None and partial["epoch"] == epoch:
        rngs = partial["rng"]
        resume_from = dict(
            iteration=partial["iteration"], sums=partial["sums"], rng=rngs[t.rank] if len(rngs) == t.world else None
        )
    try:
        losses = train_one_epoch(
            t.step,
            t.train_loader,
            epoch,
            t.accum,
            t.cfg.train.max_iters_per_epoch,
            t.tracker,
            should_stop=t.should_stop,
            resume_from=resume_from,
        )
    except _Stop as stop:
        state.checkpoint_stop(t, epoch, stop.iteration, stop.sums)
        raise TrainingInterrupted(
            f"training stopped at epoch {epoch}, iteration {stop.iteration}; a checkpoint was saved in {t.output_dir}"
        ) from None
    return dict(
        epoch=epoch, **{f"train_{k}": v for k, v in losses.items()}, **lrs, epoch_time_s=round(time.time() - t0, 3)
    )


def _evaluate(t: Training, what: str, resumed_by_evaluating: bool = False) -> Dict[str, float]:
    """COCO metrics of the model now; a stop request between batches raises :class:`TrainingInterrupted`
    (``what`` was stopped; ``resumed_by_evaluating``: its epoch's checkpoint is written, resuming evaluates it)."""
    try:
        return run_evaluation(
            t.model_without_ddp,
            t.postprocessor,
            t.val_loader,
            t.val_set,
            t.device,
            t.cfg.eval,
            t.cfg.data,
            _results_file(t.output_dir, t.cfg, t.cfg.eval),
            t.step.amp_dtype,
            verbose=t.verbose,
            should_stop=t.should_stop,
        )
    except EvaluationInterrupted as stop:
        raise TrainingInterrupted(
            f"training stopped in {what} ({stop})"
            + (f"; its checkpoint is in {t.output_dir}, and resuming evaluates it" if resumed_by_evaluating else "")
        ) from None


def _finish_epoch(t: Training, record: dict, evaluate: bool) -> Dict[str, float]:
    """Evaluate (when due) and log an epoch whose checkpoint is written; a stop in the evaluation leaves the
    epoch to be finished on resume."""
    metrics = {}
    if evaluate:
        t1 = time.time()
        metrics = _evaluate(t, f"the evaluation of epoch {record['epoch']}", resumed_by_evaluating=True)
        record = dict(record, **metrics, eval_time_s=round(time.time() - t1, 3))
    if t.main:
        t.tracker.epoch_done(record)
        if t.log_fn is not None:
            t.log_fn(record)
    return metrics


def train(
    run_cfg,
    output_dir: str,
    log_fn: Optional[Callable[[dict], None]] = None,
    resume: bool = True,
    print_fn: Callable[[str], None] = _print,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Dict[str, float]:
    """Train ``run_cfg`` into ``output_dir`` and evaluate it; returns the final metrics (every rank).

    With ``eval.eval_only`` it only evaluates ``eval.checkpoint`` (see :func:`evaluate`).
    Resumes from ``output_dir``'s checkpoint when ``resume`` (falling back to the previous one if the
    newest is corrupt). Without one, ``eval.checkpoint`` (if set) initialises the weights. Writes
    ``checkpoint.pth`` after every epoch, calls ``log_fn(record)`` on rank 0 once per epoch (default:
    append to ``<output_dir>/log.jsonl``) and saves the COCO results JSON of each evaluation. Progress lines
    go to ``print_fn`` (None: silent), scalars to ``<output_dir>/tensorboard/`` (:mod:`harness.run.tracking`).
    ``should_stop`` (e.g. "SLURM sent its pre-emption signal") is polled after every optimiser step and
    between evaluation batches; when it says yes, a checkpoint is written (mid-epoch) or is there already (in
    an evaluation) and :class:`TrainingInterrupted` raised; the next call resumes there, with the same final
    weights as a run that never stopped.
    Call :func:`harness.run.distributed.init_distributed` first for multi-process runs.
    """
    train_cfg = run_cfg.train
    if run_cfg.eval.eval_only:
        metrics = evaluate(
            run_cfg,
            output_dir,
            print_fn=print_fn,
        )
        if dist_utils.is_main_process():
            (log_fn or _default_log_fn(output_dir))(dict(epoch=None, eval_only=True, **metrics))
            if print_fn is not None and "AP" in metrics:
                print_fn(f"final  {ap_text(metrics)}")
        return dict(metrics, epochs=0)
    t = _set_up(run_cfg, output_dir, log_fn, print_fn, should_stop)
    start_epoch, partial, pending = state.resume(t, resume)
    state.distribute(t)
    first_step = start_epoch * t.iters_per_epoch + (partial["iteration"] if partial else 0)
    t.tracker = Tracker(
        output_dir,
        train_cfg,
        t.iters_per_epoch,
        main=t.main,
        print_fn=t.print_fn if t.verbose else None,
        first_step=first_step,
        evaluates=t.evaluates,
        config=config_dict(run_cfg),
    )
    if t.main and start_epoch < train_cfg.epochs:
        t.print_fn(
            f"training epochs {start_epoch}..{train_cfg.epochs - 1} of {train_cfg.epochs}, {t.iters_per_epoch} "
            f"iterations each (batch {train_cfg.batch_size_per_gpu} x {t.world} process(es) x {t.accum} "
            f"accumulated); TensorBoard: {os.path.join(output_dir, 'tensorboard')}"
        )
    try:
        metrics: Dict[str, float] = {}
        last_eval_epoch = -1
        if (
            pending is not None
            and dist_utils.all_gather_object(t.main and pending["record"]["epoch"] not in _logged_epochs(output_dir))[0]
        ):
            metrics = _finish_epoch(t, pending["record"], pending["evaluate"])  # stopped in its evaluation
            last_eval_epoch = pending["record"]["epoch"] if pending["evaluate"] else -1
        for epoch in range(start_epoch, train_cfg.epochs):
            record = _train_epoch(t, epoch, partial)
            partial = None
            due = t.evaluates(epoch)
            state.checkpoint_epoch(t, record, due)
            epoch_metrics = _finish_epoch(t, record, due)
            if due:
                metrics, last_eval_epoch = epoch_metrics, epoch
        if last_eval_epoch != train_cfg.epochs - 1:  # already finished before (resumed at the end)
            metrics = _evaluate(t, "its final evaluation")
        t.tracker.final(metrics)
    finally:
        t.tracker.close()
    return dict(metrics, epochs=train_cfg.epochs)


def _results_file(output_dir, run_cfg, eval_cfg):
    if not eval_cfg.save_detections or output_dir is None:
        return None
    return detections_file(output_dir, run_cfg.data.val_split)


# ------------------------------------------------------------------------------------- evaluation


def evaluate(
    run_cfg,
    output_dir: Optional[str] = None,
    model: Optional[torch.nn.Module] = None,
    postprocessor=None,
    checkpoint: Optional[str] = None,
    split: Optional[str] = None,
    print_fn: Callable[[str], None] = _print,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Dict[str, float]:
    """Evaluation-only run: COCO metrics of ``model`` (or a model built from ``run_cfg.model`` with the
    weights of ``checkpoint`` / ``eval.checkpoint`` / ``output_dir``'s latest checkpoint) on ``split``
    (default ``data.val_split``). The COCO results JSON goes to ``output_dir``; for a split without
    annotations (test-dev) that file is the result and the metrics are empty. ``should_stop`` is asked before
    every batch (:class:`~harness.run.evaluation.EvaluationInterrupted`)."""
    device = current_device()
    verbose = print_fn is not None
    print_fn = print_fn or _silent
    if output_dir is not None and dist_utils.is_main_process():
        check_output_dir(output_dir)
    root = dataset_root(run_cfg.data, output_dir)
    dataset, loader = build_eval_loader(run_cfg, root, split, num_classes=_model_num_classes(run_cfg))
    if model is None:
        model, _, postprocessor = _build_model(run_cfg, device)
        path = checkpoint or local_file(run_cfg.eval.checkpoint, run_cfg.eval.checkpoint_sha256)
        if path:
            load_checkpoint(path, model)
        else:
            found = checkpointing.load_latest(output_dir, log=print_fn) if output_dir is not None else None
            if found is None:
                raise checkpointing.CheckpointError(
                    output_dir or "eval.checkpoint", "nothing to evaluate: no checkpoint given or found"
                )
            saved, path = found
            load_state(model, saved["model"], path)
        if dist_utils.is_main_process():
            print_fn(f"evaluating {path} on {split or run_cfg.data.val_split}")
    elif postprocessor is None:
        raise ValueError("evaluate(model=...) needs its postprocessor too")
    results_file = (
        detections_file(output_dir, split or run_cfg.data.val_split, run_cfg.eval.tta)
        if output_dir is not None and run_cfg.eval.save_detections
        else None
    )
    return run_evaluation(
        model.to(device),
        postprocessor,
        loader,
        dataset,
        device,
        run_cfg.eval,
        run_cfg.data,
        results_file,
        amp_dtype_of(run_cfg.train.amp),
        verbose=verbose,
        should_stop=should_stop,
    )


__all__ = [
    "train",
    "evaluate",
    "train_one_epoch",
    "accumulation_steps",
    "NonFiniteLossError",
    "seed_everything",
    "OptimiserStep",
]
