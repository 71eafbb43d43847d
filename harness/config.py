"""Typed configuration of everything a run does besides the model (frozen dataclasses), and the one list
of each choice a field can take.

One dataclass per concern. YAML maps onto them in :mod:`harness.grid`; the model's own config is
:class:`model.config.ModelConfig`. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from model.config import ConfigError, ModelConfig

DATASETS = ("coco", "synthetic")
AUGMENTATIONS = ("official", "none")
OPTIMIZERS = ("adamw", "sgd")                     # train.optimizer
LR_SCHEDULES = ("step", "multistep")              # train.lr_schedule
# train.amp -> the torch dtype autocast runs in (by name, so that this module needs no torch)
AMP_MODES: Dict[str, Optional[str]] = {"off": None, "bf16": "bfloat16", "fp16": "float16"}


def amp_dtype(amp: str):
    """The torch dtype autocast runs in for ``train.amp`` (None: off). torch is imported here, not at the top,
    so that the torch-free layers can read this module."""
    import torch
    return None if AMP_MODES[amp] is None else getattr(torch, AMP_MODES[amp])


PRECISIONS = ("fp32", "tf32", "bf16")             # benchmark.precision
EXECUTORS = ("auto", "slurm", "local", "debug")   # launcher.executor; auto: slurm where sbatch exists


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "coco"                    # coco | synthetic (generated COCO-format set)
    root: Optional[str] = None               # COCO root: train2017/ val2017/ annotations/
    train_split: str = "train2017"
    val_split: str = "val2017"               # val2017 | test-dev2017 (image_info json, no annotations)
    num_workers: int = 2
    augmentation: str = "official"           # official | none
    eval_size: int = 800                     # short side at evaluation
    max_size: int = 1333
    # synthetic set (smoke runs and tests)
    synthetic_train_images: int = 32
    synthetic_val_images: int = 8
    synthetic_image_size: Tuple[int, int] = (192, 256)   # H x W
    synthetic_seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1         # sampling_offsets and reference_points
    weight_decay: float = 1e-4
    lr_drop: int = 40                        # step schedule: x0.1 every lr_drop epochs
    clip_max_norm: float = 0.1               # 0: no clipping
    optimizer: str = "adamw"                 # adamw | sgd
    momentum: float = 0.9                    # sgd only
    lr_schedule: str = "step"                # step (lr_drop) | multistep (lr_milestones)
    lr_milestones: Tuple[int, ...] = ()      # multistep: the epochs at whose start the lr drops x0.1
    warmup_iters: int = 0                    # linear warm-up over this many optimiser steps (0: none)
    warmup_factor: float = 0.001             # lr x this at the first step of the warm-up
    lr_reference_batch: Optional[int] = None   # lrs are for this total batch; scaled linearly to the actual one
    batch_size_per_gpu: int = 2
    total_batch_size: int = 32               # the paper's; gradient accumulation keeps it on fewer GPUs
    accumulate_to_total: bool = True
    amp: str = "off"                         # off | bf16 | fp16
    seed: int = 42
    max_iters_per_epoch: Optional[int] = None   # smoke runs: cut an epoch short
    print_freq: int = 10
    eval_every: int = 1                      # epochs between evaluations (the last epoch always evaluates)


@dataclass(frozen=True)
class EvalConfig:
    eval_only: bool = False
    checkpoint: Optional[str] = None         # an official or our checkpoint to evaluate / start from
    batch_size_per_gpu: Optional[int] = None   # images per process at evaluation; None: train.batch_size_per_gpu
    num_detections: int = 100                # detections kept per image (official: 100)
    tta: bool = False                        # horizontal flip + multi-scale testing (Table 3)
    tta_sizes: Tuple[int, ...] = (600, 700, 800, 900, 1000)
    save_detections: bool = True             # COCO results JSON next to the metrics


@dataclass(frozen=True)
class BenchmarkConfig:
    flops: bool = True
    flops_images: int = 100                  # the paper: mean over the first 100 val images
    fps: bool = True
    fps_images: int = 100
    fps_warmup: int = 10
    fps_batch_sizes: Tuple[int, ...] = (1, 4)
    precision: str = "fp32"                  # fp32 | tf32 | bf16


@dataclass(frozen=True)
class LauncherConfig:
    executor: str = "auto"                   # auto | slurm | local | debug
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 10
    mem_gb: Optional[int] = None
    timeout_min: int = 72 * 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    additional_parameters: Tuple[Tuple[str, str], ...] = ()   # extra sbatch args, as (key, value)
    max_array_size: int = 1000
    max_requeues: int = 10
    seeds: Tuple[int, ...] = ()              # several seeds per row: mean and std in the tables
    tasks_per_node: Optional[int] = None     # default: one per GPU (CPU runs: set explicitly)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, fully resolved. Its hash is the run id."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

__all__ = ["AMP_MODES", "AUGMENTATIONS", "DATASETS", "EXECUTORS", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS", "ConfigError", "DataConfig", "TrainConfig", "EvalConfig", "BenchmarkConfig",
           "LauncherConfig", "RunConfig", "ModelConfig"]
