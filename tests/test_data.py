"""The COCO-format loader, the transforms and the synthetic set; clear errors for bad datasets."""

import filecmp
import json
import os
import shutil

import pytest
import torch

from harness.data import synthetic
from harness.data import transforms as T
from harness.data.coco import (
    CocoDetection,
    DatasetError,
    DegenerateBoxWarning,
    build_dataset,
    collate_fn,
    num_classes_of,
    split_paths,
)

CATEGORY_IDS = {c[0] for c in synthetic.CATEGORIES}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(
        str(tmp_path_factory.mktemp("data") / "synthetic"), num_train=6, num_val=3, image_size=(192, 256), seed=3
    )


def _copy(root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return str(dst)


def _rewrite(root, split, edit):
    _, ann_file = split_paths(root, split)
    with open(ann_file) as f:
        data = json.load(f)
    data = edit(data)
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return ann_file


# ------------------------------------------------------------------------------- synthetic set


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), num_train=3, num_val=2, image_size=(96, 128), seed=5)
    b = synthetic.generate(str(tmp_path / "b"), num_train=3, num_val=2, image_size=(96, 128), seed=5)
    for split in ("train2017", "val2017"):
        names = sorted(os.listdir(os.path.join(a, split)))
        assert names == sorted(os.listdir(os.path.join(b, split))) and names
        _, mismatch, errors = filecmp.cmpfiles(os.path.join(a, split), os.path.join(b, split), names, shallow=False)
        assert not mismatch and not errors
        assert filecmp.cmp(split_paths(a, split)[1], split_paths(b, split)[1], shallow=False)
    c = synthetic.generate(str(tmp_path / "c"), num_train=3, num_val=2, image_size=(96, 128), seed=6)
    assert not filecmp.cmp(split_paths(a, "train2017")[1], split_paths(c, "train2017")[1], shallow=False)


def test_synthetic_reuses_and_refuses_other_parameters(tmp_path):
    root = synthetic.generate(str(tmp_path / "s"), num_train=2, num_val=1, image_size=(64, 64), seed=0)
    assert synthetic.generate(root, num_train=2, num_val=1, image_size=(64, 64), seed=0) == root
    with pytest.raises(FileExistsError):
        synthetic.generate(root, num_train=3, num_val=1, image_size=(64, 64), seed=0)


def test_synthetic_full_coco_schema(root):
    with open(split_paths(root, "train2017")[1]) as f:
        data = json.load(f)
    assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
    assert {c["id"] for c in data["categories"]} == CATEGORY_IDS
    assert all("supercategory" in c and "name" in c for c in data["categories"])
    for ann in data["annotations"]:
        assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for img in data["images"]:
        assert os.path.isfile(os.path.join(root, "train2017", img["file_name"]))
        assert img["file_name"].endswith(".jpg")


def test_synthetic_sizes_and_crowd(root):
    counts = synthetic.summary(split_paths(root, "train2017")[1])
    assert counts["small"] > 0 and counts["medium"] > 0 and counts["large"] > 0
    assert counts["crowd"] >= 1


# --------------------------------------------------------------------------------------- loader


def test_loader_targets(root):
    ds = build_dataset(root, "train2017", train=False)
    assert len(ds) == 6 and num_classes_of(ds.coco) == 91
    crowd = [a for a in ds.coco.dataset["annotations"] if a["iscrowd"]]
    assert crowd
    seen_labels = set()
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = target["size"].tolist()
        assert image.shape == (3, h, w) and min(h, w) == 800
        assert target["boxes"].shape == (len(target["labels"]), 4)
        assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1
        assert target["labels"].dtype == torch.int64
        assert target["orig_size"].tolist() == [192, 256]
        img_id = int(target["image_id"])
        crowd_ids = {a["id"] for a in crowd if a["image_id"] == img_id}
        assert not crowd_ids & set(target["ann_ids"].tolist())  # crowd boxes stay out of the targets
        n_non_crowd = sum(1 for a in ds.coco.imgToAnns[img_id] if not a["iscrowd"])
        assert len(target["labels"]) == n_non_crowd
        seen_labels |= set(target["labels"].tolist())
    assert seen_labels <= CATEGORY_IDS
    assert seen_labels - set(range(len(CATEGORY_IDS))), "category ids are used as they are, not remapped"


