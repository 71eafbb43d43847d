"""Typed configuration of everything a run does besides the model (frozen dataclasses), and the one list
of each choice a field can take.

One dataclass per concern. Every field declares its role beside its default (:func:`model.config.declare`:
what it changes, so which id it enters); :mod:`harness.grid.identity` computes the ids from them. YAML maps onto them
in :mod:`harness.grid`; the model's own config is
:class:`model.config.ModelConfig`. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from model.config import EVALUATION, MEASUREMENT, ConfigError, ModelConfig, declare, recorded, weights
from model.released import is_url

DATASETS = ("coco", "synthetic")
AUGMENTATIONS = ("official", "none")
OPTIMIZERS = ("adamw", "sgd")  # train.optimizer
LR_SCHEDULES = ("step", "multistep")  # train.lr_schedule
# train.amp -> the torch dtype autocast runs in (by name, so that this module needs no torch)
AMP_MODES: Dict[str, Optional[str]] = {"off": None, "bf16": "bfloat16", "fp16": "float16"}


def amp_dtype(amp: str):
    """The torch dtype autocast runs in for ``train.amp`` (None: off). torch is imported here, not at the top,
    so that the torch-free layers can read this module."""
    import torch

    return None if AMP_MODES[amp] is None else getattr(torch, AMP_MODES[amp])


PRECISIONS = ("fp32", "tf32", "bf16")  # benchmark.precision
EXECUTORS = ("auto", "slurm", "local", "debug")  # launcher.executor; auto: slurm where sbatch exists


_SYNTHETIC = dict(active=lambda d: d.dataset == "synthetic")  # the generated set's fields, only when it is used
_SCHEDULING = "where and how the job is scheduled, not what it computes"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = weights("coco")  # coco | synthetic (generated COCO-format set)
    root: Optional[str] = recorded(
        None, why="where the same dataset lies"
    )  # COCO root: train2017/ val2017/ annotations/
    train_split: str = weights("train2017")
    val_split: str = declare(
        "val2017", EVALUATION, MEASUREMENT
    )  # val2017 | test-dev2017 (image_info json, no annotations)
    num_workers: int = recorded(2, why="augmentation is seeded per sample (seed, epoch, index), not per worker")
    augmentation: str = weights("official")  # official | none
    train_size: int = weights(800)  # short side the training scales are set for (official: 800)
    eval_size: int = declare(800, EVALUATION, MEASUREMENT)  # short side at evaluation
    max_size: int = weights(1333)  # long side at most, in training and evaluation
    # synthetic set (smoke runs and tests)
    synthetic_train_images: int = weights(32, **_SYNTHETIC)
    synthetic_val_images: int = declare(8, EVALUATION, MEASUREMENT, **_SYNTHETIC)
    synthetic_image_size: Tuple[int, int] = weights((192, 256), **_SYNTHETIC)  # H x W
    synthetic_seed: int = weights(0, **_SYNTHETIC)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = weights(50)
    lr: float = weights(2e-4)
    lr_backbone: float = weights(2e-5)
    lr_linear_proj_mult: float = weights(0.1)  # sampling_offsets and reference_points
    weight_decay: float = weights(1e-4)
    lr_drop: int = weights(40, active=lambda t: t.lr_schedule == "step")  # step schedule: x0.1 every lr_drop epochs
    clip_max_norm: float = weights(0.1)  # 0: no clipping
    optimizer: str = weights("adamw")  # adamw | sgd
    momentum: float = weights(0.9, active=lambda t: t.optimizer == "sgd")
    lr_schedule: str = weights("step")  # step (lr_drop) | multistep (lr_milestones)
    lr_milestones: Tuple[int, ...] = weights(())  # multistep: the epochs at whose start the lr drops x0.1
    warmup_iters: int = weights(0)  # linear warm-up over this many optimiser steps (0: none)
    warmup_factor: float = weights(0.001, active=lambda t: t.warmup_iters > 0)  # lr x this at the first step
    lr_reference_batch: Optional[int] = weights(None)  # lrs are for this total batch; scaled linearly to the actual one
    batch_size_per_gpu: int = weights(2)
    # the paper's total batch; gradient accumulation keeps it on fewer GPUs. Without accumulation the total is
    # batch_size_per_gpu x processes, which the run id then holds instead (harness.grid.identity)
    total_batch_size: int = weights(32, active=lambda t: t.accumulate_to_total)
    accumulate_to_total: bool = weights(True)
    amp: str = weights("off")  # off | bf16 | fp16
    seed: int = weights(42)  # a list in an experiment: one run per seed
    max_iters_per_epoch: Optional[int] = weights(None)  # smoke runs: cut an epoch short
    print_freq: int = recorded(10, why="console output only")
    # Weights & Biases: the run's TensorBoard scalars sent there too, where wandb is installed
    wandb: bool = recorded(False, why="sends the scalars TensorBoard gets to Weights & Biases; tracking only")
    eval_every: int = recorded(1, why="evaluations between epochs do not touch the weights (each epoch reseeds)")


@dataclass(frozen=True)
class EvalConfig:
    eval_only: bool = weights(False)  # no training: the weights are eval.checkpoint's
    # an official or our checkpoint to evaluate / start from: a file (in the ids by its content) or a released
    # file's URL (model.released: fetched at submission; in the ids by its address and checksum)
    checkpoint: Optional[str] = weights(None, content=lambda v: not is_url(v))
    # the URL's published sha256 (or 8+ leading hex digits); None: the file name's (torch.hub's name-<hash>.pth),
    # else the one recorded at its first download
    checkpoint_sha256: Optional[str] = weights(None, active=lambda e: is_url(e.checkpoint))
    # images per process at evaluation; None: train.batch_size_per_gpu (padding changes DC5 models' outputs)
    batch_size_per_gpu: Optional[int] = declare(None, EVALUATION)
    num_detections: int = declare(100, EVALUATION)  # detections kept per image (official: 100)
    tta: bool = declare(False, EVALUATION)  # horizontal flip + multi-scale testing (Table 3)
    # test-time short sides, absolute (not scaled with eval_size)
    tta_sizes: Tuple[int, ...] = declare((600, 700, 800, 900, 1000), EVALUATION, active=lambda e: e.tta)
    save_detections: bool = recorded(True, why="writes the COCO results JSON; the numbers are the same")


def _measured(default):
    return declare(default, MEASUREMENT)


@dataclass(frozen=True)
class BenchmarkConfig:
    flops: bool = _measured(True)
    flops_images: int = _measured(100)  # the paper: mean over the first 100 val images
    fps: bool = _measured(True)
    fps_images: int = _measured(100)
    fps_warmup: int = _measured(10)
    fps_batch_sizes: Tuple[int, ...] = _measured((1, 4))
    precision: str = _measured("fp32")  # fp32 | tf32 | bf16


def _scheduling(default):
    return recorded(default, why=_SCHEDULING)


@dataclass(frozen=True)
class LauncherConfig:
    executor: str = _scheduling("auto")  # auto | slurm | local | debug
    partition: Optional[str] = _scheduling(None)
    nodes: int = _scheduling(1)
    gpus_per_node: int = _scheduling(8)
    cpus_per_task: int = _scheduling(10)
    mem_gb: Optional[int] = _scheduling(None)
    timeout_min: int = _scheduling(72 * 60)
    account: Optional[str] = _scheduling(None)
    qos: Optional[str] = _scheduling(None)
    constraint: Optional[str] = _scheduling(None)
    additional_parameters: Tuple[Tuple[str, str], ...] = _scheduling(())  # extra sbatch args, as (key, value)
    max_array_size: int = _scheduling(1000)
    max_requeues: int = _scheduling(10)
    tasks_per_node: Optional[int] = _scheduling(None)  # default: one per GPU (CPU runs: set explicitly)
    # a multi-task job's ranks must meet within this, else each fails naming the address and port it tried
    rendezvous_timeout_min: float = _scheduling(10.0)
    # a collective that a lost rank never joins fails after this: the job ends with the reason, not at its wall time
    collective_timeout_min: float = _scheduling(30.0)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, fully resolved; its ids come from the roles its fields declare."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


__all__ = [
    "AMP_MODES",
    "AUGMENTATIONS",
    "DATASETS",
    "EXECUTORS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRECISIONS",
    "ConfigError",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "BenchmarkConfig",
    "LauncherConfig",
    "RunConfig",
    "ModelConfig",
]
