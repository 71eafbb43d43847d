"""Hugging Face transformers checkpoints <-> this project's (the official) state dicts, both directions.

Covers ``DeformableDetrForObjectDetection`` (SenseTime/deformable-detr, -with-box-refine,
-with-box-refine-two-stage, -single-scale on the hub) and ``DetrForObjectDetection`` (facebook/detr-resnet-50,
-dc5). The hub's converted official models build their ResNet with timm (``use_timm_backbone: true``), whose
key names are torchvision's; the Hugging Face ResNet (``use_timm_backbone: false``, a ``resnet``
``backbone_config``) is handled too.

- :func:`from_hf_folder` (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, sharded or not)
  and :func:`from_hf` (a state dict and its configuration, a dict or a transformers config) return
  ``(ModelConfig, state_dict)``; the state dict loads strictly into ``build_model(cfg)``.
- :func:`to_hf` returns ``(config dict, state dict)`` for transformers; :func:`save_hf_folder` writes a
  folder ``from_pretrained`` reads; :func:`hf_config` turns the dict into a transformers config.

Both key layouts of transformers are read: 4.x (the hub's files: ``backbone.conv_encoder``, ``fc1``,
``out_proj``) and 5.x (``backbone.model``, ``mlp.fc1``, ``o_proj``, which 5.x renames the files to on
loading). :func:`to_hf` writes the layout of the installed transformers unless told (``key_format``).

Strict in both directions: a key the converter does not expect, a missing key, a shape that does not fit,
heads that the official model shares but the checkpoint holds with different values, and a configuration
either side cannot express are a :class:`HFConversionError` naming them. Only BatchNorm's
``num_batches_tracked`` (a counter frozen BatchNorm has no use for) is dropped, deliberately. Keys that
transformers deduplicates when saving tied weights (the official model's shared heads) may be absent from a
file as long as one copy is there.

Only what shapes the weights and the forward pass comes from the transformers configuration. Matcher costs
and loss weights keep this project's (official) values: transformers' differ (Deformable DETR's
``class_cost: 1`` and a class loss weight of 1, where the official code uses 2 and 2) and train nothing
at inference. ``pretrained_backbone`` is false: every weight comes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from .checkpoint import CheckpointError
from .config import ModelConfig

V4, V5 = "v4", "v5"
_CONFIG = "transformers config"
TIMM, HF_RESNET = "timm", "hf"

# ResNet depths of the Hugging Face ResNet configuration <-> torchvision names
_HF_RESNET_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
# which of C3-C5 a model reads, by timm's out_indices and the HF ResNet's out_features
_TIMM_STAGES = (2, 3, 4)
_HF_STAGES = ("stage2", "stage3", "stage4")


class HFConversionError(CheckpointError):
    """A checkpoint or configuration that cannot be converted; the message names the keys or fields."""

    def __init__(self, path, message: str):
        RuntimeError.__init__(self, f"{path}: {message}")
        self.path, self.message = str(path), message


# ------------------------------------------------------------------------------------------ key layouts


def _to_v5(key: str) -> str:
    """A transformers key in the 5.x layout (a 4.x key renamed as transformers 5 renames it on loading)."""
    key = key.replace("model.backbone.conv_encoder.", "model.backbone.")
    key = key.replace("model.backbone.position_embedding.", "model.position_embedding.")
    key = key.replace(".out_proj.", ".o_proj.")
    return re.sub(r"layers\.(\d+)\.fc([12])\.", r"layers.\1.mlp.fc\2.", key)


def _to_v4(key: str) -> str:
    key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
    key = key.replace("model.position_embedding.", "model.backbone.position_embedding.")
    key = key.replace(".o_proj.", ".out_proj.")
    return re.sub(r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2.", key)


def installed_key_format() -> str:
    """The key layout of the installed transformers (``v4`` when it is not installed: the hub's files)."""
    try:
        import transformers
    except ImportError:
        return V4
    return V5 if int(transformers.__version__.split(".")[0]) >= 5 else V4


# ---------------------------------------------------------------------------------------- key mapping
# Rules pair a key of ours with a transformers (5.x) key. "<i>" stands for a number, "<p>" for weight or
# bias, "<*>" for any rest; both sides of a rule hold the same placeholders in the same order.
_PLACEHOLDERS = {"<i>": r"(\d+)", "<p>": r"(weight|bias)", "<*>": r"(.+)"}

_DEFORMABLE_RULES = [
    ("input_proj.<i>.<i>.<p>", "model.input_proj.<i>.<i>.<p>"),
    ("transformer.level_embed", "model.level_embed"),
    ("query_embed.weight", "model.query_position_embeddings.weight"),
    ("transformer.reference_points.<p>", "model.reference_points.<p>"),
    ("transformer.enc_output.<p>", "model.enc_output.<p>"),
    ("transformer.enc_output_norm.<p>", "model.enc_output_norm.<p>"),
    ("transformer.pos_trans.<p>", "model.pos_trans.<p>"),
    ("transformer.pos_trans_norm.<p>", "model.pos_trans_norm.<p>"),
    (
        "transformer.encoder.layers.<i>.self_attn.sampling_offsets.<p>",
        "model.encoder.layers.<i>.self_attn.sampling_offsets.<p>",
    ),
    (
        "transformer.encoder.layers.<i>.self_attn.attention_weights.<p>",
        "model.encoder.layers.<i>.self_attn.attention_weights.<p>",
    ),
    ("transformer.encoder.layers.<i>.self_attn.value_proj.<p>", "model.encoder.layers.<i>.self_attn.value_proj.<p>"),
    ("transformer.encoder.layers.<i>.self_attn.output_proj.<p>", "model.encoder.layers.<i>.self_attn.output_proj.<p>"),
    ("transformer.encoder.layers.<i>.norm1.<p>", "model.encoder.layers.<i>.self_attn_layer_norm.<p>"),
    ("transformer.encoder.layers.<i>.linear1.<p>", "model.encoder.layers.<i>.mlp.fc1.<p>"),
    ("transformer.encoder.layers.<i>.linear2.<p>", "model.encoder.layers.<i>.mlp.fc2.<p>"),
    ("transformer.encoder.layers.<i>.norm2.<p>", "model.encoder.layers.<i>.final_layer_norm.<p>"),
    (
        "transformer.decoder.layers.<i>.cross_attn.sampling_offsets.<p>",
        "model.decoder.layers.<i>.encoder_attn.sampling_offsets.<p>",
    ),
    (
        "transformer.decoder.layers.<i>.cross_attn.attention_weights.<p>",
        "model.decoder.layers.<i>.encoder_attn.attention_weights.<p>",
    ),
    (
        "transformer.decoder.layers.<i>.cross_attn.value_proj.<p>",
        "model.decoder.layers.<i>.encoder_attn.value_proj.<p>",
    ),
    (
        "transformer.decoder.layers.<i>.cross_attn.output_proj.<p>",
        "model.decoder.layers.<i>.encoder_attn.output_proj.<p>",
    ),
    ("transformer.decoder.layers.<i>.norm1.<p>", "model.decoder.layers.<i>.encoder_attn_layer_norm.<p>"),
    ("transformer.decoder.layers.<i>.self_attn.out_proj.<p>", "model.decoder.layers.<i>.self_attn.o_proj.<p>"),
    ("transformer.decoder.layers.<i>.norm2.<p>", "model.decoder.layers.<i>.self_attn_layer_norm.<p>"),
    ("transformer.decoder.layers.<i>.linear1.<p>", "model.decoder.layers.<i>.mlp.fc1.<p>"),
    ("transformer.decoder.layers.<i>.linear2.<p>", "model.decoder.layers.<i>.mlp.fc2.<p>"),
    ("transformer.decoder.layers.<i>.norm3.<p>", "model.decoder.layers.<i>.final_layer_norm.<p>"),
    ("class_embed.<i>.<p>", "class_embed.<i>.<p>"),
    ("bbox_embed.<i>.layers.<i>.<p>", "bbox_embed.<i>.layers.<i>.<p>"),
    # the official code registers the refinement / two-stage heads under the decoder as well
    ("transformer.decoder.class_embed.<i>.<p>", "model.decoder.class_embed.<i>.<p>"),
    ("transformer.decoder.bbox_embed.<i>.layers.<i>.<p>", "model.decoder.bbox_embed.<i>.layers.<i>.<p>"),
]
# nn.MultiheadAttention's fused in-projection [q; k; v] <-> three projections
_DEFORMABLE_FUSED = [("transformer.decoder.layers.<i>.self_attn.in_proj_<p>", "model.decoder.layers.<i>.self_attn")]

_DETR_RULES = [
    ("input_proj.<p>", "model.input_projection.<p>"),
    ("query_embed.weight", "model.query_position_embeddings.weight"),
    ("transformer.encoder.layers.<i>.self_attn.out_proj.<p>", "model.encoder.layers.<i>.self_attn.o_proj.<p>"),
    ("transformer.encoder.layers.<i>.norm1.<p>", "model.encoder.layers.<i>.self_attn_layer_norm.<p>"),
    ("transformer.encoder.layers.<i>.linear1.<p>", "model.encoder.layers.<i>.mlp.fc1.<p>"),
    ("transformer.encoder.layers.<i>.linear2.<p>", "model.encoder.layers.<i>.mlp.fc2.<p>"),
    ("transformer.encoder.layers.<i>.norm2.<p>", "model.encoder.layers.<i>.final_layer_norm.<p>"),
    ("transformer.decoder.layers.<i>.self_attn.out_proj.<p>", "model.decoder.layers.<i>.self_attn.o_proj.<p>"),
    ("transformer.decoder.layers.<i>.norm1.<p>", "model.decoder.layers.<i>.self_attn_layer_norm.<p>"),
    ("transformer.decoder.layers.<i>.multihead_attn.out_proj.<p>", "model.decoder.layers.<i>.encoder_attn.o_proj.<p>"),
    ("transformer.decoder.layers.<i>.norm2.<p>", "model.decoder.layers.<i>.encoder_attn_layer_norm.<p>"),
    ("transformer.decoder.layers.<i>.linear1.<p>", "model.decoder.layers.<i>.mlp.fc1.<p>"),
    ("transformer.decoder.layers.<i>.linear2.<p>", "model.decoder.layers.<i>.mlp.fc2.<p>"),
    ("transformer.decoder.layers.<i>.norm3.<p>", "model.decoder.layers.<i>.final_layer_norm.<p>"),
    ("transformer.decoder.norm.<p>", "model.decoder.layernorm.<p>"),
    ("class_embed.<p>", "class_labels_classifier.<p>"),
    ("bbox_embed.layers.<i>.<p>", "bbox_predictor.layers.<i>.<p>"),
]
_DETR_FUSED = [
    ("transformer.encoder.layers.<i>.self_attn.in_proj_<p>", "model.encoder.layers.<i>.self_attn"),
    ("transformer.decoder.layers.<i>.self_attn.in_proj_<p>", "model.decoder.layers.<i>.self_attn"),
    ("transformer.decoder.layers.<i>.multihead_attn.in_proj_<p>", "model.decoder.layers.<i>.encoder_attn"),
]

# the position encoding: only the learned one has weights
_POSITION_RULES = [
    ("backbone.1.row_embed.weight", "model.position_embedding.row_embeddings.weight"),
    ("backbone.1.col_embed.weight", "model.position_embedding.column_embeddings.weight"),
]

_BN = r"(weight|bias|running_mean|running_var)"


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(<i>|<p>|<\*>)", template)
    return re.compile("^" + "".join(_PLACEHOLDERS.get(p, re.escape(p)) for p in parts) + "$")


def _fill(template: str, groups: Iterable[str]) -> str:
    groups = iter(groups)
    return re.sub(r"<i>|<p>|<\*>", lambda _: next(groups), template)


class _Rules:
    """One-to-one rules (ours <-> theirs) and fused in-projections, compiled both ways."""

    def __init__(self, pairs, fused):
        self.pairs = [(_pattern(a), a, _pattern(b), b) for a, b in pairs]
        self.fused = [
            (_pattern(a), a, re.compile(_pattern(b).pattern[:-1] + r"\.(q|k|v)_proj\.(weight|bias)$"), b)
            for a, b in fused
        ]

    def ours_to_theirs(self, key: str):
        """A list of transformers keys for one key of ours (three for a fused in-projection), or None."""
        for ours, _, _, theirs in self.pairs:
            m = ours.match(key)
            if m:
                return [_fill(theirs, m.groups())]
        for ours, _, _, prefix in self.fused:
            m = ours.match(key)
            if m:
                base = _fill(prefix, m.groups()[:-1])
                return [f"{base}.{part}_proj.{m.groups()[-1]}" for part in "qkv"]
        return None

    def theirs_to_ours(self, key: str):
        """(key of ours, part) for a transformers key: part is None, or q/k/v of a fused in-projection."""
        for _, ours, theirs, _ in self.pairs:
            m = theirs.match(key)
            if m:
                return _fill(ours, m.groups()), None
        for _, ours, theirs, prefix in self.fused:
            m = theirs.match(key)
            if m:
                *numbers, part, kind = m.groups()
                return _fill(ours, numbers + [kind]), part
        return None, None


_RULES = {
    "deformable_detr": _Rules(_DEFORMABLE_RULES + _POSITION_RULES, _DEFORMABLE_FUSED),
    "detr": _Rules(_DETR_RULES + _POSITION_RULES, _DETR_FUSED),
}


# the backbone: timm's ResNet has torchvision's key names; the Hugging Face ResNet its own
def _backbone_to_theirs(rest: str, layout: str) -> Optional[str]:
    if layout == TIMM:
        return rest
    if rest == "conv1.weight":
        return "embedder.embedder.convolution.weight"
    m = re.match(r"^bn1\." + _BN + "$", rest)
    if m:
        return f"embedder.embedder.normalization.{m.group(1)}"
    m = re.match(r"^layer([1-4])\.(\d+)\.(conv|bn)([1-3])\.(.+)$", rest)
    if m:
        kind = "convolution" if m.group(3) == "conv" else "normalization"
        stage, block, conv = int(m.group(1)) - 1, m.group(2), int(m.group(4)) - 1
        return f"encoder.stages.{stage}.layers.{block}.layer.{conv}.{kind}.{m.group(5)}"
    m = re.match(r"^layer([1-4])\.(\d+)\.downsample\.([01])\.(.+)$", rest)
    if m:
        kind = "convolution" if m.group(3) == "0" else "normalization"
        return f"encoder.stages.{int(m.group(1)) - 1}.layers.{m.group(2)}.shortcut.{kind}.{m.group(4)}"
    return None


def _backbone_to_ours(rest: str, layout: str) -> Optional[str]:
    if layout == TIMM:
        return rest
    if rest == "embedder.embedder.convolution.weight":
        return "conv1.weight"
    m = re.match(r"^embedder\.embedder\.normalization\.(.+)$", rest)
    if m:
        return f"bn1.{m.group(1)}"
    m = re.match(r"^encoder\.stages\.([0-3])\.layers\.(\d+)\.layer\.([0-2])\.(convolution|normalization)\.(.+)$", rest)
    if m:
        kind = "conv" if m.group(4) == "convolution" else "bn"
        return f"layer{int(m.group(1)) + 1}.{m.group(2)}.{kind}{int(m.group(3)) + 1}.{m.group(5)}"
    m = re.match(r"^encoder\.stages\.([0-3])\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(.+)$", rest)
    if m:
        index = "0" if m.group(3) == "convolution" else "1"
        return f"layer{int(m.group(1)) + 1}.{m.group(2)}.downsample.{index}.{m.group(4)}"
    return None


_OURS_BACKBONE = "backbone.0.body."
_THEIRS_BACKBONE = "model.backbone.model."


# ------------------------------------------------------------------------------------- configurations


def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise HFConversionError(_CONFIG, f"expected a dict or a transformers config, got {type(hf_config).__name__}")


def _num_labels(c: dict) -> int:
    if c.get("id2label"):
        return len(c["id2label"])
    if c.get("num_labels"):
        return int(c["num_labels"])
    raise HFConversionError(_CONFIG, "names no classes (id2label or num_labels)")


def _backbone_of(c: dict, arch: str, levels: int) -> Tuple[str, str, bool]:
    """(backbone name, key layout, dilation) of a transformers configuration; 4.x and 5.x spellings."""
    bb = c.get("backbone_config")
    if hasattr(bb, "to_dict"):
        bb = bb.to_dict()
    dilation = bool(c.get("dilation") or False)
    # the stages the model reads must be the ones ours reads: C3-C5 (or the last ones), C5 for DETR
    wanted = 1 if arch == "detr" else min(levels, 3)
    if not bb:
        if c.get("use_timm_backbone", True) is False:
            raise HFConversionError(_CONFIG, "use_timm_backbone is false but there is no backbone_config")
        name = c.get("backbone") or "resnet50"
        layout, out = TIMM, None
    elif bb.get("model_type") == "timm_backbone":
        name, layout = bb.get("backbone") or c.get("backbone") or "resnet50", TIMM
        out = bb.get("out_indices")
        dilation = dilation or bb.get("output_stride") == 16
        if bb.get("output_stride") not in (None, 16, 32):
            raise HFConversionError(
                _CONFIG, f"backbone output_stride {bb['output_stride']} (expected 32, or 16 for DC5)"
            )
        if out is not None:
            out = list(out)
            if (arch == "detr" and out[-1] != 4) or (arch != "detr" and out != list(_TIMM_STAGES[3 - wanted :])):
                raise HFConversionError(
                    _CONFIG,
                    f"timm backbone out_indices {out} do not give the stages this "
                    f"model reads ({list(_TIMM_STAGES[3 - wanted :])})",
                )
    elif bb.get("model_type") == "resnet":
        layout = HF_RESNET
        problems = []
        depths = tuple(bb.get("depths", ()))
        if depths not in _HF_RESNET_DEPTHS:
            problems.append(f"depths {list(depths)} (expected those of ResNet-50 or -101)")
        for field_, expected in (
            ("layer_type", "bottleneck"),
            ("downsample_in_bottleneck", False),
            ("downsample_in_first_stage", False),
            ("embedding_size", 64),
            ("hidden_act", "relu"),
            ("hidden_sizes", [256, 512, 1024, 2048]),
        ):
            if field_ in bb and bb[field_] != expected:
                problems.append(f"{field_} {bb[field_]!r} (expected {expected!r})")
        out = bb.get("out_features")
        if out is not None and arch != "detr" and list(out) != list(_HF_STAGES[3 - wanted :]):
            problems.append(f"out_features {list(out)} (expected {list(_HF_STAGES[3 - wanted :])})")
        if out is not None and arch == "detr" and list(out)[-1] != "stage4":
            problems.append(f"out_features {list(out)} (expected to end with stage4)")
        if dilation:
            problems.append("dilation (transformers supports DC5 with the timm backbone only)")
        if problems:
            raise HFConversionError(
                _CONFIG, "the Hugging Face ResNet backbone differs from torchvision's: " + "; ".join(problems)
            )
        name = _HF_RESNET_DEPTHS[depths]
    else:
        raise HFConversionError(
            _CONFIG,
            f"backbone_config of model_type {bb.get('model_type')!r}: only ResNets (timm_backbone or resnet) convert",
        )
    from .config import BACKBONES

    if name not in BACKBONES:
        raise HFConversionError(_CONFIG, f"backbone {name!r} is not one of this project's ({', '.join(BACKBONES)})")
    return name, layout, dilation


def _check_equal(c: dict, pairs) -> None:
    for a, b in pairs:
        if a in c and b in c and c[a] != c[b]:
            raise HFConversionError(
                _CONFIG, f"{a} {c[a]} and {b} {c[b]} differ; this project's transformer uses one value for both"
            )


def _check_defaults(c: dict, fields) -> None:
    for key, expected in fields:
        if key in c and c[key] is not None and c[key] != expected:
            raise HFConversionError(
                _CONFIG, f"{key} {c[key]!r}: the official model has {expected!r} and this project no such setting"
            )


def config_from_hf(hf_config) -> Tuple[ModelConfig, str]:
    """This project's ModelConfig for a transformers configuration, and the backbone's key layout
    (``timm`` or ``hf``)."""
    c = _as_dict(hf_config)
    arch = c.get("model_type")
    if arch not in ("deformable_detr", "detr"):
        raise HFConversionError(_CONFIG, f"model_type {arch!r}: only deformable_detr and detr convert")
    _check_equal(c, [("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")])
    _check_defaults(
        c,
        [
            ("activation_function", "relu"),
            ("attention_dropout", 0.0),
            ("activation_dropout", 0.0),
            ("encoder_layerdrop", 0.0),
            ("decoder_layerdrop", 0.0),
            ("num_channels", 3),
        ],
    )
    levels = int(c.get("num_feature_levels", 1)) if arch == "deformable_detr" else 1
    backbone, layout, dilation = _backbone_of(c, arch, levels)
    common = dict(
        backbone=backbone,
        pretrained_backbone=False,
        dilation=dilation,
        hidden_dim=int(c.get("d_model", 256)),
        nheads=int(c.get("encoder_attention_heads", 8)),
        enc_layers=int(c.get("encoder_layers", 6)),
        dec_layers=int(c.get("decoder_layers", 6)),
        num_classes=_num_labels(c),
        dropout=float(c.get("dropout", 0.1)),
        position_embedding=c.get("position_embedding_type", "sine"),
    )
    if arch == "detr":
        if c.get("auxiliary_loss"):
            raise HFConversionError(
                _CONFIG,
                "auxiliary_loss true: transformers' DETR then applies the decoder's "
                "final LayerNorm between its layers (to the stream the next layer "
                "reads), the official DETR does not; its predictions would change",
            )
        cfg = ModelConfig.for_arch(
            "detr",
            dim_feedforward=int(c.get("encoder_ffn_dim", 2048)),
            num_queries=int(c.get("num_queries", 100)),
            **common,
        )
        return cfg, layout
    if levels == 2:
        raise HFConversionError(
            _CONFIG,
            "num_feature_levels 2: transformers' Deformable DETR reads C3-C5 whenever "
            "it has more than one level (1, 3 or more convert)",
        )
    if not c.get("return_intermediate", True):
        raise HFConversionError(_CONFIG, "return_intermediate false: the official decoder returns every layer")
    two_stage = bool(c.get("two_stage", False))
    queries = int(c.get("two_stage_num_proposals", 300) if two_stage else c.get("num_queries", 300))
    cfg = ModelConfig.for_arch(
        "deformable_detr",
        dim_feedforward=int(c.get("encoder_ffn_dim", 1024)),
        num_feature_levels=levels,
        enc_n_points=int(c.get("encoder_n_points", 4)),
        dec_n_points=int(c.get("decoder_n_points", 4)),
        with_box_refine=bool(c.get("with_box_refine", False)),
        two_stage=two_stage,
        num_queries=queries,
        **common,
    )
    return cfg, layout


def hf_config_dict(cfg: ModelConfig, backbone_layout: str = TIMM) -> dict:
    """The transformers configuration (a config.json dict) of a model of ours; :class:`HFConversionError`
    names a setting transformers cannot express."""
    _check_expressible(cfg, backbone_layout)
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
    c = dict(
        model_type=cfg.arch,
        d_model=cfg.hidden_dim,
        encoder_layers=cfg.enc_layers,
        decoder_layers=cfg.dec_layers,
        encoder_attention_heads=cfg.nheads,
        decoder_attention_heads=cfg.nheads,
        encoder_ffn_dim=cfg.dim_feedforward,
        decoder_ffn_dim=cfg.dim_feedforward,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        position_embedding_type=cfg.position_embedding,
        dilation=cfg.dilation,
        num_queries=cfg.num_queries,
        id2label=labels,
        label2id={v: int(k) for k, v in labels.items()},
        eos_coefficient=cfg.eos_coef,
    )
    # matcher costs and loss weights, for training with transformers: its fields are integers, so a value
    # that is not one is left at transformers' default (nothing at inference depends on them)
    for theirs, value in (
        ("class_cost", cfg.set_cost_class),
        ("bbox_cost", cfg.set_cost_bbox),
        ("giou_cost", cfg.set_cost_giou),
        ("bbox_loss_coefficient", cfg.bbox_loss_coef),
        ("giou_loss_coefficient", cfg.giou_loss_coef),
    ):
        if float(value).is_integer():
            c[theirs] = int(value)
    if cfg.arch == "deformable_detr":
        # transformers 5 ties every decoder layer's heads to layer 0's unless told otherwise: right for the
        # official model without refinement (one shared head), wrong with it (a head per layer)
        c.update(
            architectures=["DeformableDetrForObjectDetection"],
            num_feature_levels=cfg.num_feature_levels,
            tie_word_embeddings=not cfg.with_box_refine,
            encoder_n_points=cfg.enc_n_points,
            decoder_n_points=cfg.dec_n_points,
            with_box_refine=cfg.with_box_refine,
            two_stage=cfg.two_stage,
            two_stage_num_proposals=cfg.num_queries,
            focal_alpha=cfg.focal_alpha,
            return_intermediate=True,
        )
        c.update(auxiliary_loss=cfg.aux_loss)
    else:
        # transformers' DETR with auxiliary_loss applies the decoder's final LayerNorm between the layers
        # (to the stream the next layer reads), which the official DETR does not: off, the forward is the official
        c.update(architectures=["DetrForObjectDetection"], auxiliary_loss=False)
    if backbone_layout == TIMM:
        c.update(use_timm_backbone=True, backbone=cfg.backbone, use_pretrained_backbone=False)
    else:
        stages = ["stage4"] if cfg.arch == "detr" else list(_HF_STAGES[3 - min(cfg.num_feature_levels, 3) :])
        depths = next(d for d, name in _HF_RESNET_DEPTHS.items() if name == cfg.backbone)
        c.update(
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            backbone=None,
            backbone_config=dict(
                model_type="resnet",
                depths=list(depths),
                hidden_sizes=[256, 512, 1024, 2048],
                embedding_size=64,
                layer_type="bottleneck",
                hidden_act="relu",
                downsample_in_first_stage=False,
                downsample_in_bottleneck=False,
                out_features=stages,
            ),
        )
    return c


def hf_config(config_dict: dict):
    """The transformers config object of a config dict (needs transformers)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("transformers is not installed: pip install 'deformable-detr-tables[hf]'") from err
    cls = (
        transformers.DeformableDetrConfig if config_dict["model_type"] == "deformable_detr" else transformers.DetrConfig
    )
    c = dict(config_dict)
    c.pop("model_type", None)
    return cls(**c)


def _check_expressible(cfg: ModelConfig, backbone_layout: str) -> None:
    problems = []
    if cfg.arch not in ("deformable_detr", "detr"):
        problems.append(f"arch {cfg.arch!r} (transformers' Deformable DETR and DETR only)")
    if cfg.dcn:
        problems.append("dcn (transformers' backbones have no deformable convolution)")
    if cfg.neck != "none":
        problems.append(f"neck {cfg.neck!r}")
    if not cfg.ms_attention:
        problems.append("ms_attention false")
    if cfg.pre_norm:
        problems.append("pre_norm (transformers' DETR is post-norm)")
    if cfg.arch == "detr" and cfg.focal_loss:
        problems.append("focal_loss with DETR (transformers' DETR has the softmax head with a no-object class)")
    if cfg.arch == "deformable_detr" and cfg.num_feature_levels == 2:
        problems.append("num_feature_levels 2 (transformers reads C3-C5 whenever it has more than one level)")
    if backbone_layout not in (TIMM, HF_RESNET):
        problems.append(f"backbone layout {backbone_layout!r} (expected 'timm' or 'hf')")
    elif backbone_layout == HF_RESNET and cfg.backbone not in _HF_RESNET_DEPTHS.values():
        problems.append(f"backbone {cfg.backbone!r} with the Hugging Face ResNet (ResNet-50/101 only; use timm)")
    elif backbone_layout == HF_RESNET and cfg.dilation:
        problems.append("dilation with the Hugging Face ResNet (transformers supports DC5 with timm only)")
    if problems:
        raise HFConversionError(_CONFIG, "transformers cannot express " + "; ".join(problems))


# ------------------------------------------------------------------------------------ our model's keys


def _our_layout(cfg: ModelConfig):
    """Our model's keys and shapes, and the groups of keys that hold one shared tensor (built without memory)."""
    from .build import build_model

    cfg = dataclasses.replace(cfg, pretrained_backbone=False, attn_impl="auto")
    with torch.device("meta"):
        model = build_model(cfg)[0]
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    by_tensor: Dict[int, list] = {}
    for k, v in state.items():
        by_tensor.setdefault(id(v), []).append(k)
    groups = [g for g in by_tensor.values() if len(g) > 1]
    return shapes, groups


def _mismatch(path, shapes, state, origin: Callable[[str], str], side: str) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(state) if tuple(state[k].shape) != shapes[k])
    if not (missing or unexpected or wrong):
        return
    lines = [f"does not fit the {side}:"]
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected keys: "
            + ", ".join(origin(k) for k in unexpected[:12])
            + (" ..." if len(unexpected) > 12 else "")
        )
    if missing:
        lines.append(
            f"  {len(missing)} missing keys: "
            + ", ".join(origin(k) for k in missing[:12])
            + (" ..." if len(missing) > 12 else "")
        )
    for k in wrong[:8]:
        lines.append(f"  shape of {origin(k)}: {tuple(state[k].shape)}, expected {shapes[k]}")
    raise HFConversionError(path, "\n".join(lines))


