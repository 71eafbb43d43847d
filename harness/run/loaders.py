"""The training and evaluation loaders: sharded over the process group, batched as the official code."""
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


def build_eval_loader(run_cfg, root: str, split: Optional[str] = None, num_classes: Optional[int] = None):
    data_cfg, eval_cfg = run_cfg.data, run_cfg.eval
    split = split or data_cfg.val_split
    if eval_cfg.tta:
        dataset = build_dataset(root, split, train=False, data_cfg=data_cfg, num_classes=num_classes,
                                transforms=T.ToTensor())
        collate = tta_collate
    else:
        dataset = build_dataset(root, split, train=False, data_cfg=data_cfg, num_classes=num_classes)
        collate = collate_fn
    sampler = ShardSampler(dataset, dist_utils.get_rank(), dist_utils.get_world_size())
    loader = torch.utils.data.DataLoader(dataset, batch_size=run_cfg.train.batch_size_per_gpu, sampler=sampler,
                                         collate_fn=collate, num_workers=data_cfg.num_workers,
                                         pin_memory=torch.cuda.is_available())
    return dataset, loader


def build_train_loader(run_cfg, root: str, num_classes: Optional[int] = None):
    data_cfg, train_cfg = run_cfg.data, run_cfg.train
    dataset = build_dataset(root, data_cfg.train_split, train=True, data_cfg=data_cfg, num_classes=num_classes)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_utils.get_world_size(),
                                                  rank=dist_utils.get_rank(), shuffle=True, seed=train_cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=train_cfg.batch_size_per_gpu, sampler=sampler,
                                         collate_fn=collate_fn, num_workers=data_cfg.num_workers, drop_last=False,
                                         pin_memory=torch.cuda.is_available())
    return dataset, sampler, loader