def test_loader_box_matches_annotation(root):
    ds = build_dataset(root, "val2017", train=False, transforms=None)
    _, target = ds[0]
    img_id = int(target["image_id"])
    anns = {a["id"]: a for a in ds.coco.imgToAnns[img_id]}
    for ann_id, box in zip(target["ann_ids"].tolist(), target["boxes"].tolist()):
        x, y, w, h = anns[ann_id]["bbox"]
        assert box == pytest.approx([x, y, x + w, y + h], abs=1e-3)


def test_training_transforms_keep_boxes_valid(root):
    ds = build_dataset(root, "train2017", train=True, transforms=T.make_transforms(True, size=128, max_size=200))
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = image.shape[1:]
        assert max(h, w) <= 200
        b = target["boxes"]
        assert (b[:, 2:] > 0).all() and (b >= 0).all() and (b <= 1.0001).all()


def test_collate_pads_and_masks():
    a, b = torch.ones(3, 4, 6), torch.ones(3, 5, 3)
    images, mask, targets = collate_fn([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert not mask[0, :4, :6].any() and mask[0, 4:].all()
    assert not mask[1, :5, :3].any() and mask[1, :, 3:].all()
    assert images[1, :, :, 3:].abs().sum() == 0
    assert [t["i"] for t in targets] == [0, 1]


# ----------------------------------------------------------------------------------- transforms


def _target(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return {
        "boxes": boxes,
        "labels": torch.arange(len(boxes)),
        "area": (boxes[:, 2:] - boxes[:, :2]).prod(1),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }


def test_hflip_resize_crop_normalize():
    image = torch.rand(3, 40, 60)
    _, t = T.hflip(image, _target([[10, 5, 20, 15]]))
    assert t["boxes"].tolist() == [[40, 5, 50, 15]]
    img, t = T.resize(image, _target([[10, 5, 20, 15]]), 20)
    assert img.shape[1:] == (20, 30) and t["boxes"].tolist() == [[5, 2.5, 10, 7.5]]
    assert T.resized_shape((1000, 500), 800, 1333) == (666, 1332)  # long side capped (official rounding)
    img, t = T.crop(image, _target([[10, 5, 20, 15], [50, 30, 58, 38]]), (0, 0, 20, 30))
    assert img.shape[1:] == (20, 30) and t["boxes"].tolist() == [[10, 5, 20, 15]]  # the second box is cropped away
    assert t["labels"].tolist() == [0]
    _, t = T.Normalize()(torch.rand(3, 20, 40), _target([[0, 0, 20, 10]]))
    assert t["boxes"].tolist() == [[0.25, 0.25, 0.5, 0.5]]


def test_official_scales_follow_train_size():
    assert T.scaled(T.OFFICIAL_SCALES, 800) == list(range(480, 801, 32))
    assert T.scaled(T.OFFICIAL_SCALES, 128)[-1] == 128


# ------------------------------------------------------------------------------------------ errors


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="dataset root not found"):
        build_dataset(str(tmp_path / "nowhere"), "train2017", train=True)
    with pytest.raises(DatasetError, match="root"):
        build_dataset(None, "train2017", train=True)


def test_missing_annotation_file_and_folder(root, tmp_path):
    copy = _copy(root, tmp_path)
    os.remove(split_paths(copy, "val2017")[1])
    with pytest.raises(DatasetError, match="instances_val2017.json: annotation file not found"):
        build_dataset(copy, "val2017", train=False)
    with pytest.raises(DatasetError, match="image folder not found"):
        build_dataset(copy, "test-dev2017", train=False)


def test_missing_image(root, tmp_path):
    copy = _copy(root, tmp_path)
    name = sorted(os.listdir(os.path.join(copy, "train2017")))[2]
    os.remove(os.path.join(copy, "train2017", name))
    with pytest.raises(DatasetError, match=f"{name}.*image not found") as e:
        build_dataset(copy, "train2017", train=True)
    assert e.value.key == "file_name"


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2, 3]", "top level is a list"),
        ('{"images": []', "invalid JSON"),
        ('{"type": "instances"}', "has no 'images'"),
        ('{"images": [{"id": 1}]}', r"images\[0\] has no 'file_name'"),
        ('{"images": [], "annotations": []}', "has no 'categories'"),
    ],
)
def test_not_coco(root, tmp_path, content, match):
    copy = _copy(root, tmp_path)
    with open(split_paths(copy, "val2017")[1], "w") as f:
        f.write(content)
    with pytest.raises(DatasetError, match=match) as e:
        build_dataset(copy, "val2017", train=False)
    assert "instances_val2017.json" in str(e.value)