# ------------------------------------------------------------------------------------------ converting


def from_hf(hf_state: dict, hf_config, path: str = "state dict") -> Tuple[ModelConfig, dict]:
    """``(ModelConfig, state dict of ours)`` for a transformers state dict (4.x or 5.x keys) and its
    configuration (a dict such as config.json, or a transformers config)."""
    cfg, layout = config_from_hf(hf_config)
    rules = _RULES[cfg.arch]
    out, origin, fused = {}, {}, {}
    unknown = []
    for key, value in hf_state.items():
        v5 = _to_v5(key)
        if v5.endswith(".num_batches_tracked"):
            continue  # BatchNorm's step counter: frozen BatchNorm keeps none
        if v5.startswith(_THEIRS_BACKBONE):
            rest = _backbone_to_ours(v5[len(_THEIRS_BACKBONE) :], layout)
            ours, part = (_OURS_BACKBONE + rest if rest is not None else None), None
        else:
            ours, part = rules.theirs_to_ours(v5)
        if ours is None:
            unknown.append(key)
            continue
        if part is None:
            if ours in out:
                raise HFConversionError(path, f"{key} and {origin[ours]} are the same weight ({ours})")
            out[ours], origin[ours] = value, key
        else:
            fused.setdefault(ours, {})[part] = (key, value)
    if unknown:
        raise HFConversionError(
            path,
            f"{len(unknown)} keys the converter does not expect for {cfg.arch} with a "
            f"{layout} backbone: " + ", ".join(unknown[:12]) + (" ..." if len(unknown) > 12 else ""),
        )
    for ours, parts in fused.items():
        if set(parts) != set("qkv"):
            some_key = next(iter(parts.values()))[0]
            absent = [some_key.replace(f"{next(iter(parts))}_proj", f"{p}_proj") for p in "qkv" if p not in parts]
            raise HFConversionError(path, "missing keys: " + ", ".join(absent))
        out[ours] = torch.cat([parts[p][1] for p in "qkv"], 0)
        origin[ours] = parts["q"][0].replace("q_proj", "{q,k,v}_proj")

    shapes, groups = _our_layout(cfg)
    _fill_shared(out, origin, groups, path)
    _mismatch(
        path,
        shapes,
        out,
        lambda k: origin.get(k) or _hf_name(k, rules, layout),
        f"{cfg.arch} model its config.json describes",
    )
    return cfg, {k: out[k] for k in shapes}


