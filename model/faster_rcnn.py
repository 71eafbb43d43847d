"""torchvision's Faster R-CNN + FPN (Table 1's first row) behind the DETR family's contract.

``model(images, mask)`` takes the same padded, normalised batch; each image is unpadded with its mask
and handed to torchvision (which then does no resizing or normalisation of its own). In training, call
``model(images, mask, targets=targets)``: torchvision computes its losses inside the forward pass, and
the criterion only passes them on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from .backbone import _load_imagenet_weights
from .box_ops import box_cxcywh_to_xyxy


class FasterRCNNDetector(nn.Module):
    needs_targets = True

    def __init__(self, detector: FasterRCNN):
        super().__init__()
        self.detector = detector

    def forward(self, images, mask, targets=None):
        # unpad: the mask's False region is the image, anchored top-left
        sizes = [(int((~m[:, 0]).sum()), int((~m[0]).sum())) for m in mask]
        image_list = [img[:, :h, :w] for img, (h, w) in zip(images, sizes)]
        if self.training:
            if targets is None:
                raise ValueError("Faster R-CNN computes its losses in forward: pass targets=")
            tv_targets = []
            for t, (h, w) in zip(targets, sizes):
                scale = torch.tensor([w, h, w, h], dtype=t["boxes"].dtype, device=t["boxes"].device)
                tv_targets.append({"boxes": box_cxcywh_to_xyxy(t["boxes"]) * scale, "labels": t["labels"]})
            return {"losses": self.detector(image_list, tv_targets)}
        detections = self.detector(image_list)
        # boxes normalised by the unpadded size, like the DETR family's pred_boxes
        for det, (h, w) in zip(detections, sizes):
            det["boxes"] = det["boxes"] / det["boxes"].new_tensor([w, h, w, h])
        return {"detections": detections}


class PassThroughCriterion(nn.Module):
    """torchvision's own losses (objectness, RPN box, classifier, box regression), the box regressions
    weighted as Detectron2's ``RPN.BBOX_REG_LOSS_WEIGHT`` and ``ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT`` (default 1)."""

    def __init__(self, rpn_box_loss_weight: float = 1.0, rcnn_box_loss_weight: float = 1.0):
        super().__init__()
        self.weight_dict = {
            "loss_objectness": 1.0,
            "loss_rpn_box_reg": rpn_box_loss_weight,
            "loss_classifier": 1.0,
            "loss_box_reg": rcnn_box_loss_weight,
        }

    def forward(self, outputs, targets=None):
        return dict(outputs["losses"])


class DetectionsPostProcess(nn.Module):
    def __init__(self, num_detections=100):
        super().__init__()
        self.num_detections = num_detections

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        results = []
        for det, (h, w) in zip(outputs["detections"], target_sizes.tolist()):
            keep = det["scores"].argsort(descending=True)[: self.num_detections]
            boxes = det["boxes"][keep] * det["boxes"].new_tensor([w, h, w, h])
            results.append({"scores": det["scores"][keep], "labels": det["labels"][keep], "boxes": boxes})
        return results


def giou_loss_from_deltas(pred_deltas, target_deltas, weights, clip: float):
    """Summed GIoU loss between the boxes that two sets of encoded deltas describe relative to the same
    proposals.

    Decoding a delta relative to a proposal is a per-axis scaling plus a shift, and GIoU does not change
    under such a map (every area it compares scales by the same factor), so decoding both relative to one
    unit box gives the GIoU of the real boxes without the proposals."""
    wx, wy, ww, wh = weights

    def to_box(d):
        cx, cy = d[:, 0] / wx, d[:, 1] / wy
        w = torch.exp(torch.clamp(d[:, 2] / ww, max=clip))
        h = torch.exp(torch.clamp(d[:, 3] / wh, max=clip))
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=1)

    return torchvision.ops.generalized_box_iou_loss(to_box(pred_deltas), to_box(target_deltas), reduction="sum")


