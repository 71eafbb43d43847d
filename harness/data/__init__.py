"""Datasets: COCO-format loading (:mod:`.coco`), the official transforms (:mod:`.transforms`) and the
synthetic COCO-format set (:mod:`.synthetic`)."""
from .coco import (CocoDetection, DatasetError, DegenerateBoxWarning, build_dataset, collate_fn, load_coco,
                   num_classes_of, split_paths)

__all__ = ["CocoDetection", "DatasetError", "DegenerateBoxWarning", "build_dataset", "collate_fn", "load_coco",
           "num_classes_of", "split_paths"]
