"""Feature-pyramid necks on the projected multi-scale inputs (Table 2's FPN and BiFPN rows).

Both act on the L projected maps (N x C x H_l x W_l, finest first, strides 8..64) after ``input_proj`` and
return maps of the same shapes, so the transformer is unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv_gn(channels, groups=32):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels))


class FPN(nn.Module):
    """Top-down pathway of Lin et al. (2017): p_l = conv3x3(x_l + upsample(p_{l+1}))."""

    def __init__(self, channels, num_levels):
        super().__init__()
        self.output_convs = nn.ModuleList(_conv_gn(channels) for _ in range(num_levels))

    def forward(self, feats):
        top_down = [None] * len(feats)
        prev = None
        for lvl in range(len(feats) - 1, -1, -1):
            x = feats[lvl]
            if prev is not None:
                x = x + F.interpolate(prev, size=x.shape[-2:], mode="nearest")
            top_down[lvl] = prev = x
        return [conv(x) for conv, x in zip(self.output_convs, top_down)]


class _WeightedFusion(nn.Module):
    """EfficientDet's fast normalised fusion: sum_i relu(w_i) x_i / (eps + sum_i relu(w_i)), then a conv."""

    def __init__(self, channels, num_inputs, eps=1e-4):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps
        # depthwise-separable 3x3 conv, as in EfficientDet
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.Conv2d(channels, channels, 1),
            nn.GroupNorm(32, channels),
        )

    def forward(self, inputs):
        w = F.relu(self.weights)
        w = w / (w.sum() + self.eps)
        return self.conv(F.silu(sum(wi * x for wi, x in zip(w, inputs))))


class BiFPNLayer(nn.Module):
    """One BiFPN layer (Tan et al., 2020): a weighted top-down pass, then a weighted bottom-up pass."""

    def __init__(self, channels, num_levels):
        super().__init__()
        self.top_down = nn.ModuleList(_WeightedFusion(channels, 2) for _ in range(num_levels - 1))
        # levels 1..L-1; the finest level's output is its top-down result
        self.bottom_up = nn.ModuleList(
            _WeightedFusion(channels, 3 if lvl < num_levels - 1 else 2) for lvl in range(1, num_levels)
        )

    def forward(self, feats):
        L = len(feats)
        td = [None] * L
        td[-1] = feats[-1]
        for lvl in range(L - 2, -1, -1):
            up = F.interpolate(td[lvl + 1], size=feats[lvl].shape[-2:], mode="nearest")
            td[lvl] = self.top_down[lvl]([feats[lvl], up])
        out = [td[0]]
        for lvl in range(1, L):
            down = F.adaptive_max_pool2d(out[-1], feats[lvl].shape[-2:])
            inputs = [feats[lvl], td[lvl], down] if lvl < L - 1 else [feats[lvl], down]
            out.append(self.bottom_up[lvl - 1](inputs))
        return out


class BiFPN(nn.Module):
    def __init__(self, channels, num_levels, num_layers=1):
        super().__init__()
        self.layers = nn.ModuleList(BiFPNLayer(channels, num_levels) for _ in range(num_layers))

    def forward(self, feats):
        for layer in self.layers:
            feats = layer(feats)
        return feats


def build_neck(cfg):
    if cfg.neck == "fpn":
        return FPN(cfg.hidden_dim, cfg.num_feature_levels)
    if cfg.neck == "bifpn":
        return BiFPN(cfg.hidden_dim, cfg.num_feature_levels)
    return None
