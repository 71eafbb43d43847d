"""The official optimiser: AdamW with three parameter groups, and the step learning-rate drop.

Groups (as ``main.py`` of the official Deformable DETR builds them, by parameter name):

1. everything else: ``lr`` (2e-4);
2. the backbone trunk (names containing ``backbone.0``, or ``detector.backbone.body`` in the Faster R-CNN
   wrapper): ``lr_backbone`` (2e-5);
3. the linear projections predicting sampling offsets and reference points (names containing
   ``sampling_offsets`` or ``reference_points``): ``lr * lr_linear_proj_mult`` (2e-5).

Weight decay (1e-4) applies to all groups, as in the official code. Frozen parameters are left out.
"""
from __future__ import annotations

from typing import Dict, List

import torch

BACKBONE_NAMES = ("backbone.0", "detector.backbone.body")
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def _match(name: str, keys) -> bool:
    return any(k in name for k in keys)


def param_groups(model: torch.nn.Module, train_cfg) -> List[Dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if _match(n, BACKBONE_NAMES) and not _match(n, LINEAR_PROJ_NAMES)]
    linear_proj = [p for n, p in named if _match(n, LINEAR_PROJ_NAMES)]
    ids = {id(p) for p in backbone + linear_proj}
    rest = [p for _, p in named if id(p) not in ids]
    groups = [
        dict(params=rest, lr=train_cfg.lr, name="default"),
        dict(params=backbone, lr=train_cfg.lr_backbone, name="backbone"),
        dict(params=linear_proj, lr=train_cfg.lr * train_cfg.lr_linear_proj_mult, name="linear_proj"),
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, train_cfg), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg):
    """lr x 0.1 after ``lr_drop`` epochs (stepped once per epoch)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, train_cfg.lr_drop), gamma=0.1)


def current_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
