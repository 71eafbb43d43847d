"""A synthetic dataset in COCO format: what smoke runs and tests train and evaluate on.

Each image is a noisy background with a few filled shapes; a category has its own shape and colour,
so the set is easy to learn. Category ids are non-contiguous like COCO's ({1, 3, 7, 18, 44, 90}), object
sizes cover COCO's small / medium / large ranges (area < 32², < 96², larger) where the image allows,
and the first image of each split has a crowd annotation (``iscrowd: 1``, RLE segmentation). The files
are real JPEGs plus ``annotations/instances_<split>.json`` with the full COCO schema, read by the very
same loader as COCO. Everything follows from the arguments: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# id, name, supercategory, shape, colour
CATEGORIES = (
    (1, "square", "polygon", "rectangle", (220, 40, 40)),
    (3, "disc", "round", "ellipse", (40, 190, 60)),
    (7, "triangle", "polygon", "triangle", (50, 80, 230)),
    (18, "diamond", "polygon", "diamond", (235, 210, 40)),
    (44, "hexagon", "polygon", "hexagon", (200, 50, 200)),
    (90, "cross", "polygon", "cross", (40, 210, 220)),
)
SIZE_RANGES = {"small": (12.0, 28.0), "medium": (38.0, 88.0), "large": (100.0, 170.0)}  # sqrt(area) in pixels
VERSION = 1


def shape_polygon(shape: str, x: float, y: float, w: float, h: float):
    """Polygon (list of (x, y)) of ``shape`` filling the box (x, y, w, h)."""
    if shape == "rectangle":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "ellipse":
        pts = [
            (0.5 + 0.5 * math.cos(2 * math.pi * i / 32), 0.5 + 0.5 * math.sin(2 * math.pi * i / 32)) for i in range(32)
        ]
    elif shape == "triangle":
        pts = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "diamond":
        pts = [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    elif shape == "hexagon":
        pts = [(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)]
    elif shape == "cross":
        a, b = 1 / 3, 2 / 3
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(shape)
    return [(x + px * w, y + py * h) for px, py in pts]


def polygon_area(pts) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


def _iou(a, b):
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _place(rng, w, h, width, height, boxes, max_iou=0.05, tries=60):
    for _ in range(tries):
        x = rng.uniform(1, width - w - 1)
        y = rng.uniform(1, height - h - 1)
        box = (x, y, w, h)
        if all(_iou(box, b) <= max_iou for b in boxes):
            return box
    return None


def _draw_object(draw, rng, cat, size_class, width, height, boxes, fill_factor):
    cat_id, _, _, shape, colour = cat
    lo, hi = SIZE_RANGES[size_class]
    hi = min(hi, math.sqrt(0.45 * width * height * fill_factor))
    if hi < lo:
        return None
    side = rng.uniform(lo, hi) / math.sqrt(fill_factor)  # bbox side giving the wanted polygon area
    aspect = rng.uniform(0.75, 1.33)
    w, h = min(side * aspect, width - 3), min(side / aspect, height - 3)
    box = _place(rng, w, h, width, height, boxes)
    if box is None:
        return None
    pts = shape_polygon(shape, *box)
    jitter = rng.randint(-20, 21, size=3)
    draw.polygon(pts, fill=tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return dict(
        category_id=cat_id,
        bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        area=round(polygon_area(pts), 2),
        iscrowd=0,
        segmentation=[[round(v, 2) for p in pts for v in p]],
    ), box


FILL = {"rectangle": 1.0, "ellipse": 0.78, "triangle": 0.5, "diamond": 0.5, "hexagon": 0.75, "cross": 5 / 9}


def _crowd(draw, rng, width, height, boxes):
    """A cluster of small shapes of one category under a single ``iscrowd`` box."""
    cat = CATEGORIES[rng.randint(len(CATEGORIES))]
    cw, ch = min(48.0, width / 3), min(36.0, height / 3)
    box = _place(rng, cw, ch, width, height, boxes)
    if box is None:
        return None
    x, y, cw, ch = box
    n = 3
    for i in range(n):
        for j in range(2):
            pts = shape_polygon(cat[3], x + i * cw / n + 1, y + j * ch / 2 + 1, cw / n - 2, ch / 2 - 2)
            draw.polygon(pts, fill=cat[4])
    x0, y0, x1, y1 = int(math.floor(x)), int(math.floor(y)), int(math.ceil(x + cw)), int(math.ceil(y + ch))
    m = np.zeros((height, width), dtype=np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(
        category_id=cat[0],
        bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        area=float(mask_utils.area(rle)),
        iscrowd=1,
        segmentation=rle,
    ), box


def make_image(rng, width: int, height: int, num_objects: Tuple[int, int], size_classes: Sequence[str], crowd: bool):
    base = rng.randint(70, 170, size=3)
    pixels = base[None, None, :] + rng.normal(0, 14, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    n = rng.randint(num_objects[0], num_objects[1] + 1)
    wanted = [size_classes[rng.randint(len(size_classes))] for _ in range(n)]
    order = {"large": 0, "medium": 1, "small": 2}
    wanted.sort(key=order.get)  # large first, so smaller ones are never hidden
    anns, boxes = [], []
    if crowd:
        out = _crowd(draw, rng, width, height, boxes)
        if out is not None:
            anns.append(out[0])
            boxes.append(out[1])
    for size_class in wanted:
        cat = CATEGORIES[rng.randint(len(CATEGORIES))]
        out = _draw_object(draw, rng, cat, size_class, width, height, boxes, FILL[cat[3]])
        if out is None and size_class == "large":
            out = _draw_object(draw, rng, cat, "medium", width, height, boxes, FILL[cat[3]])
        if out is not None:
            anns.append(out[0])
            boxes.append(out[1])
    return image, anns


def generate_split(
    root: str,
    split: str,
    num_images: int,
    image_size=(192, 256),
    seed: int = 0,
    num_objects=(2, 5),
    size_classes=("small", "medium", "large"),
    first_image_id: int = 1,
):
    """Write ``<root>/<split>/*.jpg`` and ``<root>/annotations/instances_<split>.json``."""
    height, width = image_size
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img_id = first_image_id + i
        file_name = f"{img_id:012d}.jpg"
        image, anns = make_image(rng, width, height, num_objects, size_classes, crowd=(i == 0))
        image.save(os.path.join(root, split, file_name), format="JPEG", quality=92)
        images.append(
            dict(
                id=img_id,
                file_name=file_name,
                height=height,
                width=width,
                license=1,
                coco_url="",
                flickr_url="",
                date_captured="2021-01-01 00:00:00",
            )
        )
        for k, ann in enumerate(anns):
            annotations.append(dict(id=img_id * 100 + k, image_id=img_id, **ann))
    data = dict(
        info=dict(
            description=f"Synthetic COCO-format detection set ({split})",
            url="",
            version=str(VERSION),
            year=2021,
            contributor="harness.data.synthetic",
            date_created="2021-01-01",
        ),
        licenses=[dict(id=1, name="Public domain (generated)", url="")],
        images=images,
        annotations=annotations,
        categories=[dict(id=c[0], name=c[1], supercategory=c[2]) for c in CATEGORIES],
    )
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)
    return data


def generate(root: str, num_train: int = 32, num_val: int = 8, image_size=(192, 256), seed: int = 0, **kwargs) -> str:
    """A synthetic ``train2017`` / ``val2017`` pair at ``root`` (made once: an existing complete set with
    the same parameters is reused). Written in a temporary folder and moved into place, so concurrent
    callers and interrupted runs never see half a dataset."""
    params = dict(
        version=VERSION,
        num_train=num_train,
        num_val=num_val,
        image_size=list(image_size),
        seed=seed,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
    )
    marker = os.path.join(root, "synthetic.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
        raise FileExistsError(
            f"{root} holds a synthetic set made with other parameters ({marker}); remove it or choose another folder"
        )
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        generate_split(tmp, "train2017", num_train, image_size, seed, first_image_id=1, **kwargs)
        generate_split(tmp, "val2017", num_val, image_size, seed + 1, first_image_id=num_train + 1, **kwargs)
        with open(os.path.join(tmp, "synthetic.json"), "w") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first (or root exists but is empty)
            if os.path.isdir(root) and not os.listdir(root):
                os.rmdir(root)
                os.rename(tmp, root)
            elif not os.path.isfile(marker):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate_from_config(data_cfg, root: str) -> str:
    """The synthetic set a :class:`harness.config.DataConfig` describes, at ``root``."""
    return generate(
        root,
        num_train=data_cfg.synthetic_train_images,
        num_val=data_cfg.synthetic_val_images,
        image_size=tuple(data_cfg.synthetic_image_size),
        seed=data_cfg.synthetic_seed,
    )


def summary(ann_file: str) -> Dict[str, int]:
    """Counts by COCO size range, crowd and category of a generated file (for tests and docs)."""
    with open(ann_file) as f:
        data = json.load(f)
    out = {"small": 0, "medium": 0, "large": 0, "crowd": 0, "images": len(data["images"])}
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            out["crowd"] += 1
        elif ann["area"] < 32**2:
            out["small"] += 1
        elif ann["area"] < 96**2:
            out["medium"] += 1
        else:
            out["large"] += 1
    return out
