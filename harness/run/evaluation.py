"""COCO box evaluation (pycocotools COCOeval) and test-time augmentation.

:class:`CocoEvaluator` collects the post-processed detections of the images each rank saw, gathers
them on every rank, writes the COCO results JSON (the file a test-dev submission consists of) and
computes AP, AP50, AP75, APs, APm, APl in percent with ``maxDets = (1, 10, num_detections)``. A split
without annotations (test-dev's ``image_info`` file) gets the JSON only, no metrics.

Test-time augmentation (Table 3 of the paper): every image is run at each size of
``eval.tta_sizes`` (short sides in pixels, used as given, not scaled by ``data.eval_size``: 600..1000 by
default, an assumption (neither the paper nor the official code gives its TTA); the smoke profile's
112..144), each unflipped and
horizontally flipped. The long side is capped at ``data.max_size`` scaled by ``size / data.eval_size``
(1333 at 800 allows 1666 at 1000), so that the larger scales keep the aspect ratio the cap allows at the
evaluation size instead of collapsing onto one size. The detections of all passes are mapped back to the original
image, pooled,
de-duplicated per class by non-maximum suppression (IoU ``TTA_NMS_IOU``, ``torchvision.ops.batched_nms``),
and the ``num_detections`` highest scores are kept. The paper does not say how its TTA merges; NMS over
the pooled detections is the common choice.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Callable, Dict, List, Optional

import torch
import torchvision
import torchvision.transforms.functional as TF
from pycocotools.cocoeval import COCOeval

from harness.data import collate_fn
from harness.data import transforms as T
from harness.launch.wrapper import JobInterrupted
from harness.run import distributed as dist_utils

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TTA_NMS_IOU = 0.6


class EvaluationInterrupted(JobInterrupted):
    """``should_stop()`` asked to stop between evaluation batches: nothing was written; evaluating again
    starts over."""


def to_coco_detections(image_id: int, result: Dict[str, torch.Tensor]) -> List[dict]:
    """One image's ``{scores, labels, boxes (xyxy)}`` as COCO result entries (``bbox`` in xywh)."""
    boxes = result["boxes"].detach().float().cpu()
    boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = result["scores"].detach().float().cpu().tolist()
    labels = result["labels"].detach().cpu().tolist()
    return [
        dict(image_id=int(image_id), category_id=int(c), bbox=[round(v, 3) for v in b], score=round(s, 5))
        for b, s, c in zip(boxes, scores, labels)
    ]


def coco_metrics(coco_gt, detections: List[dict], image_ids, num_detections: int = 100, verbose: bool = True):
    """COCOeval bbox metrics (percent) of ``detections`` over ``image_ids``."""
    if not detections:
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.params.maxDets = [1, 10, num_detections]
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    if verbose:
        print(summary.getvalue(), end="", flush=True)
    stats = [float(v) for v in coco_eval.stats[:6]]
    # COCOeval's summary reads AP over all areas at maxDets 100 whatever maxDets holds (every other stat
    # uses the last maxDets): with num_detections != 100 it finds nothing and says -1; take it at ours
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # IoU x recall x class, area all, last maxDets
    found = precision[precision > -1]
    stats[0] = float(found.mean()) if found.size else -1.0
    # COCOeval's -1: no ground-truth object of that size in the split, so no value (not an AP of 0)
    stats = [None if v < 0 else v * 100 for v in stats]
    return dict(zip(METRIC_NAMES, stats))


class CocoEvaluator:
    def __init__(self, coco_gt, num_detections: int = 100, has_annotations: bool = True):
        self.coco_gt = coco_gt
        self.num_detections = num_detections
        self.has_annotations = has_annotations
        self.detections: List[dict] = []
        self.image_ids: List[int] = []

    def update(self, results: Dict[int, Dict[str, torch.Tensor]]):
        for image_id, result in results.items():
            self.image_ids.append(int(image_id))
            self.detections += to_coco_detections(image_id, result)

    def synchronize(self):
        """Pool every rank's images and detections (each image once)."""
        gathered = dist_utils.all_gather_object((self.image_ids, self.detections))
        seen, image_ids, detections = set(), [], []
        for ids, dets in gathered:
            new = set(ids) - seen
            image_ids += [i for i in ids if i in new]
            detections += [d for d in dets if d["image_id"] in new]
            seen |= new
        self.image_ids, self.detections = image_ids, detections

    def summarize(self, results_file: Optional[str] = None, verbose: bool = True) -> Dict[str, float]:
        """Metrics (empty for a split without annotations); writes ``results_file`` on the main rank."""
        if results_file and dist_utils.is_main_process():
            os.makedirs(os.path.dirname(os.path.abspath(results_file)), exist_ok=True)
            tmp = results_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.detections, f)
            os.replace(tmp, results_file)
        metrics: Dict[str, float] = {}
        if self.has_annotations:
            metrics = coco_metrics(
                self.coco_gt,
                self.detections,
                self.image_ids,
                self.num_detections,
                verbose=verbose and dist_utils.is_main_process(),
            )
        metrics.update(num_detections=self.num_detections, num_images=len(self.image_ids))
        return metrics