def _hf_name(key: str, rules: _Rules, layout: str) -> str:
    """The transformers key(s) of one key of ours, for messages."""
    if key.startswith(_OURS_BACKBONE):
        rest = _backbone_to_theirs(key[len(_OURS_BACKBONE) :], layout)
        return _THEIRS_BACKBONE + rest if rest is not None else key
    theirs = rules.ours_to_theirs(key)
    if not theirs:
        return key
    return theirs[0] if len(theirs) == 1 else theirs[0].replace(".q_proj.", ".{q,k,v}_proj.")


def _fill_shared(out: dict, origin: dict, groups, path) -> None:
    """The official model shares some heads (one class head and one box head for every decoder layer
    without refinement; the refinement / two-stage heads under the decoder too). A file may hold one copy or
    several: several must be equal; the absent ones are filled in."""
    for group in groups:
        present = [k for k in group if k in out]
        if not present:
            continue  # reported as missing
        first = present[0]
        for k in present[1:]:
            if out[k].shape != out[first].shape or not torch.equal(out[k], out[first]):
                raise HFConversionError(
                    path,
                    f"{origin[k]} differs from {origin[first]}; the official model "
                    "shares them (without with_box_refine one head serves every decoder "
                    "layer; the refinement and two-stage heads are the decoder's too)",
                )
        for k in group:
            if k not in out:
                out[k], origin[k] = out[first], origin[first]


