"""What a run costs: training GPU-hours (V100-equivalent), for ``--dry-run`` (pure)."""

from __future__ import annotations

from typing import Optional

from harness.config import RunConfig

# ---------------------------------------------------------------------------------------- GPU-hours

# Training GPU-hours per COCO epoch on V100 at total batch 32, from the official README
# (train_gpu_hours_per_epoch): Deformable DETR 6.5 (two-stage 6.8), single scale 3.2, DETR 4.0,
# DETR-DC5 14.0, Faster R-CNN + FPN 3.5.
_HOURS_PER_EPOCH = {"deformable_detr": 6.5, "detr": 4.0, "faster_rcnn": 3.5}
_BACKBONE_FACTOR = {"resnet50": 1.0, "resnet101": 1.45, "resnext101_32x8d": 2.4, "resnext101_64x4d": 2.4}


def estimate_gpu_hours(
    cfg: RunConfig,
    paper_gpu_hours: Optional[float] = None,
    paper_epochs: Optional[float] = None,
    evaluation_only: bool = False,
) -> float:
    """Training GPU-hours of one run (V100-equivalent; 0 for smoke runs, which use no GPU).

    With the paper's total GPU-hours for the row, that number scaled by epochs / the paper's epochs.
    Otherwise a simple model: hours per epoch of the architecture (official README: Deformable DETR
    6.5 with 4 levels, 3.2 single-scale; DETR 4.0, 14.0 with DC5; Faster R-CNN 3.5), times a backbone
    factor (ResNet-101 1.45, ResNeXt-101 2.4), x1.15 for DCN, x1.05 for two-stage, x1.05 FPN /
    x1.1 BiFPN, times epochs; an evaluation-only run, or the evaluation of a finished training
    (``evaluation_only``), counts 0.2 (x3 with test-time augmentation).
    """
    if cfg.data.dataset != "coco" or cfg.launcher.gpus_per_node == 0:
        return 0.0
    m = cfg.model
    if cfg.eval.eval_only or evaluation_only:
        return 0.2 * (3 if cfg.eval.tta else 1)
    if paper_gpu_hours is not None and paper_epochs:
        return float(paper_gpu_hours) * cfg.train.epochs / float(paper_epochs)
    per_epoch = _HOURS_PER_EPOCH[m.arch]
    if m.arch == "deformable_detr" and m.num_feature_levels == 1:
        per_epoch = 3.2 * (1.35 if m.dilation else 1.0)
    if m.arch == "detr" and m.dilation:
        per_epoch = 14.0
    per_epoch *= _BACKBONE_FACTOR.get(m.backbone, 1.0)
    per_epoch *= (1.15 if m.dcn else 1.0) * (1.05 if m.two_stage else 1.0)
    if m.arch == "deformable_detr":
        per_epoch *= {"none": 1.0, "fpn": 1.05, "bifpn": 1.1}[m.neck]
    return per_epoch * cfg.train.epochs
