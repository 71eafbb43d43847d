"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against.

Shapes (the official op's):
    value               N x S x M x D     S = sum of H_l * W_l over levels, M heads, D channels per head
    spatial_shapes      L x 2 (int64)     (H_l, W_l)
    level_start_index   L (int64)         offset of level l in S
    sampling_locations  N x Lq x M x L x P x 2   normalised (x, y) in [0, 1] (outside: zero padding)
    attention_weights   N x Lq x M x L x P     (softmax=True: logits, normalised over the L * P points of each
                                               (batch, query, head), as the kernels' fused softmax does)
    output              N x Lq x (M * D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False
):
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # Mixed dtypes (float16 values, float32 locations, outside autocast) are computed in the widest of them and
    # returned in value's dtype, as the kernels do; grid_sample itself wants one dtype.
    compute_dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    output_dtype = value.dtype
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)
    if softmax:
        attention_weights = F.softmax(attention_weights.flatten(-2), -1).view_as(attention_weights)
    # grid_sample wants [-1, 1]; align_corners=False matches the kernels' pixel-centre convention.
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level in range(L):
        H, W = (int(x) for x in spatial_shapes[level])
        start = int(level_start_index[level])
        # N x HW x M x D -> N*M x D x H x W
        value_l = value[:, start : start + H * W].flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        # N x Lq x M x P x 2 -> N*M x Lq x P x 2
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # N*M x D x Lq x P
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # N x Lq x M x L x P -> N*M x 1 x Lq x L*P
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return output.transpose(1, 2).contiguous().to(output_dtype)