def autocast(device, amp_dtype):
    """Mixed-precision autocast for ``amp_dtype`` (bf16 / fp16), a no-op for None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _forward(model, images, mask, amp_dtype, device):
    with autocast(device, amp_dtype):
        return model(images, mask)


@torch.no_grad()
def predict(model, postprocessor, images, mask, orig_sizes, device, amp_dtype=None):
    """Post-processed detections (xyxy in the original image) of one padded batch."""
    outputs = _forward(model, images.to(device), mask.to(device), amp_dtype, device)
    return postprocessor(outputs, orig_sizes.to(device))


@torch.no_grad()
def predict_tta(
    model,
    postprocessor,
    raw_images: List[torch.Tensor],
    orig_sizes: torch.Tensor,
    device,
    sizes,
    max_size: int,
    num_detections: int,
    amp_dtype=None,
    flip: bool = True,
    eval_size: int = 800,
):
    """Flip + multi-scale test-time augmentation of unnormalised 3 x H x W images (see module docs)."""
    passes = [[] for _ in raw_images]
    for size in sizes:
        cap = max(max_size, round(max_size * size / eval_size))  # the cap grows with the scale
        resized = [T.resize(img, None, size, cap)[0] for img in raw_images]
        for flipped in [False, True] if flip else [False]:
            batch = [
                (TF.normalize(TF.hflip(img) if flipped else img, T.IMAGENET_MEAN, T.IMAGENET_STD), None)
                for img in resized
            ]
            images, mask, _ = collate_fn(batch)
            results = predict(model, postprocessor, images, mask, orig_sizes, device, amp_dtype)
            for k, r in enumerate(results):
                boxes = r["boxes"]
                if flipped:
                    w = orig_sizes[k, 1].to(boxes)
                    boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
                passes[k].append(dict(scores=r["scores"], labels=r["labels"], boxes=boxes))
    merged = []
    for p in passes:
        scores = torch.cat([r["scores"] for r in p])
        labels = torch.cat([r["labels"] for r in p])
        boxes = torch.cat([r["boxes"] for r in p]).float()
        keep = torchvision.ops.batched_nms(boxes, scores.float(), labels, TTA_NMS_IOU)[:num_detections]
        merged.append(dict(scores=scores[keep], labels=labels[keep], boxes=boxes[keep]))
    return merged


@torch.no_grad()
def detections_file(folder, split: str, tta: bool = False) -> str:
    """The COCO results JSON an evaluation of ``split`` writes into ``folder`` (``detections_val2017.json``;
    ``detections_val2017_tta.json`` with test-time augmentation)."""
    return os.path.join(str(folder), f"detections_{split}{'_tta' if tta else ''}.json")


def run_evaluation(
    model,
    postprocessor,
    loader,
    dataset,
    device,
    eval_cfg,
    data_cfg=None,
    results_file: Optional[str] = None,
    amp_dtype=None,
    verbose: bool = True,
    print_freq: int = 50,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Dict[str, float]:
    """Evaluate on the images of ``loader`` (this rank's shard); metrics are the same on every rank.

    With ``eval_cfg.tta`` the loader must yield unnormalised images (see :func:`tta_collate`).
    ``should_stop()`` is asked before every batch; a rank told to stop leaves its loop, and once every rank is
    out of its loop (shards may differ by a batch) they all raise :class:`EvaluationInterrupted` if any stopped.
    """
    model.eval()
    evaluator = CocoEvaluator(dataset.coco, eval_cfg.num_detections, getattr(dataset, "has_annotations", True))
    max_size = data_cfg.max_size if data_cfg is not None else 1333
    eval_size = data_cfg.eval_size if data_cfg is not None else 800
    tta_sizes = list(eval_cfg.tta_sizes)  # absolute short sides, not scaled by data.eval_size
    main = dist_utils.is_main_process()
    stopped, done = False, 0
    for i, batch in enumerate(loader):
        if should_stop is not None and should_stop():
            stopped = True
            break
        if eval_cfg.tta:
            raw_images, targets = batch
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            results = predict_tta(
                model,
                postprocessor,
                raw_images,
                orig_sizes,
                device,
                tta_sizes,
                max_size,
                eval_cfg.num_detections,
                amp_dtype,
                eval_size=eval_size,
            )
        else:
            images, mask, targets = batch
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            results = predict(model, postprocessor, images, mask, orig_sizes, device, amp_dtype)
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
        done = i + 1
        if verbose and main and print_freq and (i % print_freq == 0 or i == len(loader) - 1):
            print(f"eval [{i + 1}/{len(loader)}]", flush=True)
    if should_stop is not None:
        flag = torch.tensor([1.0 if stopped else 0.0], device=device if device.type == "cuda" else None)
        if float(dist_utils.reduce_sum_tensor(flag)) > 0:
            raise EvaluationInterrupted(f"evaluation stopped after {done} of {len(loader)} batches")
    evaluator.synchronize()
    return evaluator.summarize(results_file, verbose=verbose)


def tta_collate(batch):
    """Collate for test-time augmentation: the unnormalised images as a list, and the targets."""
    images, targets = zip(*batch)
    return list(images), list(targets)
