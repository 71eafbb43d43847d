"""COCO-format detection datasets through pycocotools (COCO 2017, the synthetic set, custom sets).

Layout of a root (the official one)::

    <root>/annotations/instances_train2017.json   <root>/train2017/*.jpg
    <root>/annotations/instances_val2017.json     <root>/val2017/*.jpg
    <root>/annotations/image_info_test-dev2017.json  <root>/test2017/*.jpg   (no annotations)

Class indices are the category ids of the annotation file, used as they are. COCO's ids run 1..90
with gaps (80 categories), so the classification head has ``max id + 1 = 91`` outputs, index 0 and
the gaps never being a target: this is the official convention and what released checkpoints
expect. A custom dataset needs ``model.num_classes >= max category id + 1``
(:func:`num_classes_of` gives it); :func:`build_dataset` checks it.

Problems in the files are found when the dataset is built, before any training step:

- a missing root, folder, annotation file or image, a file that is not COCO, an empty split or a
  category id that the file does not declare raise :class:`DatasetError` naming the path and key;
- degenerate boxes (zero or negative width/height, or nothing left inside the image after clipping)
  are dropped from the targets with a warning that lists their annotation ids, as the official
  loader drops them (COCO 2017 train itself has a few). ``strict=True`` makes them an error.
Crowd annotations (``iscrowd: 1``) are kept out of the targets; COCOeval uses them as ignore regions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Dict, List, Optional

import torch
from PIL import Image
from pycocotools.coco import COCO

from . import transforms as T


class DatasetError(Exception):
    """A dataset that cannot be used; ``path`` and ``key`` say where the problem is."""

    def __init__(self, path, message: str, key: Optional[str] = None):
        where = f"{path}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.key = key
        self.message = message


class DegenerateBoxWarning(UserWarning):
    pass


def split_paths(root: str, split: str):
    """(image folder, annotation file) of ``split`` under ``root``."""
    if split.startswith("test"):  # test-dev2017 / test2017: image info only, images in test2017/
        return os.path.join(root, "test2017"), os.path.join(root, "annotations", f"image_info_{split}.json")
    return os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json")


def _require(path, obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetError(path, f"not a COCO annotation file: {where} has no {key!r}", key=key)
    if not isinstance(obj[key], kind):
        raise DatasetError(
            path,
            f"not a COCO annotation file: {where}[{key!r}] is a {type(obj[key]).__name__}, expected a {kind.__name__}",
            key=key,
        )


def load_coco(ann_file: str) -> COCO:
    """Read and check a COCO annotation (or image-info) file; a pycocotools ``COCO`` object."""
    if not os.path.isfile(ann_file):
        raise DatasetError(ann_file, "annotation file not found")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(ann_file, f"not a COCO annotation file: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(
            ann_file,
            f"not a COCO annotation file: top level is a {type(data).__name__}, "
            "expected an object with 'images', 'annotations', 'categories'",
        )
    _require(ann_file, data, "images", list, "the file")
    for i, img in enumerate(data["images"]):
        for key, kind in (("id", int), ("file_name", str), ("height", int), ("width", int)):
            _require(ann_file, img, key, kind, f"images[{i}]")
    if "annotations" in data:
        _require(ann_file, data, "annotations", list, "the file")
        _require(ann_file, data, "categories", list, "the file")
        for i, cat in enumerate(data["categories"]):
            _require(ann_file, cat, "id", int, f"categories[{i}]")
        image_ids = {img["id"] for img in data["images"]}
        cat_ids = {cat["id"] for cat in data["categories"]}
        for i, ann in enumerate(data["annotations"]):
            for key, kind in (("id", int), ("image_id", int), ("category_id", int), ("bbox", list)):
                _require(ann_file, ann, key, kind, f"annotations[{i}]")
            if len(ann["bbox"]) != 4:
                raise DatasetError(
                    ann_file, f"annotation id {ann['id']}: bbox {ann['bbox']} is not [x, y, w, h]", key="bbox"
                )
            if ann["image_id"] not in image_ids:
                raise DatasetError(
                    ann_file,
                    f"annotation id {ann['id']}: image_id {ann['image_id']} is not in 'images'",
                    key="image_id",
                )
            if ann["category_id"] not in cat_ids:
                raise DatasetError(
                    ann_file,
                    f"annotation id {ann['id']}: category_id {ann['category_id']} is not "
                    f"in 'categories' (ids {sorted(cat_ids)})",
                    key="category_id",
                )
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        if any(c["id"] < 0 for c in data["categories"]):
            raise DatasetError(ann_file, "category ids must be >= 0 (they are the class indices)", key="categories")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def num_classes_of(coco: COCO) -> int:
    """Classification outputs a model needs for this file: max category id + 1 (COCO: 91)."""
    return max(coco.getCatIds(), default=0) + 1


def clip_boxes(anns, height: int, width: int):
    """xyxy boxes of ``anns`` clipped to the image, and a mask of the non-degenerate ones."""
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return boxes, keep


def degenerate_annotations(coco: COCO) -> List[dict]:
    """Non-crowd annotations whose box is empty once clipped to its image: ``{id, image_id, bbox}``."""
    bad = []
    for img_id, anns in coco.imgToAnns.items():
        img = coco.imgs[img_id]
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        if not anns:
            continue
        _, keep = clip_boxes(anns, img["height"], img["width"])
        bad += [dict(id=a["id"], image_id=img_id, bbox=a["bbox"]) for a, k in zip(anns, keep.tolist()) if not k]
    return sorted(bad, key=lambda a: a["id"])


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of one COCO-format split.

    A target holds ``boxes`` (xyxy pixels until :class:`transforms.Normalize`, then normalised cxcywh),
    ``labels`` (category ids, int64), ``area``, ``iscrowd``, ``image_id``, ``orig_size`` and ``size``
    (h, w). Crowd and degenerate boxes are not in it. ``transforms`` is called as
    ``transforms(image, target, rng)`` (the protocol of :mod:`.transforms`).
    """

    def __init__(self, img_folder: str, ann_file: str, transforms=None, strict: bool = False):
        if not os.path.isdir(img_folder):
            raise DatasetError(img_folder, "image folder not found")
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.coco = load_coco(ann_file)
        self.ids = sorted(self.coco.imgs)
        if not self.ids:
            raise DatasetError(ann_file, "empty split: the file lists no images", key="images")
        for img_id in self.ids:
            path = os.path.join(img_folder, self.coco.imgs[img_id]["file_name"])
            if not os.path.isfile(path):
                raise DatasetError(path, f"image not found (image id {img_id} in {ann_file})", key="file_name")
        self.has_annotations = "annotations" in self.coco.dataset
        self.degenerate = degenerate_annotations(self.coco) if self.has_annotations else []
        if self.degenerate:
            ids = [a["id"] for a in self.degenerate]
            shown = ", ".join(map(str, ids[:20])) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
            message = (
                f"{ann_file}: {len(ids)} degenerate box(es) (zero/negative size or outside the image), "
                f"annotation ids: {shown}"
            )
            if strict:
                raise DatasetError(ann_file, message.split(": ", 1)[1], key="bbox")
            warnings.warn(message + "; they are left out of the targets", DegenerateBoxWarning, stacklevel=2)
        self.transforms = transforms

    def __len__(self):
        return len(self.ids)

    def load_image(self, img_id: int) -> Image.Image:
        path = os.path.join(self.img_folder, self.coco.imgs[img_id]["file_name"])
        try:
            return Image.open(path).convert("RGB")
        except OSError as e:
            raise DatasetError(path, f"cannot read image (image id {img_id}): {e}") from None

    def target(self, img_id: int) -> Dict[str, torch.Tensor]:
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        boxes, keep = clip_boxes(anns, h, w)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
            "ann_ids": torch.tensor([a["id"] for a in anns], dtype=torch.int64),
        }
        T._keep(target, keep)
        target["image_id"] = torch.tensor(img_id)
        target["orig_size"] = torch.tensor([h, w])
        target["size"] = torch.tensor([h, w])
        return target

    def __getitem__(self, key):
        """Sample ``key``: a :class:`transforms.SampleKey` ``(index, epoch, seed)`` (what the training sampler
        yields) or a plain index (taken as epoch 0, seed 0). Random transforms draw from
        :func:`transforms.sample_rng` of the three, so the sample's augmentation depends on nothing else
        (not on the data-loader worker that loads it, nor on what was loaded before)."""
        index, epoch, seed = key if isinstance(key, tuple) else (key, 0, 0)
        img_id = self.ids[index]
        image = self.load_image(img_id)
        target = self.target(img_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target, T.sample_rng(seed, epoch, index))
        return image, target


