"""COCO evaluation: metrics of known detections, results JSON, test-dev, test-time augmentation."""

import json

import pytest
import torch

from harness.config import EvalConfig
from harness.data import synthetic
from harness.data.coco import build_dataset
from harness.run import evaluation


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(
        str(tmp_path_factory.mktemp("eval") / "synthetic"), num_train=2, num_val=4, image_size=(192, 256), seed=11
    )


def _ground_truth_results(coco, image_ids, score=0.9):
    """Perfect detections: every non-crowd box, plus a low-score false positive."""
    results = {}
    for img_id in image_ids:
        anns = [a for a in coco.imgToAnns[img_id] if not a["iscrowd"]]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
            + [[0.0, 0.0, 5.0, 5.0]]
        )
        results[img_id] = dict(
            boxes=boxes,
            labels=torch.tensor([a["category_id"] for a in anns] + [1]),
            scores=torch.tensor([score] * len(anns) + [0.01]),
        )
    return results


def test_perfect_detections_score_100(root, tmp_path):
    ds = build_dataset(root, "val2017", train=False)
    evaluator = evaluation.CocoEvaluator(ds.coco, num_detections=100)
    evaluator.update(_ground_truth_results(ds.coco, ds.ids))
    evaluator.synchronize()
    out = str(tmp_path / "dets.json")
    metrics = evaluator.summarize(out, verbose=False)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["num_detections"] == 100 and metrics["num_images"] == 4
    assert set(metrics) >= set(evaluation.METRIC_NAMES)
    saved = json.load(open(out))
    assert {"image_id", "category_id", "bbox", "score"} <= set(saved[0])
    assert len(saved) == sum(len(r["scores"]) for r in _ground_truth_results(ds.coco, ds.ids).values())
    # the same detections kept at another number per image: AP is read there, not at COCOeval's 100
    for kept in (30, 300):
        other = evaluation.CocoEvaluator(ds.coco, num_detections=kept)
        other.update(_ground_truth_results(ds.coco, ds.ids))
        assert other.summarize(verbose=False)["AP"] == pytest.approx(100.0), kept


def test_detection_on_crowd_region_is_not_a_false_positive(root):
    ds = build_dataset(root, "val2017", train=False)
    results = _ground_truth_results(ds.coco, ds.ids, score=0.5)
    crowd = next(a for a in ds.coco.dataset["annotations"] if a["iscrowd"])
    x, y, w, h = crowd["bbox"]
    r = results[crowd["image_id"]]
    r["boxes"] = torch.cat([r["boxes"], torch.tensor([[x, y, x + w, y + h]])])
    r["labels"] = torch.cat([r["labels"], torch.tensor([crowd["category_id"]])])
    r["scores"] = torch.cat([r["scores"], torch.tensor([0.99])])
    metrics = evaluation.coco_metrics(
        ds.coco, sum((evaluation.to_coco_detections(i, r) for i, r in results.items()), []), ds.ids, verbose=False
    )
    assert metrics["AP50"] == pytest.approx(100.0)


def test_wrong_class_and_empty_results(root):
    ds = build_dataset(root, "val2017", train=False)
    results = _ground_truth_results(ds.coco, ds.ids)
    for r in results.values():
        r["labels"] = torch.full_like(r["labels"], 2)  # 2 is not a category
    dets = sum((evaluation.to_coco_detections(i, r) for i, r in results.items()), [])
    assert evaluation.coco_metrics(ds.coco, dets, ds.ids, verbose=False)["AP"] == 0.0
    assert evaluation.coco_metrics(ds.coco, [], ds.ids, verbose=False)["AP50"] == 0.0


def test_test_dev_writes_results_without_metrics(root, tmp_path):
    ds = build_dataset(root, "val2017", train=False)
    evaluator = evaluation.CocoEvaluator(ds.coco, num_detections=50, has_annotations=False)
    evaluator.update(_ground_truth_results(ds.coco, ds.ids))
    evaluator.synchronize()
    out = str(tmp_path / "detections_test-dev2017.json")
    metrics = evaluator.summarize(out)
    assert "AP" not in metrics and metrics["num_detections"] == 50
    assert len(json.load(open(out))) > 0


