"""Box conversions and generalised IoU (boxes as ``... x 4`` tensors)."""

import torch
from torchvision.ops import generalized_box_iou  # noqa: F401  (re-exported: N x 4, M x 4 xyxy -> N x M)
from torchvision.ops.boxes import box_convert


def box_cxcywh_to_xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x, eps=1e-5):
    """logit(x), clamped like the official implementation so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
