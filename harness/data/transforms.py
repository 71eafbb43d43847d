"""Image + target transforms for detection (the official DETR / Deformable DETR augmentation).

Every transform takes and returns ``(image, target)``. Before :class:`Normalize`, ``image`` is a PIL
image (or a 3 x H x W float tensor after :class:`ToTensor`) and ``target["boxes"]`` holds absolute
``x0, y0, x1, y1`` pixel boxes; :class:`Normalize` turns the boxes into ``cx, cy, w, h`` relative to
the (augmented, unpadded) image, the form the criterion expects.

Randomness: a transform's third argument ``rng`` is the :class:`random.Random` it draws from. The
training dataset gives each sample its own, seeded by :func:`sample_rng` from ``(train.seed, epoch,
dataset index)`` (the training sampler's :class:`SampleKey`), so a sample's augmentation is the same
whichever process or data-loader worker loads it, in whatever order, and in a resumed run as in one
that never stopped; ``data.num_workers`` changes nothing. Without ``rng`` (a transform called on its
own) they draw from the global :mod:`random`. No transform here draws from torch; one that needs to
should seed a ``torch.Generator`` from ``rng.getrandbits(63)``, never use torch's global generator.
"""

from __future__ import annotations

import hashlib
import random
from typing import NamedTuple, Optional, Sequence

import torch
import torchvision.transforms.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official training scales, defined for a training short side of 800 (``main.py`` of DETR).
OFFICIAL_SCALES = tuple(range(480, 801, 32))
OFFICIAL_CROP_RESIZE = (400, 500, 600)
OFFICIAL_CROP_RANGE = (384, 600)


class SampleKey(NamedTuple):
    """What the training sampler yields for one sample: its dataset index and what seeds its augmentation."""

    index: int
    epoch: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset sample ``index`` in ``epoch`` of a run seeded ``seed``: a hash of the
    three, the same in every process (no dependence on Python's per-process hash salt)."""
    digest = hashlib.sha256(f"augmentation:{int(seed)}:{int(epoch)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator the transforms of sample ``index`` draw from in ``epoch`` (see the module docs)."""
    return random.Random(sample_seed(seed, epoch, index))


def _image_size(image):
    """(width, height) of a PIL image or a C x H x W tensor."""
    if isinstance(image, torch.Tensor):
        return image.shape[-1], image.shape[-2]
    return image.size


def _keep(target, keep):
    for key in ("boxes", "labels", "area", "iscrowd", "ann_ids"):
        if key in target:
            target[key] = target[key][keep]


def crop(image, target, region):
    top, left, height, width = region
    image = F.crop(image, top, left, height, width)
    target = target.copy()
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([width, height], dtype=torch.float32))
        boxes = boxes.clamp(min=0)
        target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        target["boxes"] = boxes.reshape(-1, 4)
        # objects cropped away entirely leave the target
        _keep(target, torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1))
    return image, target


def hflip(image, target):
    width, _ = _image_size(image)
    image = F.hflip(image)
    target = target.copy()
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor(
            [width, 0, width, 0]
        )
    return image, target


def resized_shape(image_size, size: int, max_size: Optional[int] = None):
    """(h, w) with the short side ``size``, the long side at most ``max_size`` (official rule)."""
    w, h = image_size
    if max_size is not None:
        min_orig, max_orig = float(min(w, h)), float(max(w, h))
        if max_orig / min_orig * size > max_size:
            size = int(round(max_size * min_orig / max_orig))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size: int, max_size: Optional[int] = None):
    old_w, old_h = _image_size(image)
    new_h, new_w = resized_shape((old_w, old_h), size, max_size)
    image = F.resize(image, [new_h, new_w], antialias=True)
    if target is None:
        return image, None
    ratio_w, ratio_h = new_w / old_w, new_h / old_h
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target, rng=None):
        if (rng or random).random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the short side to a size drawn from ``sizes`` (long side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target, rng=None):
        return resize(image, target, (rng or random).choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region whose sides are drawn from [min_size, max_size] (capped by the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target, rng=None):
        rng = rng or random
        img_w, img_h = _image_size(image)
        w = rng.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        h = rng.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        top = rng.randint(0, img_h - h)
        left = rng.randint(0, img_w - w)
        return crop(image, target, (top, left, h, w))


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p=0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target, rng=None):
        if (rng or random).random() < self.p:
            return self.first(image, target, rng)
        return self.second(image, target, rng)


class ToTensor:
    def __call__(self, image, target, rng=None):
        return F.to_tensor(image), target


class Normalize:
    """ImageNet normalisation; boxes become normalised ``cx, cy, w, h``."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image, target, rng=None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        h, w = image.shape[-2:]
        if "boxes" in target:
            x0, y0, x1, y1 = target["boxes"].unbind(-1)
            boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
            target["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng=None):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


def scaled(sizes: Sequence[int], train_size: int):
    """The official training sizes (defined for a training short side of 800) scaled to ``train_size``."""
    return [max(1, int(round(s * train_size / 800))) for s in sizes]


def make_transforms(train: bool, size: int = 800, max_size: int = 1333, augmentation: str = "official"):
    """The official training / evaluation pipeline; ``size`` is ``data.train_size`` for training,
    ``data.eval_size`` for evaluation.

    Training (``augmentation="official"``): random horizontal flip, then with probability 1/2 a
    multi-scale resize of the short side (480..800 step 32, long side <= max_size), otherwise a resize
    to 400/500/600, a random crop with sides in 384..600 and the same multi-scale resize. All sizes are
    the official ones scaled by ``size / 800`` (``data.train_size``; 800 is the official recipe), so smoke
    runs with small images keep the recipe's proportions. ``augmentation="none"`` trains at short side
    ``size`` (long side <= max_size), without flips.
    Evaluation: resize of the short side to ``size`` (long side <= max_size).
    """
    normalize = Compose([ToTensor(), Normalize()])
    if not train or augmentation == "none":
        return Compose([RandomResize([size], max_size=max_size), normalize])
    if augmentation != "official":
        raise ValueError(f"augmentation: got {augmentation!r}, expected 'official' or 'none'")
    scales = scaled(OFFICIAL_SCALES, size)
    crop_min, crop_max = scaled(OFFICIAL_CROP_RANGE, size)
    return Compose(
        [
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose(
                    [
                        RandomResize(scaled(OFFICIAL_CROP_RESIZE, size)),
                        RandomSizeCrop(crop_min, crop_max),
                        RandomResize(scales, max_size=max_size),
                    ]
                ),
            ),
            normalize,
        ]
    )
