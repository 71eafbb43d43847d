"""The set criterion: Hungarian-matched classification, L1 and GIoU losses, on every decoder layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class SetCriterion(nn.Module):
    """Losses of DETR (softmax cross-entropy with a down-weighted no-object class) or Deformable DETR
    (sigmoid focal loss), plus the matched boxes' L1 and GIoU losses.

    Returned keys: ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the last layer, ``..._{i}`` for the earlier
    decoder layers, ``..._enc`` for two-stage proposals, and the logged (unweighted) ``class_error`` and
    ``cardinality_error``. ``weight_dict`` gives each loss's coefficient.
    """

    def __init__(self, num_classes, matcher, weight_dict, focal_loss=True, focal_alpha=0.25, eos_coef=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_loss = focal_loss
        self.focal_alpha = focal_alpha
        if not focal_loss:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes):
        src_logits = outputs["pred_logits"]  # N x Q x classes (+1 without focal loss)
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)]).to(src_logits.device)
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_o
        if self.focal_loss:
            onehot = torch.zeros(
                *src_logits.shape[:2], src_logits.shape[2] + 1, dtype=src_logits.dtype, device=src_logits.device
            )
            onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
            onehot = onehot[:, :, :-1]
            # official normalisation: mean over queries, sum, / num_boxes, then times the number of queries
            loss = sigmoid_focal_loss(src_logits, onehot, alpha=self.focal_alpha, gamma=2, reduction="none")
            loss_ce = loss.mean(1).sum() / num_boxes * src_logits.shape[1]
        else:
            loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        losses = {"loss_ce": loss_ce}
        if target_classes_o.numel():
            correct = (src_logits[idx].argmax(-1) == target_classes_o).float().mean()
            losses["class_error"] = (100 - 100 * correct).detach()
        else:
            losses["class_error"] = src_logits.new_tensor(0.0)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets):
        # the number of predictions whose argmax is not the last class, against the number of objects
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(v["labels"]) for v in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _losses(self, outputs, targets, num_boxes, suffix="", log=False):
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, num_boxes)
        if not log:
            losses.pop("class_error")
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs, targets):
        """outputs: the model's dict; targets: list of dicts with ``labels`` (K) and ``boxes`` (K x 4 cxcywh)."""
        device = outputs["pred_logits"].device
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        num_boxes = torch.clamp(num_boxes / world_size, min=1).item()

        last = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        losses = self._losses(last, targets, num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux, targets, num_boxes, suffix=f"_{i}"))
        if "enc_outputs" in outputs:
            # proposals are class-agnostic: every object is class 0
            bin_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            losses.update(self._losses(outputs["enc_outputs"], bin_targets, num_boxes, suffix="_enc"))
        return losses


def build_weight_dict(cfg):
    coefs = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    weight_dict = dict(coefs)
    if cfg.aux_loss:
        for i in range(cfg.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in coefs.items()})
    if cfg.two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in coefs.items()})
    return weight_dict


def build_criterion(cfg, matcher):
    return SetCriterion(
        cfg.num_classes,
        matcher,
        build_weight_dict(cfg),
        focal_loss=cfg.focal_loss,
        focal_alpha=cfg.focal_alpha,
        eos_coef=cfg.eos_coef,
    )