class _OracleModel(torch.nn.Module):
    """Predicts the ground truth of one known image (normalised cxcywh); :func:`predict_tta` runs the
    unflipped pass of a size, then the flipped one, so every second call sees a mirrored image."""

    def __init__(self, boxes_xyxy, labels, size_hw, num_classes=91):
        super().__init__()
        h, w = size_hw
        b = boxes_xyxy / torch.tensor([w, h, w, h])
        self.cxcywh = torch.stack(
            [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1
        )
        self.labels, self.num_classes = labels, num_classes
        self.calls = []

    def forward(self, images, mask):
        flipped = len(self.calls) % 2 == 1
        self.calls.append(tuple(images.shape[-2:]))
        boxes = self.cxcywh.clone()
        if flipped:
            boxes[:, 0] = 1 - boxes[:, 0]
        logits = torch.full((1, len(boxes), self.num_classes), -10.0)
        logits[0, torch.arange(len(boxes)), self.labels] = 10.0
        return {"pred_logits": logits, "pred_boxes": boxes[None]}


def test_tta_merges_flip_and_scales(root):
    import torchvision.transforms.functional as F

    from model.postprocess import PostProcess

    ds = build_dataset(root, "val2017", train=False, transforms=None)
    image, target = ds[1]
    raw = F.to_tensor(image)
    h, w = raw.shape[1:]
    model = _OracleModel(target["boxes"], target["labels"], (h, w))
    results = evaluation.predict_tta(
        model,
        PostProcess(20),
        [raw],
        torch.tensor([[h, w]]),
        torch.device("cpu"),
        sizes=[96, 128],
        max_size=400,
        num_detections=20,
    )
    assert model.calls == [(96, 128), (96, 128), (128, 170), (128, 170)]
    r = results[0]
    assert len(r["scores"]) <= 20
    top = r["scores"].argsort(descending=True)[: len(target["labels"])]
    # the four passes' copies of each object merged into one box, in original-image coordinates
    for box, label in zip(target["boxes"], target["labels"]):
        same = (r["labels"] == label) & (torch.abs(r["boxes"] - box).max(1).values < 1.0)
        assert same.sum() == 1
        assert same[top].sum() == 1


def test_run_evaluation_with_tta(root):
    from builders import tiny_model_config

    from harness.config import DataConfig, RunConfig, TrainConfig
    from harness.run.loaders import build_eval_loader
    from model import build_model

    torch.manual_seed(0)
    cfg = RunConfig(
        model=tiny_model_config(dec_layers=1, num_feature_levels=2, enc_n_points=4, dec_n_points=4),
        data=DataConfig(root=root, num_workers=0, eval_size=64, max_size=96),
        train=TrainConfig(batch_size_per_gpu=2),
        eval=EvalConfig(tta=True, tta_sizes=(56, 64), num_detections=30),
    )
    model, _, post = build_model(cfg.model, num_detections=cfg.eval.num_detections)
    dataset, loader = build_eval_loader(cfg, root)
    metrics = evaluation.run_evaluation(
        model, post, loader, dataset, torch.device("cpu"), cfg.eval, cfg.data, verbose=False
    )
    assert metrics["num_images"] == 4 and metrics["num_detections"] == 30
    assert 0.0 <= metrics["AP"] <= 100.0


def test_no_ground_truth_of_a_size_is_no_value_and_tta_scales_keep_their_aspect(monkeypatch):
    """COCOeval's -1 (no object of that size in the split) is stored as None, never as an AP of 0; AP is read
    at our detections per image (COCOeval's summary looks for 100 and says -1 otherwise); the TTA long-side
    cap grows with the scale, so 900 and 1000 do not collapse onto one size."""
    import numpy as np

    from harness.run import evaluation

    class FakeEval:
        def __init__(self, *a, **k):
            self.params = type("P", (), {})()
            self.stats = np.array([-1.0, 0.7, 0.4, 0.2, 0.6, -1.0])  # [0]: COCOeval's maxDets-100 lookup
            self.eval = {"precision": np.full((10, 101, 2, 4, 3), 0.5)}

        def evaluate(self):
            pass

        accumulate = summarize = evaluate

    monkeypatch.setattr(evaluation, "COCOeval", FakeEval)
    coco = type("C", (), {"loadRes": lambda self, d: None})()
    numbers = evaluation.coco_metrics(coco, [{"image_id": 1}], [1], 100)
    assert numbers["APl"] is None and numbers["AP"] == 50.0
    sizes = []
    monkeypatch.setattr(
        evaluation.T, "resize", lambda img, target, size, max_size: sizes.append((size, max_size)) or (img, target)
    )
    monkeypatch.setattr(
        evaluation,
        "predict",
        lambda *a, **k: [
            {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
        ],
    )
    evaluation.predict_tta(
        None,
        None,
        [torch.zeros(3, 427, 640)],
        torch.tensor([[427, 640]]),
        torch.device("cpu"),
        [800, 1000],
        1333,
        100,
        flip=False,
        eval_size=800,
    )
    assert sizes == [(800, 1333), (1000, 1666)]