def test_empty_split(root, tmp_path):
    copy = _copy(root, tmp_path)
    _rewrite(copy, "val2017", lambda d: dict(d, images=[], annotations=[]))
    with pytest.raises(DatasetError, match="empty split"):
        build_dataset(copy, "val2017", train=False)


def test_undeclared_category(root, tmp_path):
    copy = _copy(root, tmp_path)

    def edit(d):
        d["annotations"][0]["category_id"] = 5
        return d

    _rewrite(copy, "val2017", edit)
    with pytest.raises(DatasetError, match="category_id 5 is not in 'categories'"):
        build_dataset(copy, "val2017", train=False)


def test_num_classes_too_small(root):
    with pytest.raises(DatasetError, match="num_classes >= 91"):
        build_dataset(root, "val2017", train=False, num_classes=45)


def test_degenerate_boxes_reported_with_ids(root, tmp_path):
    copy = _copy(root, tmp_path)
    bad = {}

    def edit(d):
        anns = [a for a in d["annotations"] if not a["iscrowd"]]
        anns[0]["bbox"][2] = 0.0  # zero width
        anns[1]["bbox"][3] = -4.0  # negative height
        anns[2]["bbox"][0] = 10_000.0  # outside the image
        bad.update({a["id"]: a["image_id"] for a in anns[:3]})
        return d

    _rewrite(copy, "val2017", edit)
    with pytest.warns(DegenerateBoxWarning) as record:
        ds = build_dataset(copy, "val2017", train=False)
    message = str(record[0].message)
    for ann_id in bad:
        assert str(ann_id) in message
    assert sorted(a["id"] for a in ds.degenerate) == sorted(bad)
    for i in range(len(ds)):  # dropped from the targets
        _, target = ds[i]
        assert not set(target["ann_ids"].tolist()) & set(bad)
        assert (target["boxes"][:, 2:] > 0).all()
    with pytest.raises(DatasetError, match="degenerate"):
        build_dataset(copy, "val2017", train=False, strict=True)


def test_test_dev_without_annotations(root, tmp_path):
    copy = _copy(root, tmp_path)
    os.rename(os.path.join(copy, "val2017"), os.path.join(copy, "test2017"))
    with open(split_paths(copy, "val2017")[1]) as f:
        data = json.load(f)
    info = {k: v for k, v in data.items() if k != "annotations"}
    with open(os.path.join(copy, "annotations", "image_info_test-dev2017.json"), "w") as f:
        json.dump(info, f)
    ds = build_dataset(copy, "test-dev2017", train=False)
    assert not ds.has_annotations
    image, target = ds[0]
    assert len(target["boxes"]) == 0 and image.shape[0] == 3
    assert isinstance(ds, CocoDetection)
