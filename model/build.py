"""``build_model(cfg) -> (model, criterion, postprocessor)`` for every architecture."""

from __future__ import annotations

from . import deformable_detr, detr, faster_rcnn
from .config import ModelConfig
from .criterion import build_criterion
from .matcher import build_matcher
from .postprocess import PostProcess


def build_model(cfg: ModelConfig, num_detections: int = 100):
    """The model, its training criterion and its post-processor (keeping ``num_detections`` per image;
    the official evaluation keeps 100)."""
    if cfg.arch == "faster_rcnn":
        return faster_rcnn.build(cfg, num_detections)
    model = deformable_detr.build(cfg) if cfg.arch == "deformable_detr" else detr.build(cfg)
    criterion = build_criterion(cfg, build_matcher(cfg))
    return model, criterion, PostProcess(num_detections, focal_loss=cfg.focal_loss)


def count_parameters(model) -> int:
    """All parameters, trainable or frozen (frozen BatchNorm statistics and affine terms are buffers)."""
    return sum(p.numel() for p in model.parameters())
