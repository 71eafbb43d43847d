"""The inputs measurements run on: one fixed-size image, the first evaluation images, padded batches, and
targets for timing a training step."""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch

from harness.data import build_dataset, dataset_root

FIXED_SIZE = (800, 1199)  # the reference count: one 3 x 800 x 1199 image


def fixed_size_input(
    height: int = FIXED_SIZE[0], width: int = FIXED_SIZE[1], seed: int = 0, device="cpu"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One normalised-looking 1 x 3 x H x W image (seeded normal noise) with an all-False mask.

    The values only matter where the model's work depends on them (Faster R-CNN's proposals after NMS)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1, 3, height, width), generator=g).to(device)
    return [(image, torch.zeros((1, height, width), dtype=torch.bool, device=device))]


def evaluation_images(
    run_cfg, n: int, root: Optional[str] = None, output_dir: Optional[str] = None
) -> List[torch.Tensor]:
    """The first ``n`` images of the evaluation split, resized and normalised as at evaluation (C x H x W).

    ``root`` overrides ``data.root``; a synthetic set is generated under ``output_dir`` (or ``data.root``) if
    needed. Test-time augmentation is not applied: one forward pass per image.
    """
    data_cfg = run_cfg.data if root is None else dataclasses.replace(run_cfg.data, root=root)
    root = dataset_root(data_cfg, output_dir)
    dataset = build_dataset(root, data_cfg.val_split, train=False, data_cfg=data_cfg)
    if len(dataset) < n:
        warnings.warn(
            f"the evaluation split has {len(dataset)} images, fewer than the {n} asked for; using all of them",
            RuntimeWarning,
            stacklevel=2,
        )
    return [dataset[i][0] for i in range(min(n, len(dataset)))]


def pad_batch(images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """C x H x W images -> (B x C x H x W zero-padded bottom/right, B x H x W mask True on padding),
    like the evaluation loader's collate."""
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for img, pad, m in zip(images, out, mask):
        pad[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return out, mask


def make_batches(
    images: Union[Sequence[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    device,
    max_batches: Optional[int] = None,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Padded batches of ``batch_size`` on ``device``.

    ``images``: C x H x W tensors (consecutive groups, wrapping around to fill the last one; at most
    ``max_batches``) or one ready (images, mask) batch, used as it is.
    """
    device = torch.device(device)
    if isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], torch.Tensor) and images[0].dim() == 4:
        return [(images[0].to(device), images[1].to(device))]
    images = list(images)
    if not images:
        raise ValueError("no images to time")
    n_batches = max(1, -(-len(images) // batch_size))
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        group = [images[(b * batch_size + j) % len(images)].to(device) for j in range(batch_size)]
        batches.append(pad_batch(group))
    return batches


def synthetic_targets(
    batch_size: int, num_classes: int = 91, objects: int = 8, seed: int = 0, device="cpu"
) -> List[dict]:
    """Targets like the training loader's: ``labels`` (int64) and ``boxes`` (normalised cx, cy, w, h)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch_size):
        centre = 0.2 + 0.6 * torch.rand((objects, 2), generator=g)
        size = 0.05 + 0.3 * torch.rand((objects, 2), generator=g)
        labels = torch.randint(1, num_classes, (objects,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], 1).to(device)})
    return targets
