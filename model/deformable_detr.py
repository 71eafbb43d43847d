"""Deformable DETR: backbone -> input projections (-> neck) -> deformable transformer -> heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone
from .box_ops import inverse_sigmoid
from .deformable_transformer import DeformableTransformer
from .heads import MLP, aux_outputs, get_clones
from .necks import build_neck


class DeformableDETR(nn.Module):
    def __init__(
        self,
        backbone,
        transformer,
        num_classes,
        num_queries,
        num_feature_levels,
        aux_loss=True,
        with_box_refine=False,
        two_stage=False,
        neck=None,
    ):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        # 1x1 projections of C3-C5 (or C5 alone), then stride-2 3x3 convs for the extra coarser levels
        num_backbone_outs = len(backbone.strides)
        input_proj = []
        for in_channels in backbone.num_channels:
            input_proj.append(
                nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            )
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - num_backbone_outs):
            input_proj.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim)
                )
            )
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(input_proj)
        self.backbone = backbone
        self.neck = neck
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        prior_prob = 0.01
        class_embed.bias.data = torch.ones(num_classes) * -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # with two-stage, the extra (last) heads score the encoder's proposals
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = get_clones(class_embed, num_pred)
            self.bbox_embed = get_clones(bbox_embed, num_pred)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias.data[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias.data[2:], -2.0)
            # one head shared by all layers, registered under every layer's name (official keys)
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)

    def forward(self, images, mask):
        """images: N x 3 x H x W, mask: N x H x W (True on padding) -> dict of predictions.

        pred_logits N x Q x classes, pred_boxes N x Q x 4 (normalised cx, cy, w, h), aux_outputs (one dict per
        earlier decoder layer), enc_outputs (two-stage: the encoder's proposals, N x S x ...).
        """
        features, masks, pos = self.backbone(images, mask)
        srcs = [proj(feat) for proj, feat in zip(self.input_proj, features)]
        masks, pos = list(masks[: len(srcs)]), list(pos[: len(srcs)])
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            m = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](m).to(src.dtype))
        if self.neck is not None:
            srcs = self.neck(srcs)

        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = self.transformer(
            srcs, masks, pos, query_embeds
        )

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_class = self.class_embed[lvl](hs[lvl])
            tmp = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                tmp = tmp + reference
            else:
                tmp = torch.cat([tmp[..., :2] + reference, tmp[..., 2:]], -1)
            outputs_classes.append(outputs_class)
            outputs_coords.append(tmp.sigmoid())
        outputs_class = torch.stack(outputs_classes)
        outputs_coord = torch.stack(outputs_coords)

        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = aux_outputs(outputs_class, outputs_coord)
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_outputs_class, "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out


def build(cfg):
    # C3-C5 (or the coarsest of them when fewer levels are asked for), then stride-2 convs for the rest
    backbone = build_backbone(cfg, num_outputs=min(cfg.num_feature_levels, 3))
    transformer = DeformableTransformer(
        d_model=cfg.hidden_dim,
        nhead=cfg.nheads,
        num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        num_feature_levels=cfg.num_feature_levels,
        dec_n_points=cfg.dec_n_points,
        enc_n_points=cfg.enc_n_points,
        two_stage=cfg.two_stage,
        two_stage_num_proposals=cfg.num_queries,
        ms_attention=cfg.ms_attention,
        attn_impl=cfg.attn_impl,
    )
    return DeformableDETR(
        backbone,
        transformer,
        cfg.num_classes,
        cfg.num_queries,
        cfg.num_feature_levels,
        aux_loss=cfg.aux_loss,
        with_box_refine=cfg.with_box_refine,
        two_stage=cfg.two_stage,
        neck=build_neck(cfg),
    )
