"""Position encodings of a feature map, from its padding mask."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """The sine encoding of "Attention is all you need", generalised to images.

    ``centre_offset`` = 0.5 is Deformable DETR's variant (pixel centres); DETR uses 0.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi, centre_offset=0.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.centre_offset = centre_offset

    def forward(self, mask):
        # mask: B x H x W (True on padding) -> B x 2*num_pos_feats x H x W
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - self.centre_offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - self.centre_offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row and column embeddings (feature maps up to 50 x 50)."""

    def __init__(self, num_pos_feats=256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask):
        h, w = mask.shape[-2:]
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(mask.shape[0], 1, 1, 1)


def build_position_encoding(cfg):
    n_steps = cfg.hidden_dim // 2
    if cfg.position_embedding == "learned":
        return PositionEmbeddingLearned(n_steps)
    offset = 0.5 if cfg.arch == "deformable_detr" else 0.0
    return PositionEmbeddingSine(n_steps, normalize=True, centre_offset=offset)
