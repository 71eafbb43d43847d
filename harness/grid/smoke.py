"""The smoke profile: any row at laptop scale (pure, no torch).

Two tiers, merged around a row's own overrides by :func:`harness.grid.resolve.resolve`: ``SMOKE_SMALL`` before
them (the row wins), ``SMOKE_LAPTOP`` after them (it wins: what a laptop cannot do otherwise), and an
experiment's own ``smoke:`` section is of the laptop tier too (:class:`SmokeProfile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

from harness.grid.identity import roles_of
from harness.grid.schema import merge

# Any row at laptop scale: synthetic COCO-format data, a small transformer, one CPU process; small enough that
# Table 2's six rows train, evaluate and measure in minutes on 2 CPU cores, large enough that the detector
# learns the synthetic objects (non-zero AP after a few epochs). Two tiers:
# - SMOKE_SMALL: a default the row's own overrides win over (a row with enc_layers: 3 keeps 3 layers);
SMOKE_SMALL: Dict[str, Dict[str, Any]] = {
    "model": {
        "hidden_dim": 64,
        "dim_feedforward": 128,
        "nheads": 8,
        "enc_layers": 1,
        "dec_layers": 2,
        "num_queries": 30,
        "dropout": 0.0,
    },
}
# - SMOKE_LAPTOP: what a laptop cannot do otherwise (COCO, ImageNet trunks, GPUs, 50-epoch schedules): it wins
#   over the row, and --dry-run names every row setting it changes. An experiment's own ``smoke:`` section
#   is of this tier too.
SMOKE_LAPTOP: Dict[str, Dict[str, Any]] = {
    "model": {"backbone": "resnet50", "pretrained_backbone": False, "backbone_weights": None},
    "data": {
        "dataset": "synthetic",
        "root": None,
        "val_split": "val2017",
        "augmentation": "none",
        "num_workers": 0,
        "train_size": 128,
        "eval_size": 128,
        "max_size": 160,
        "synthetic_image_size": [128, 160],
        "synthetic_train_images": 32,
        "synthetic_val_images": 8,
    },
    "train": {
        "epochs": 12,
        "lr": 1.0e-3,
        "lr_backbone": 1.0e-4,
        "lr_drop": 10,
        "batch_size_per_gpu": 4,
        "total_batch_size": 4,
        "accumulate_to_total": True,
        "amp": "off",
        "print_freq": 4,
        "eval_every": 2,
    },
    "eval": {"eval_only": False, "checkpoint": None, "tta_sizes": [112, 128, 144]},
    "benchmark": {"flops_images": 2, "fps_images": 4, "fps_warmup": 1, "precision": "fp32"},
    "launcher": {
        "executor": "local",
        "partition": None,
        "nodes": 1,
        "gpus_per_node": 0,
        "tasks_per_node": 1,
        "cpus_per_task": 2,
        "mem_gb": None,
        "timeout_min": 60,
    },
}
SMOKE_DEFAULTS = merge(SMOKE_SMALL, SMOKE_LAPTOP)  # the whole profile (what a row without overrides gets)


@dataclass(frozen=True)
class SmokeProfile:
    """The smoke profile of an experiment: ``small`` yields to a row's overrides, ``laptop`` does not."""

    small: Mapping[str, Any]
    laptop: Mapping[str, Any]

    def changes(self, overrides: Mapping) -> Tuple[Tuple[str, Any, Any], ...]:
        """(dotted key, the row's value, the smoke value) of each row setting the laptop tier replaces."""
        found = []
        for section, values in (overrides or {}).items():
            for key, value in (values or {}).items():
                forced = (self.laptop.get(section) or {}).get(key, _ABSENT)
                # a scheduling field (launcher.nodes) changes no number: not worth a line
                if forced is not _ABSENT and forced != value and roles_of(section, key):
                    found.append((f"{section}.{key}", value, forced))
        return tuple(found)


_ABSENT = object()
