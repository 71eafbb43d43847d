"""The model's typed configuration and its validation.

Field names follow the official command-line flags (fundamentalvision/Deformable-DETR ``main.py``)
where one exists. Defaults are the official Deformable DETR ResNet-50 defaults; :func:`arch_defaults`
gives the defaults of the DETR baseline (facebookresearch/detr) for the same fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

ARCHS = ("deformable_detr", "detr", "faster_rcnn")
BACKBONES = ("resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")
NECKS = ("none", "fpn", "bifpn")
ATTN_IMPLS = ("auto", "cuda", "triton", "cpu", "pytorch")
RCNN_BOX_LOSSES = ("smooth_l1", "giou")  # Faster R-CNN's box regression losses (box head and RPN)
# torchvision's ImageNet weights per backbone, by enum member (model.backbone_weights may name one);
# V1 are the classic recipe's, V2 torchvision's 2021-2022 recipes (stronger: higher ImageNet top-1)
BACKBONE_WEIGHTS = {
    "resnet50": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
    "resnet101": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
    "resnext101_32x8d": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
    "resnext101_64x4d": ("IMAGENET1K_V1",),
}


# ------------------------------------------------------------------------------------------ field roles
# What a config field changes decides which identity it enters (harness.grid.identity hashes them):
WEIGHTS = "weights"  # the trained weights: the run id (a new training)
EVALUATION = "evaluation"  # how a checkpoint is evaluated: the evaluation id
MEASUREMENT = "measurement"  # how a model is measured (params, FLOPs, FPS): the measurement id
ROLES = (WEIGHTS, EVALUATION, MEASUREMENT)
# A field with none of them (scheduling, logging, paths, the kernel that computes the same op) enters no id;
# its value is still recorded in each run's config.yaml.


def declare(
    default,
    *roles: str,
    active: Optional[Callable] = None,
    content=False,
    canonical: Optional[Callable] = None,
    why: str = "",
):
    """A config field with its roles (any of :data:`ROLES`; none: it enters no id).

    ``active(section_config)``: the field matters only when this holds (``momentum`` with SGD); otherwise
    it leaves the ids. ``content`` (or ``content(value)``): the value names a file whose bytes, not its
    path, are the identity.
    ``canonical(value, section_config)``: the value's canonical form (two spellings of one thing hash
    alike). ``why``: for a field with no role, what makes that right."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}; expected one of {ROLES}")
    return dataclasses.field(
        default=default,
        metadata={"roles": tuple(roles), "active": active, "content": content, "canonical": canonical, "why": why},
    )


def weights(default, **kw):
    """A field that changes the trained weights (it enters the run id)."""
    return declare(default, WEIGHTS, **kw)


def recorded(default, why: str):
    """A field that changes no number: it enters no id and is recorded with the run."""
    return declare(default, why=why)


def field_roles(cls) -> dict:
    """``{field name: metadata}`` of a config class; :class:`KeyError` names a field declared without roles."""
    out = {}
    for f in dataclasses.fields(cls):
        if "roles" not in f.metadata:
            raise KeyError(f"{cls.__name__}.{f.name} declares no role (use weights(), declare() or recorded())")
        out[f.name] = f.metadata
    return out


def _canonical_backbone_weights(value, cfg):
    # torchvision's IMAGENET1K_V1 is what None means (the official choice): one identity for both spellings
    return None if value == "IMAGENET1K_V1" else value


def _is_pretrained(cfg) -> bool:
    return cfg.pretrained_backbone


def _uses_focal_loss(cfg) -> bool:
    return cfg.focal_loss