def to_hf(
    cfg: ModelConfig, state: dict, key_format: Optional[str] = None, backbone_layout: str = TIMM
) -> Tuple[dict, dict]:
    """``(config dict, transformers state dict)`` for a model of ours: the state dict loads strictly into
    ``DeformableDetrForObjectDetection`` / ``DetrForObjectDetection`` built from ``hf_config(config dict)``.

    ``key_format``: ``v5`` (transformers 5.x module names) or ``v4`` (4.x, the hub's files, which 5.x also
    reads through ``from_pretrained``); default: the installed transformers'."""
    key_format = key_format or installed_key_format()
    if key_format not in (V4, V5):
        raise ValueError(f"key_format: got {key_format!r}, expected 'v4' or 'v5'")
    config = hf_config_dict(cfg, backbone_layout)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    shapes, _ = _our_layout(cfg)
    _mismatch("state dict", shapes, state, lambda k: k, f"{cfg.arch} model of this configuration")
    rules = _RULES[cfg.arch]
    out = {}
    for key, value in state.items():
        if key.startswith(_OURS_BACKBONE):
            rest = _backbone_to_theirs(key[len(_OURS_BACKBONE) :], backbone_layout)
            names = [_THEIRS_BACKBONE + rest] if rest is not None else None
        else:
            names = rules.ours_to_theirs(key)
        if names is None:
            raise HFConversionError("state dict", f"{key} has no transformers counterpart")
        chunks = value.chunk(3, 0) if len(names) == 3 else (value,)
        for n, v in zip(names, chunks):
            out[n if key_format == V5 else _to_v4(n)] = v
    return config, out


