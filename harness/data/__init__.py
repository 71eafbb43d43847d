"""Datasets: COCO-format loading (:mod:`.coco`), the official transforms (:mod:`.transforms`) and the
synthetic COCO-format set (:mod:`.synthetic`)."""

import os
from typing import Optional

import torch.distributed as dist

from . import synthetic
from .coco import (
    CocoDetection,
    DatasetError,
    DegenerateBoxWarning,
    build_dataset,
    collate_fn,
    load_coco,
    num_classes_of,
    split_paths,
)

__all__ = [
    "CocoDetection",
    "DatasetError",
    "DegenerateBoxWarning",
    "build_dataset",
    "collate_fn",
    "dataset_root",
    "load_coco",
    "num_classes_of",
    "split_paths",
]


def dataset_root(data_cfg, output_dir: Optional[str]) -> str:
    """The dataset root of a :class:`harness.config.DataConfig`; a synthetic set is generated (once, by rank 0
    of the process group when there is one) at ``data.root`` or ``<output_dir>/synthetic_data``."""
    if data_cfg.dataset != "synthetic":
        return data_cfg.root
    root = data_cfg.root or os.path.join(output_dir or ".", "synthetic_data")
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        synthetic.generate_from_config(data_cfg, root)
    if distributed:
        dist.barrier()
    return root