class ConfigError(ValueError):
    """An invalid configuration value; ``key`` names the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class ModelConfig:
    arch: str = weights("deformable_detr")
    # backbone
    backbone: str = weights("resnet50")
    pretrained_backbone: bool = weights(True)
    backbone_weights: Optional[str] = weights(
        None, active=_is_pretrained, content=lambda v: not is_weights_name(v), canonical=_canonical_backbone_weights
    )
    # backbone_weights: None is the official choice (torchvision's IMAGENET1K_V1), else a member of
    # BACKBONE_WEIGHTS (IMAGENET1K_V2) or a local .pth of ImageNet weights, identified by its bytes
    dilation: bool = weights(False)  # DC5: dilation instead of stride in res5
    dcn: bool = weights(False)  # deformable convolution v2 in res3-res5 (3x3 convs)
    train_backbone: bool = weights(True)  # official: lr_backbone > 0
    position_embedding: str = weights("sine")  # sine | learned
    # transformer
    num_feature_levels: int = weights(4)
    enc_n_points: int = weights(4)
    dec_n_points: int = weights(4)
    ms_attention: bool = weights(True)
    neck: str = weights("none")
    with_box_refine: bool = weights(False)
    two_stage: bool = weights(False)
    num_queries: int = weights(300)
    num_classes: int = weights(91)
    hidden_dim: int = weights(256)
    dim_feedforward: int = weights(1024)
    nheads: int = weights(8)
    enc_layers: int = weights(6)
    dec_layers: int = weights(6)
    dropout: float = weights(0.1)
    pre_norm: bool = weights(False)  # DETR only
    aux_loss: bool = weights(True)
    focal_loss: bool = weights(True)  # sigmoid focal loss; False: softmax + no-object class (DETR)
    attn_impl: str = recorded("auto", why="which kernel computes the same op (each run records the one that ran)")
    # matcher costs
    set_cost_class: float = weights(2.0)
    set_cost_bbox: float = weights(5.0)
    set_cost_giou: float = weights(2.0)
    # loss coefficients
    cls_loss_coef: float = weights(2.0)
    bbox_loss_coef: float = weights(5.0)
    giou_loss_coef: float = weights(2.0)
    focal_alpha: float = weights(0.25, active=_uses_focal_loss)
    eos_coef: float = weights(0.1, active=lambda c: not c.focal_loss)  # no-object class weight (softmax loss)
    # Faster R-CNN's box regression, as Detectron2's MODEL.{ROI_BOX_HEAD,RPN}.BBOX_REG_LOSS_{TYPE,WEIGHT}:
    rcnn_box_loss: str = weights("smooth_l1")  # box head: smooth_l1 (torchvision) | giou
    rcnn_box_loss_weight: float = weights(1.0)  # box head's regression loss weight
    rpn_box_loss: str = weights("smooth_l1")  # RPN: smooth_l1 (torchvision's, beta 1/9) | giou
    rpn_box_loss_weight: float = weights(1.0)  # RPN's regression loss weight

    def __post_init__(self):
        validate(self)

    @classmethod
    def for_arch(cls, arch: str = "deformable_detr", **fields) -> "ModelConfig":
        """A config that starts from ``arch``'s own defaults (:func:`arch_defaults`: DETR's 100 queries,
        softmax loss and one feature level, Faster R-CNN's FPN), then ``fields``:
        ``ModelConfig.for_arch("detr", dilation=True)`` is DETR-DC5."""
        return cls(**{**arch_defaults(arch), **fields})


def arch_defaults(arch: str) -> dict:
    """Field values that differ from the Deformable DETR defaults for ``arch`` (official recipes)."""
    if arch == "detr":
        return dict(
            arch="detr",
            num_queries=100,
            dim_feedforward=2048,
            num_feature_levels=1,
            focal_loss=False,
            set_cost_class=1.0,
            cls_loss_coef=1.0,
        )
    if arch == "faster_rcnn":
        return dict(arch="faster_rcnn", num_feature_levels=1, neck="fpn")
    return dict(arch=arch)


def is_weights_name(value: str) -> bool:
    """True when ``model.backbone_weights`` names torchvision weights (IMAGENET1K_V2) rather than a file."""
    return value.startswith("IMAGENET")


def check_choice(key, value, choices):
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices`` (the one choice validator)."""
    if value not in choices:
        raise ConfigError(key, f"got {value!r}, expected one of {', '.join(map(repr, choices))}")


def _positive(cfg, *keys):
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, f"got {value!r}, expected an integer >= 1")


