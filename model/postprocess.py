"""Predictions -> per-image detections in absolute xyxy coordinates of the original image."""

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-``num_detections`` (query, class) pairs by sigmoid score (focal loss), or each query's best
    non-background class by softmax score (DETR)."""

    def __init__(self, num_detections=100, focal_loss=True):
        super().__init__()
        self.num_detections = num_detections
        self.focal_loss = focal_loss

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: N x 2 (h, w) of the original images -> list of {scores, labels, boxes}."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        boxes = box_cxcywh_to_xyxy(out_bbox)
        if self.focal_loss:
            prob = out_logits.sigmoid()
            k = min(self.num_detections, prob[0].numel())
            scores, topk_indexes = torch.topk(prob.view(out_logits.shape[0], -1), k, dim=1)
            topk_boxes = torch.div(topk_indexes, out_logits.shape[2], rounding_mode="floor")
            labels = topk_indexes % out_logits.shape[2]
            boxes = torch.gather(boxes, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
        else:
            scores, labels = out_logits.softmax(-1)[..., :-1].max(-1)
            if scores.shape[1] > self.num_detections:
                scores, keep = scores.topk(self.num_detections, dim=1)
                labels = torch.gather(labels, 1, keep)
                boxes = torch.gather(boxes, 1, keep.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes)
        boxes = boxes * scale_fct[:, None, :]
        return [{"scores": s, "labels": label, "boxes": b} for s, label, b in zip(scores, labels, boxes)]