class GIoURoIHeads(RoIHeads):
    """torchvision's box head with the GIoU box loss instead of smooth L1 (Detectron2's
    ``ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE: giou``, summed over foreground proposals and divided by all sampled
    proposals, as the smooth-L1 loss it replaces; the criterion weights it, ``rcnn_box_loss_weight``). torchvision's
    forward pass runs unchanged; the
    sampled labels, regression targets and predicted deltas are kept on the way and ``loss_box_reg`` is
    recomputed from them."""

    @classmethod
    def from_heads(cls, heads: RoIHeads) -> "GIoURoIHeads":
        # the same sub-modules (keys, parameters and their initial values) and settings
        return cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
        )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kept = {}
        self.box_predictor.register_forward_hook(self._keep_predictions)

    def _keep_predictions(self, module, inputs, outputs):
        if self.training:
            self._kept["class_logits"], self._kept["box_regression"] = outputs

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._kept["labels"], self._kept["regression_targets"] = labels, regression_targets
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            kept, self._kept = self._kept, {}
            labels = torch.cat(kept["labels"])
            targets_ = torch.cat(kept["regression_targets"])
            box_regression = kept["box_regression"].reshape(labels.shape[0], -1, 4)
            positive = torch.where(labels > 0)[0]
            pred = box_regression[positive, labels[positive]]
            losses["loss_box_reg"] = (
                giou_loss_from_deltas(pred, targets_[positive], self.box_coder.weights, self.box_coder.bbox_xform_clip)
                / labels.numel()
            )
        return result, losses


class GIoURPN(RegionProposalNetwork):
    """torchvision's RPN with the GIoU box loss instead of smooth L1 (Detectron2's ``RPN.BBOX_REG_LOSS_TYPE:
    giou``): the GIoU loss of the boxes the predicted and the target deltas describe relative to their anchors,
    summed over the sampled positive anchors and divided by all sampled anchors (Detectron2's normaliser, and
    torchvision's for the smooth-L1 loss it replaces). The objectness loss is torchvision's."""

    @classmethod
    def from_rpn(cls, rpn: RegionProposalNetwork) -> "GIoURPN":
        # the same sub-modules (keys, parameters and their initial values) and settings
        return cls(
            rpn.anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
        )

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        # torchvision's RegionProposalNetwork.compute_loss with the box loss replaced
        sampled_pos_inds, sampled_neg_inds = self.fg_bg_sampler(labels)
        sampled_pos_inds = torch.where(torch.cat(sampled_pos_inds, dim=0))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg_inds, dim=0))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = (
            giou_loss_from_deltas(
                pred_bbox_deltas[sampled_pos_inds],
                regression_targets[sampled_pos_inds],
                self.box_coder.weights,
                self.box_coder.bbox_xform_clip,
            )
            / sampled_inds.numel()
        )
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds], labels[sampled_inds])
        return objectness_loss, box_loss


class _BatchingOnly(GeneralizedRCNNTransform):
    """The images arrive resized and normalised by the data pipeline: only batch them."""

    def __init__(self):
        super().__init__(min_size=800, max_size=1333, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])

    def normalize(self, image):
        return image

    def resize(self, image, target=None):
        return image, target


def build(cfg, num_detections=100):
    """torchvision's ``fasterrcnn_resnet50_fpn`` recipe, FPN P2-P6, 91 classes including background index 0.

    As in torchvision, an ImageNet-initialised trunk has frozen BN with the stem and res2 frozen
    (trainable_layers=3), and a trunk trained from scratch has ordinary BatchNorm and trains every layer
    (41,808,406 parameters; with frozen BN its 53,120 affine values are buffers instead).
    ``rcnn_box_loss: giou`` and ``rpn_box_loss: giou`` replace the box head's and the RPN's smooth-L1 losses with
    GIoU, ``rcnn_box_loss_weight`` and ``rpn_box_loss_weight`` weight them (Detectron2's GIoU configuration:
    giou in both, weights 10 and 2; DETR's Faster R-CNN+ baseline).
    """
    if cfg.backbone != "resnet50" or cfg.dcn or cfg.dilation:
        raise ValueError(
            "model.backbone: the Faster R-CNN row is built with a plain resnet50 "
            f"(got backbone={cfg.backbone!r}, dcn={cfg.dcn}, dilation={cfg.dilation})"
        )
    pretrained = cfg.pretrained_backbone
    trunk = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    if pretrained:
        _load_imagenet_weights(trunk, cfg.backbone, cfg.backbone_weights)
    trainable_layers = (3 if pretrained else 5) if cfg.train_backbone else 0
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=trainable_layers)
    detector = FasterRCNN(backbone, num_classes=cfg.num_classes, box_detections_per_img=num_detections)
    if cfg.rcnn_box_loss == "giou":
        detector.roi_heads = GIoURoIHeads.from_heads(detector.roi_heads)
    if cfg.rpn_box_loss == "giou":
        detector.rpn = GIoURPN.from_rpn(detector.rpn)
    detector.transform = _BatchingOnly()
    criterion = PassThroughCriterion(cfg.rpn_box_loss_weight, cfg.rcnn_box_loss_weight)
    return FasterRCNNDetector(detector), criterion, DetectionsPostProcess(num_detections)