def validate(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` naming the field of the first impossible setting."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in ("bool",) and not isinstance(value, bool):
            raise ConfigError(f.name, f"got {value!r}, expected true or false")
        if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f.name, f"got {value!r}, expected a number")
        if f.type == "str" and not isinstance(value, str):
            raise ConfigError(f.name, f"got {value!r}, expected a string")
    check_choice("arch", cfg.arch, ARCHS)
    check_choice("backbone", cfg.backbone, BACKBONES)
    check_choice("neck", cfg.neck, NECKS)
    check_choice("attn_impl", cfg.attn_impl, ATTN_IMPLS)
    check_choice("rcnn_box_loss", cfg.rcnn_box_loss, RCNN_BOX_LOSSES)
    check_choice("rpn_box_loss", cfg.rpn_box_loss, RCNN_BOX_LOSSES)
    defaults = ModelConfig.__dataclass_fields__
    for key in ("rcnn_box_loss", "rcnn_box_loss_weight", "rpn_box_loss", "rpn_box_loss_weight"):
        if getattr(cfg, key) != defaults[key].default and cfg.arch != "faster_rcnn":
            raise ConfigError(
                key, f"applies to arch 'faster_rcnn' only, not {cfg.arch!r} (the DETR family always uses L1 + GIoU)"
            )
    for key in ("rcnn_box_loss_weight", "rpn_box_loss_weight"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(key, f"got {getattr(cfg, key)!r}, expected a weight > 0")
    if cfg.backbone_weights is not None and is_weights_name(cfg.backbone_weights):
        check_choice("backbone_weights", cfg.backbone_weights, BACKBONE_WEIGHTS[cfg.backbone])
    check_choice("position_embedding", cfg.position_embedding, ("sine", "learned"))
    _positive(
        cfg,
        "num_feature_levels",
        "enc_n_points",
        "dec_n_points",
        "num_queries",
        "num_classes",
        "hidden_dim",
        "dim_feedforward",
        "nheads",
        "enc_layers",
        "dec_layers",
    )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError("dropout", f"got {cfg.dropout!r}, expected 0 <= dropout < 1")
    if cfg.hidden_dim % cfg.nheads:
        raise ConfigError("nheads", f"hidden_dim {cfg.hidden_dim} is not divisible by nheads {cfg.nheads}")
    if cfg.arch in ("deformable_detr", "detr") and cfg.hidden_dim % 32:
        raise ConfigError("hidden_dim", f"got {cfg.hidden_dim}, expected a multiple of 32 (GroupNorm(32))")
    if cfg.two_stage and not cfg.with_box_refine:
        raise ConfigError("two_stage", "two-stage Deformable DETR needs with_box_refine: true")
    if cfg.arch != "deformable_detr":
        for key in ("with_box_refine", "two_stage"):
            if getattr(cfg, key):
                raise ConfigError(key, f"only available with arch 'deformable_detr', not {cfg.arch!r}")
        if not cfg.ms_attention:
            raise ConfigError("ms_attention", f"applies to arch 'deformable_detr' only, not {cfg.arch!r}")
        if cfg.arch == "detr" and cfg.num_feature_levels != 1:
            raise ConfigError("num_feature_levels", "DETR uses one feature level (C5); expected 1")
        if cfg.arch == "detr" and cfg.neck != "none":
            raise ConfigError("neck", "DETR has no neck; expected 'none'")
        # switches of the deformable attention that these architectures do not have: a value other than
        # the default would do nothing but rename the run
        defaults = ModelConfig.__dataclass_fields__
        for key in ("enc_n_points", "dec_n_points", "attn_impl"):
            if getattr(cfg, key) != defaults[key].default:
                raise ConfigError(
                    key,
                    f"has no effect with arch {cfg.arch!r} (no deformable attention); "
                    f"leave it at {defaults[key].default!r}",
                )
        if cfg.arch == "faster_rcnn" and cfg.neck != "fpn":
            raise ConfigError("neck", "Faster R-CNN is built with torchvision's FPN; expected 'fpn'")
    if cfg.pre_norm and cfg.arch != "detr":
        raise ConfigError("pre_norm", f"applies to arch 'detr' only, not {cfg.arch!r}")
    if cfg.arch == "deformable_detr":
        if not cfg.focal_loss:
            raise ConfigError(
                "focal_loss",
                "Deformable DETR's class head has no no-object logit for the softmax "
                "loss; expected true (the softmax loss is DETR's)",
            )
        if cfg.neck != "none" and cfg.num_feature_levels < 2:
            raise ConfigError("neck", f"{cfg.neck!r} needs multi-scale inputs (num_feature_levels >= 2)")
        if cfg.position_embedding != "sine":
            raise ConfigError("position_embedding", "Deformable DETR uses the sine encoding")
    if cfg.dcn and cfg.dilation:
        raise ConfigError("dcn", "deformable convolution with dilation (DC5) is not supported; use one")
    if not 0.0 <= cfg.focal_alpha <= 1.0:
        raise ConfigError("focal_alpha", f"got {cfg.focal_alpha!r}, expected a value in [0, 1]")
