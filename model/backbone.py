"""torchvision ResNet / ResNeXt backbones with frozen BatchNorm, DC5 and DCN, joined with a position encoding.

State-dict keys follow the official implementation: ``backbone.0.body.<resnet keys>`` for the
network and ``backbone.1.*`` for the (learned) position encoding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import is_weights_name
from .position_encoding import build_position_encoding
from .released import file_sha256

# torchvision constructor and its default ImageNet weights (the ones the official code loads via
# pretrained=True; resnext101_64x4d has only torchvision's 2022 weights)
_BACKBONES = {
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V1"),
    "resnet101": ("resnet101", "ResNet101_Weights", "IMAGENET1K_V1"),
    "resnext101_32x8d": ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", "IMAGENET1K_V1"),
    "resnext101_64x4d": ("resnext101_64x4d", "ResNeXt101_64X4D_Weights", "IMAGENET1K_V1"),
}


class BackboneWeightsError(FileNotFoundError):
    pass


class ModulatedDeformConv3x3(nn.Module):
    """Deformable convolution v2 replacing a ResNet 3x3 conv: offsets and masks from a zero-initialised conv.

    Modulated as Detectron2's ``DeformBottleneckBlock`` (``deform_modulated``): the mask is the sigmoid of
    its logits, so at initialisation (zero offsets, mask 0.5) it computes half of what the replaced conv
    computed. The offset conv is part of the trunk: it trains at ``train.lr_backbone``, as every trunk
    parameter (Detectron2 gives it no learning rate of its own either).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = conv.weight  # keeps the key `convN.weight`, so ImageNet weights load unchanged
        kh, kw = conv.kernel_size
        # 2*kh*kw offsets and kh*kw modulation scalars per output position
        self.conv_offset = nn.Conv2d(
            conv.in_channels, 3 * kh * kw, conv.kernel_size, conv.stride, conv.padding, conv.dilation
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        offset_x, offset_y, mask = self.conv_offset(x).chunk(3, dim=1)
        offset = torch.cat((offset_x, offset_y), dim=1)
        mask = torch.sigmoid(mask)
        return torchvision.ops.deform_conv2d(
            x, offset, self.weight, None, self.stride, self.padding, self.dilation, mask
        )


def _use_dcn(resnet: nn.Module, layers=("layer2", "layer3", "layer4")):
    for name in layers:
        for block in getattr(resnet, name):
            block.conv2 = ModulatedDeformConv3x3(block.conv2)


def _weights_enum(name: str, choice: str | None):
    """torchvision's weights enum member for backbone ``name``: ``choice`` when it names one, else V1."""
    _, enum_name, member = _BACKBONES[name]
    if choice is not None and is_weights_name(choice):
        member = choice
    return getattr(getattr(torchvision.models, enum_name), member)


def _cached_path(weights) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def weights_info(cfg) -> dict:
    """Which ImageNet weights a model config starts its trunk from, without downloading anything.

    ``name``: torchvision's enum member (``ResNet50_Weights.IMAGENET1K_V1``) or the file of
    ``model.backbone_weights``; ``file``: where the weights are read from; ``sha256``: of that file when it
    is present here (else None); ``imagenet_top1``: the ImageNet-1K top-1 torchvision states for its weights
    (None for a file of one's own); ``pretrained``: False for a trunk trained from scratch (then nothing else
    is filled in). Faster R-CNN's trunk comes from the same weights.
    """
    info = dict(
        pretrained=bool(cfg.pretrained_backbone),
        backbone=cfg.backbone,
        name=None,
        file=None,
        sha256=None,
        imagenet_top1=None,
    )
    if not cfg.pretrained_backbone:
        return info
    choice = cfg.backbone_weights
    if choice is not None and not is_weights_name(choice):
        info.update(name=choice, file=choice)
    else:
        weights = _weights_enum(cfg.backbone, choice)
        info.update(
            name=f"{type(weights).__name__}.{weights.name}",
            file=_cached_path(weights),
            imagenet_top1=weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
        )
    if os.path.isfile(info["file"]):
        info["sha256"] = file_sha256(info["file"])
    return info


def _download(weights) -> None:
    """Into torch's hub cache (``$TORCH_HOME/hub/checkpoints``), where :func:`_load_imagenet_weights` reads it."""
    weights.get_state_dict(progress=True)


def fetch_weights(cfg) -> str | None:
    """Make sure the ImageNet weights ``cfg`` starts from are on disk, downloading torchvision's file into the
    hub cache if needed; returns their path (None for a trunk trained from scratch). Meant for the login
    node at submission: compute nodes often have no network, and a job that fails on this after hours in
    the queue wastes them. :class:`BackboneWeightsError` says where to put the file when it cannot be had."""
    info = weights_info(cfg)
    if not info["pretrained"] or os.path.isfile(info["file"]):
        return info["file"]
    if info["imagenet_top1"] is None:  # a file of one's own that is not there
        raise BackboneWeightsError(
            f"model.backbone_weights: {info['file']} does not exist (expected ImageNet "
            f"weights of {cfg.backbone} with torchvision's key names)"
        )
    weights = _weights_enum(cfg.backbone, cfg.backbone_weights)
    try:
        _download(weights)
    except Exception as err:  # noqa: BLE001 - no network here either: say where the file belongs
        raise BackboneWeightsError(
            f"ImageNet weights for backbone {cfg.backbone!r} ({info['name']}) cannot be downloaded ({err}). Put "
            f"{os.path.basename(weights.url)} (from {weights.url}) at {info['file']} (TORCH_HOME must be a folder "
            f"the compute nodes see), or set model.backbone_weights to a copy"
        ) from None
    return info["file"]


def _load_imagenet_weights(net: nn.Module, name: str, weights_path: str | None):
    weights = _weights_enum(name, weights_path)
    if weights_path is None or is_weights_name(weights_path):
        weights_path = _cached_path(weights)
        if not os.path.exists(weights_path):
            try:
                state = weights.get_state_dict(progress=False)
            except Exception as err:  # no network on the node: say where the file belongs
                raise BackboneWeightsError(
                    f"ImageNet weights for backbone {name!r} are not available ({err}). Put "
                    f"{os.path.basename(weights.url)} (from {weights.url}) at {weights_path}, set "
                    f"model.backbone_weights to its path, or set model.pretrained_backbone: false"
                ) from None
            return net.load_state_dict(state, strict=False)
    if not os.path.exists(weights_path):
        raise BackboneWeightsError(
            f"model.backbone_weights: {weights_path} does not exist "
            f"(expected ImageNet weights of {name} with torchvision's key names, e.g. "
            f"{os.path.basename(weights.url)})"
        )
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    return net.load_state_dict(state, strict=False)


class Backbone(nn.Module):
    """A ResNet trunk returning its last ``num_outputs`` stages of C3-C5 (3: C3-C5 as in the official
    multi-scale model, 1: C5 alone), each with its downsampled mask."""

    def __init__(self, name, train_backbone, num_outputs, dilation, dcn=False, pretrained=False, weights_path=None):
        super().__init__()
        fn = getattr(torchvision.models, _BACKBONES[name][0])
        net = fn(weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d)
        if pretrained:
            _load_imagenet_weights(net, name, weights_path)
        if dcn:
            _use_dcn(net)
        for pname, parameter in net.named_parameters():
            # the stem and layer1 stay frozen, as in the official recipe
            if not train_backbone or not any(layer in pname for layer in ("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        if not 1 <= num_outputs <= 3:
            raise ValueError(f"a ResNet backbone gives 1 to 3 feature maps (C3-C5), not {num_outputs}")
        stages = [("layer2", 8, 512), ("layer3", 16, 1024), ("layer4", 32, 2048)][3 - num_outputs :]
        # (stage, stride, channels): the same for every bottleneck ResNet/ResNeXt of torchvision
        return_layers = {layer: str(i) for i, (layer, _, _) in enumerate(stages)}
        self.strides = [stride for _, stride, _ in stages]
        self.num_channels = [channels for _, _, channels in stages]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(net, return_layers=return_layers)

    def forward(self, images, mask):
        # images: B x 3 x H x W, mask: B x H x W -> lists of (B x C_l x H_l x W_l, B x H_l x W_l)
        features, masks = [], []
        for _, x in sorted(self.body(images).items()):
            features.append(x)
            masks.append(F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0])
        return features, masks


class Joiner(nn.Sequential):
    """``backbone.0`` the trunk, ``backbone.1`` the position encoding (the official key layout)."""

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images, mask):
        features, masks = self[0](images, mask)
        pos = [self[1](m).to(x.dtype) for x, m in zip(features, masks)]
        return features, masks, pos


def build_backbone(cfg, num_outputs: int) -> Joiner:
    backbone = Backbone(
        cfg.backbone,
        cfg.train_backbone,
        num_outputs,
        cfg.dilation,
        cfg.dcn,
        cfg.pretrained_backbone,
        cfg.backbone_weights,
    )
    return Joiner(backbone, build_position_encoding(cfg))
