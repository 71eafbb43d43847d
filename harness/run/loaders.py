"""The training and evaluation loaders: sharded over the process group, batched as the official code.

Training drops the last incomplete batch of each process (``drop_last=True``, as the official loader), so
every optimiser step sees the full batch; a training set too small for one full batch is an error.
Each training item is a :class:`~harness.data.transforms.SampleKey` ``(index, epoch, train.seed)``
(:class:`TrainSampler`), from which the dataset seeds that sample's augmentation: the augmentation of a
sample is a function of the three alone, the same with any ``data.num_workers``, process or order.
Evaluation keeps every image, ``eval.batch_size_per_gpu`` per process (default: the training batch; DETR's
DC5 models were trained with one image per GPU and lose AP when evaluated with more, because padding
changes their features).
"""

from __future__ import annotations

from typing import Optional

import torch

from harness.data import build_dataset, collate_fn
from harness.data import transforms as T
from harness.run import distributed as dist_utils
from harness.run.evaluation import tta_collate


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: evaluation shards without padding or repeats."""

    def __init__(self, dataset, rank: int = 0, world_size: int = 1):
        self.indices = list(range(len(dataset)))[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TrainSampler(torch.utils.data.DistributedSampler):
    """The :class:`~torch.utils.data.DistributedSampler` (shuffled from ``(seed, epoch)``, set by
    :meth:`set_epoch`) whose items are ``SampleKey(index, epoch, seed)``: the dataset seeds each sample's
    augmentation from them (:func:`harness.data.transforms.sample_rng`)."""

    def __iter__(self):
        epoch, seed = self.epoch, self.seed
        return (T.SampleKey(int(index), epoch, seed) for index in super().__iter__())


def eval_batch_size(run_cfg) -> int:
    """Images per process at evaluation: ``eval.batch_size_per_gpu``, or the training batch when unset."""
    size = run_cfg.eval.batch_size_per_gpu
    return run_cfg.train.batch_size_per_gpu if size is None else size


def build_eval_loader(run_cfg, root: str, split: Optional[str] = None, num_classes: Optional[int] = None):
    data_cfg, eval_cfg = run_cfg.data, run_cfg.eval
    split = split or data_cfg.val_split
    if eval_cfg.tta:
        dataset = build_dataset(
            root, split, train=False, data_cfg=data_cfg, num_classes=num_classes, transforms=T.ToTensor()
        )
        collate = tta_collate
    else:
        dataset = build_dataset(root, split, train=False, data_cfg=data_cfg, num_classes=num_classes)
        collate = collate_fn
    sampler = ShardSampler(dataset, dist_utils.get_rank(), dist_utils.get_world_size())
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=eval_batch_size(run_cfg),
        sampler=sampler,
        collate_fn=collate,
        num_workers=data_cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return dataset, loader


def build_train_loader(run_cfg, root: str, num_classes: Optional[int] = None):
    data_cfg, train_cfg = run_cfg.data, run_cfg.train
    dataset = build_dataset(root, data_cfg.train_split, train=True, data_cfg=data_cfg, num_classes=num_classes)
    sampler = TrainSampler(
        dataset, num_replicas=dist_utils.get_world_size(), rank=dist_utils.get_rank(), shuffle=True, seed=train_cfg.seed
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=train_cfg.batch_size_per_gpu,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=data_cfg.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    if len(loader) == 0:
        raise ValueError(
            f"the training split {data_cfg.train_split!r} has {len(dataset)} images: "
            f"{len(sampler)} per process, fewer than one full batch (train.batch_size_per_gpu "
            f"{train_cfg.batch_size_per_gpu}, {sampler.num_replicas} processes); use more images "
            "(data.synthetic_train_images for the synthetic set) or a smaller batch"
        )
    return dataset, sampler, loader
