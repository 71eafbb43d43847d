"""The sizes at which multi-scale deformable attention is measured: the encoder and decoder of Deformable DETR on an
800 x 1333 image (tools/gpu_check.py, the fused-softmax benchmark, model/ops/TRITON_NOTES.md).

Levels at strides 8, 16, 32 and 64 of the image (each a convolution of stride 2 of the one before, so sizes round
up): 100x167, 50x84, 25x42, 13x21, S = 22,223 positions; M = 8 heads of D = 32 channels, L = 4 levels, P = 4
points. Encoder: every position is a query (Lq = S); decoder: 300 queries. With a batch of 4: 711,136 and 9,600
(query, head) groups.

    preset("encoder", batch=4) -> Preset;  make_inputs(preset, device, dtype, softmax=True) -> op arguments
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STRIDES = (8, 16, 32, 64)
IMAGE = (800, 1333)
M, D, P = 8, 32, 4
DECODER_QUERIES = 300
NAMES = ("encoder", "decoder")


def levels(height: int = IMAGE[0], width: int = IMAGE[1], strides=STRIDES) -> list[tuple[int, int]]:
    """(H, W) of each level: the image halved (rounding up) down to each stride."""
    sizes, h, w = [], height, width
    stride = 1
    for target in strides:
        while stride < target:
            h, w, stride = math.ceil(h / 2), math.ceil(w / 2), stride * 2
        sizes.append((h, w))
    return sizes


@dataclass(frozen=True)
class Preset:
    name: str
    batch: int
    levels: tuple[tuple[int, int], ...]
    Lq: int
    M: int = M
    D: int = D
    P: int = P

    @property
    def L(self) -> int:
        return len(self.levels)

    @property
    def S(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def groups(self) -> int:
        """(query, head) groups: N * Lq * M."""
        return self.batch * self.Lq * self.M

    @property
    def points(self) -> int:
        """Sampling points (weights): N * Lq * M * L * P."""
        return self.groups * self.L * self.P

    def bytes(self, element_size: int) -> dict[str, int]:
        """Bytes of each tensor of the op, in a dtype of ``element_size`` bytes."""
        return {
            "value": self.batch * self.S * self.M * self.D * element_size,
            "sampling_locations": 2 * self.points * element_size,
            "attention_weights": self.points * element_size,
            "output": self.groups * self.D * element_size,
        }

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "batch": self.batch,
            "levels": [list(x) for x in self.levels],
            "Lq": self.Lq,
            "M": self.M,
            "D": self.D,
            "L": self.L,
            "P": self.P,
            "S": self.S,
            "groups": self.groups,
        }


def preset(name: str, batch: int = 4, height: int = IMAGE[0], width: int = IMAGE[1]) -> Preset:
    """The encoder (Lq = S) or decoder (Lq = 300) preset of a ``height`` x ``width`` image."""
    sizes = tuple(levels(height, width))
    S = sum(h * w for h, w in sizes)
    if name == "encoder":
        return Preset(name, batch, sizes, S)
    if name == "decoder":
        return Preset(name, batch, sizes, DECODER_QUERIES)
    raise ValueError(f"unknown preset {name!r}; choose one of {NAMES}")


def make_inputs(
    p: Preset,
    device="cpu",
    dtype=torch.float32,
    softmax: bool = True,
    seed: int = 0,
    location_dtype: torch.dtype | None = None,
):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights as the model makes them:
    encoder queries sample around their own pixel (the centres of every level's pixels), decoder queries around
    reference points spread over the image, offsets of a few pixels. ``softmax``: attention logits (for the fused
    softmax), else weights already normalised over the L * P points of each (query, head)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(p.levels, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    N, Lq, L = p.batch, p.Lq, p.L
    value = torch.randn(N, p.S, p.M, p.D, generator=g)
    if p.name == "encoder":
        reference = torch.cat(
            [
                torch.stack(
                    torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1
                ).reshape(-1, 2)
                for h, w in p.levels
            ]
        )[:Lq].view(1, Lq, 1, 1, 1, 2)
    else:
        reference = torch.rand(N, Lq, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(N, Lq, p.M, L, p.P, 2, generator=g) * 4 / shapes.flip(-1)[None, None, None, :, None, :]
    loc = reference + offsets
    attn = torch.randn(N, Lq, p.M, L, p.P, generator=g)
    if not softmax:
        attn = attn.flatten(-2).softmax(-1).view_as(attn)
    return (
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        loc.to(device, location_dtype or dtype),
        attn.to(device, dtype),
    )
