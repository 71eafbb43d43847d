"""The multi-scale deformable attention module (projections around :func:`model.ops.ms_deform_attn`)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import ms_deform_attn, ms_deform_attn_softmax


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official parameters and initialisation.

    Each query predicts, per head, ``n_points`` sampling offsets on each of ``n_levels`` levels around
    its reference point, and softmax attention weights over all of them.

    ``per_level_softmax`` (the decoder with multi-scale attention off): the weights are normalised over
    the points of each level separately and the levels are averaged, so each level is attended by a
    separate single-scale deformable attention and no weight is shared across scales.

    ``fused_softmax`` (default): the softmax over all levels and points is computed inside the op
    (:func:`~model.ops.ms_deform_attn_softmax`); False computes it here first (the same function, for comparison).
    The parameters, and so the checkpoints, are the same either way.
    """

    def __init__(
        self, d_model=256, n_levels=4, n_heads=8, n_points=4, impl="auto", per_level_softmax=False, fused_softmax=True
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        self.per_level_softmax = per_level_softmax
        self.fused_softmax = fused_softmax
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # initial offsets: head h points in direction 2*pi*h/M, point k at distance k+1
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = grid_init / grid_init.abs().max(-1, keepdim=True)[0]
        grid_init = grid_init.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        query               N x Lq x C
        reference_points    N x Lq x L x 2 (x, y in [0, 1]) or N x Lq x L x 4 (boxes cx, cy, w, h)
        input_flatten       N x S x C, S = sum_l H_l * W_l
        input_spatial_shapes L x 2, input_level_start_index L, input_padding_mask N x S (True on padding)
        returns             N x Lq x C
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        sampling_offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        attention_weights = self.attention_weights(query)
        fused = self.fused_softmax and not self.per_level_softmax
        if self.per_level_softmax:
            attention_weights = F.softmax(attention_weights.view(N, Lq, M, L, P), -1) / L
        elif fused:
            attention_weights = attention_weights.view(N, Lq, M, L, P)  # logits: the op normalises them
        else:
            attention_weights = F.softmax(attention_weights.view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
        # sampling_locations: N x Lq x M x L x P x 2
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got shape {tuple(reference_points.shape)}")
        attend = ms_deform_attn_softmax if fused else ms_deform_attn
        output = attend(
            value, input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights, impl=self.impl
        )
        return self.output_proj(output)
