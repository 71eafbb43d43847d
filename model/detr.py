"""The DETR baseline (Carion et al., 2020) with dense attention, keyed like facebookresearch/detr.

DETR-DC5 is ``dilation: true``; DETR-DC5+ is ``focal_loss: true, num_queries: 300`` (sigmoid class
head without the no-object class, initialised to the focal-loss prior, like Deformable DETR).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone
from .heads import MLP, aux_outputs, get_clones, with_pos_embed


class TransformerEncoderLayer(nn.Module):
    """Sequence-first (S x N x C) encoder layer, post-norm by default, pre-norm with ``normalize_before``."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, src, src_key_padding_mask=None, pos=None):
        x = self.norm1(src) if self.normalize_before else src
        q = k = with_pos_embed(x, pos)
        src = src + self.dropout1(self.self_attn(q, k, value=x, key_padding_mask=src_key_padding_mask)[0])
        if not self.normalize_before:
            src = self.norm1(src)
        x = self.norm2(src) if self.normalize_before else src
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return src if self.normalize_before else self.norm2(src)


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _norm(self, norm, x, before):
        return norm(x) if self.normalize_before == before else x

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        x = self._norm(self.norm1, tgt, True)
        q = k = with_pos_embed(x, query_pos)
        tgt = self._norm(self.norm1, tgt + self.dropout1(self.self_attn(q, k, value=x)[0]), False)
        x = self._norm(self.norm2, tgt, True)
        tgt2 = self.multihead_attn(
            query=with_pos_embed(x, query_pos),
            key=with_pos_embed(memory, pos),
            value=memory,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        tgt = self._norm(self.norm2, tgt + self.dropout2(tgt2), False)
        x = self._norm(self.norm3, tgt, True)
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return self._norm(self.norm3, tgt, False)


class TransformerEncoder(nn.Module):
    def __init__(self, layer, num_layers, norm=None):
        super().__init__()
        self.layers = get_clones(layer, num_layers)
        self.norm = norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layer, num_layers, norm):
        super().__init__()
        self.layers = get_clones(layer, num_layers)
        self.norm = norm

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        # the shared final norm is applied to every layer's output: layers x Q x N x C
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        normalize_before=False,
    ):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(
            encoder_layer, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None
        )
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        # src, pos_embed: N x C x H x W; mask: N x H x W; query_embed: Q x C -> layers x N x Q x C
        bs = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(
            torch.zeros_like(query_embed), memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed
        )
        return hs.transpose(1, 2)


class DETR(nn.Module):
    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=True, focal_loss=False):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        # softmax head: one extra logit for "no object"
        self.class_embed = nn.Linear(hidden_dim, num_classes if focal_loss else num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        if focal_loss:
            # sigmoid focal loss: start every class at probability 0.01, as Deformable DETR's head does, so
            # the many background queries do not swamp the first iterations
            prior_prob = 0.01
            nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, images, mask):
        features, masks, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(features[-1]), masks[-1], self.query_embed.weight, pos[-1])
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = aux_outputs(outputs_class, outputs_coord)
        return out


def build(cfg):
    backbone = build_backbone(cfg, num_outputs=1)
    transformer = Transformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.nheads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        normalize_before=cfg.pre_norm,
    )
    return DETR(
        backbone, transformer, cfg.num_classes, cfg.num_queries, aux_loss=cfg.aux_loss, focal_loss=cfg.focal_loss
    )