# ------------------------------------------------------------------------------------------- folders


def read_hf_state(folder: str) -> dict:
    """The weights of a transformers folder: model.safetensors or pytorch_model.bin, or their sharded form."""

    def load(name):
        p = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as err:
                raise ImportError("reading .safetensors needs safetensors: pip install safetensors") from err
            return load_file(p)
        return torch.load(p, map_location="cpu", weights_only=True)

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load(shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return load(name)
    raise HFConversionError(folder, "has no model.safetensors, pytorch_model.bin or an index of their shards")


def from_hf_folder(folder: str) -> Tuple[ModelConfig, dict]:
    """``(ModelConfig, state dict of ours)`` of a local transformers folder (config.json and its weights),
    such as a download of SenseTime/deformable-detr or facebook/detr-resnet-50."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise HFConversionError(folder, "has no config.json")
    with open(path) as f:
        config = json.load(f)
    return from_hf(read_hf_state(folder), config, path=folder)


def save_hf_folder(
    cfg: ModelConfig, state: dict, folder: str, key_format: str = V4, backbone_layout: str = TIMM
) -> None:
    """Write config.json and model.safetensors that transformers' ``from_pretrained`` reads (4.x keys by
    default, as the hub's files: transformers 5 renames them on loading)."""
    from safetensors.torch import save_file

    config, hf_state = to_hf(cfg, state, key_format=key_format, backbone_layout=backbone_layout)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    # the official model's shared heads are one tensor under several names: safetensors stores copies
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in hf_state.items()},
        os.path.join(folder, "model.safetensors"),
        metadata={"format": "pt"},
    )


def main(argv=None) -> int:
    """``python -m model.hf_convert HF_FOLDER OUT.pth``: an official-format checkpoint of a transformers
    folder, and the model settings to give the harness."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", help="a local transformers folder (config.json + weights)")
    parser.add_argument("output", help="where to write {'model': state_dict} (the official checkpoint format)")
    args = parser.parse_args(argv)
    cfg, state = from_hf_folder(args.folder)
    torch.save({"model": state}, args.output)
    defaults = ModelConfig.for_arch(cfg.arch)
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(defaults, f.name)
    }
    print(f"wrote {args.output}: {len(state)} tensors of a {cfg.arch} model")
    print("model settings: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