def collate_fn(batch):
    """Pad a list of (image, target) into ``images`` B x 3 x H x W, ``mask`` B x H x W (True on padding)."""
    images, targets = zip(*batch)
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for img, pad, m in zip(images, out, mask):
        pad[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return out, mask, list(targets)


def check_root(root: Optional[str]) -> str:
    if not root:
        raise DatasetError("data.root", "no dataset root given (set data.root to the COCO folder)", key="root")
    if not os.path.isdir(root):
        raise DatasetError(
            root, "dataset root not found (expected annotations/, train2017/, val2017/ in it)", key="root"
        )
    return root


def build_dataset(
    root: str,
    split: str,
    train: bool,
    data_cfg=None,
    num_classes: Optional[int] = None,
    strict: bool = False,
    transforms="default",
) -> CocoDetection:
    """The dataset of ``split`` under ``root`` with the official transforms of ``data_cfg``: training
    (``train``) at the scales of ``data.train_size``, evaluation at ``data.eval_size``.

    ``num_classes`` (the model's) is checked against the file's largest category id.
    ``transforms=None`` gives PIL images and xyxy pixel targets (test-time augmentation does its own).
    """
    check_root(root)
    img_folder, ann_file = split_paths(root, split)
    if transforms == "default":
        kw = {}
        if data_cfg is not None:
            kw = dict(
                size=data_cfg.train_size if train else data_cfg.eval_size,
                max_size=data_cfg.max_size,
                augmentation=data_cfg.augmentation,
            )
        transforms = T.make_transforms(train, **kw)
    dataset = CocoDetection(img_folder, ann_file, transforms=transforms, strict=strict)
    needed = num_classes_of(dataset.coco)
    if num_classes is not None and dataset.has_annotations and num_classes < needed:
        raise DatasetError(
            ann_file,
            f"the largest category id is {needed - 1}, so the model needs "
            f"num_classes >= {needed}; model.num_classes is {num_classes}",
            key="categories",
        )
    return dataset
