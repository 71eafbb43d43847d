"""Hungarian matching between predictions and ground truth (scipy's linear_sum_assignment)."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Cost = cost_class * class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).

    With ``focal`` the class cost is the focal-loss difference of Deformable DETR (sigmoid scores);
    otherwise DETR's negative softmax probability.
    """

    def __init__(self, cost_class=1.0, cost_bbox=1.0, cost_giou=1.0, focal=True, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.alpha = focal_alpha
        self.gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Returns, per image, (index of prediction, index of target) int64 tensors of equal length."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1).float()  # N*Q x classes
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()  # N*Q x 4
        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).to(out_bbox)
        if self.focal:
            out_prob = logits.sigmoid()
            neg_cost = (1 - self.alpha) * (out_prob**self.gamma) * (-(1 - out_prob + 1e-8).log())
            pos_cost = self.alpha * ((1 - out_prob) ** self.gamma) * (-(out_prob + 1e-8).log())
            cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]
        else:
            cost_class = -logits.softmax(-1)[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        C = C.view(bs, num_queries, -1).cpu()
        sizes = [len(v["boxes"]) for v in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def build_matcher(cfg):
    return HungarianMatcher(
        cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, focal=cfg.focal_loss, focal_alpha=cfg.focal_alpha
    )
