"""Parameters and FLOPs of a run's model, counted with fvcore like the paper.

The paper reports FLOPs counted with fvcore's ``FlopCountAnalysis`` (eval mode, no gradient) as the mean
over the first 100 images of COCO val2017, each at its evaluation size (short side 800, long side at most
1333). Two ways of feeding the model:

- ``images=N``: the first N evaluation images, one at a time (batch 1, no padding), resized as at
  evaluation; gives the mean and standard deviation over the images;
- ``fixed_size=(800, 1199)``: one 3 x 800 x 1199 image (the official reference count; no dataset needed).

Counting rules (``count_flops``):

- fvcore's default handles (one FLOP per multiply-add; conv, linear, matmul/bmm, norms, upsampling,
  ``aten::grid_sampler`` at 4 per output element), plus the project's own ops:
  ``deformable_detr::ms_deform_attn`` through :func:`model.ops.flop_handles` (the same count as the pure
  PyTorch path's ``grid_sampler``, so the number does not depend on the attention implementation that ran)
  and ``torchvision::deform_conv2d`` (DCN) counted as the convolution it replaces.
- Operators fvcore has no handle for are not counted; they are listed with how often they were called, the
  trivial elementwise ones (``TRIVIAL_OPS``: add, mul, sigmoid, softmax, ...) separately from the ones
  that may matter (for example ``aten::baddbmm`` in DETR's attention with a padding mask,
  ``torchvision::roi_align`` in Faster R-CNN). fvcore's own ignore list (reshapes, copies, relu, ...) is
  neither counted nor listed.

The command that writes these counts for every row of an experiment is :mod:`harness.measure.command`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from math import prod
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from torchvision.ops.misc import FrozenBatchNorm2d

from harness.measure.inputs import evaluation_images, fixed_size_input
from harness.provenance import device_name
from model import build_model
from model.build import count_parameters
from model.ms_deform_attn import MSDeformAttn
from model.ops import flop_handles as attention_handles

# Elementwise and bookkeeping operators whose cost is negligible next to convs and matmuls: fvcore does not
# count them; listed apart from uncounted operators that may matter.
TRIVIAL_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "add",
        "add_",
        "sub",
        "sub_",
        "rsub",
        "mul",
        "mul_",
        "div",
        "div_",
        "neg",
        "abs",
        "sqrt",
        "rsqrt",
        "pow",
        "exp",
        "log",
        "log2",
        "log1p",
        "sin",
        "cos",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "softmax",
        "log_softmax",
        "hardtanh",
        "gelu",
        "silu",
        "leaky_relu",
        "clamp_min",
        "clamp_max",
        "clip",
        "round",
        "ceil",
        "trunc",
        "sign",
        "reciprocal",
        "cumsum",
        "cumprod",
        "sum",
        "mean",
        "prod",
        "amax",
        "amin",
        "min",
        "argmax",
        "argmin",
        "topk",
        "sort",
        "argsort",
        "where",
        "lt",
        "le",
        "ne",
        "logical_and",
        "logical_or",
        "logical_not",
        "bitwise_and",
        "bitwise_or",
        "__or__",
        "__not__",
        "any",
        "all",
        "isfinite",
        "isnan",
        "linspace",
        "meshgrid",
        "repeat",
        "repeat_interleave",
        "tile",
        "flip",
        "expand_as",
        "view_as",
        "reshape_as",
        "index_select",
        "masked_select",
        "scatter",
        "scatter_",
        "fill_",
        "zero_",
        "clone",
        "resolve_conj",
        "resolve_neg",
        "lift_fresh",
        "alias",
        "unflatten",
        "max_pool2d",
        "avg_pool2d",
        "adaptive_max_pool2d",
        "one_hot",
        "numel",
        "tensor",
        "scalar_tensor",
        "as_strided",
        "_unsafe_view",
        "rand",
        "randn",
        "zeros_like",
        "ones_like",
        "empty_like",
        "bernoulli_",
        "sqrt_",
        "exp_",
        "log_",
        "floor_",
        "__and__",
        "masked_fill_",
        "pad",
        "_shape_as_tensor",
    )
) | frozenset(
    {
        "torchvision::nms",
        "torchvision::_assert_has_ops",
        # torchvision's detection models script their batched-NMS helpers when traced: calls fvcore cannot see
        # into, around torchvision::nms
        "prim::CallFunction",
    }
)


# --------------------------------------------------------------------------------------------- handles


def _sizes(value) -> List[int]:
    return list(value.type().sizes())


def deform_conv2d_flop_jit(inputs, outputs) -> int:
    """``torchvision::deform_conv2d`` as the convolution it replaces: N x prod(weight) x H_out x W_out
    multiply-adds (fvcore's conv rule); the bilinear sampling of the input is not counted."""
    x, w, out = _sizes(inputs[0]), _sizes(inputs[1]), _sizes(outputs[0])
    return x[0] * prod(w) * prod(out[2:])


def flop_handles() -> dict:
    """Handles added to fvcore's defaults: the deformable attention op and torchvision's DCN."""
    return {**attention_handles(), "torchvision::deform_conv2d": deform_conv2d_flop_jit}


# ------------------------------------------------------------------------------------------- counting


class _TensorOutputs(torch.nn.Module):
    """Runs ``model(images, mask)`` and returns its tensors as a flat tuple, so that fvcore's tracer accepts
    any output structure (dicts, lists of dicts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, mask):
        out: List[torch.Tensor] = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, dict):
                for key in sorted(x):
                    walk(x[key])
            elif isinstance(x, (list, tuple)):
                for item in x:
                    walk(item)

        walk(self.model(images, mask))
        return tuple(out)


def _as_pairs(images_and_masks) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(images N x 3 x H x W, mask N x H x W) pairs; a bare C x H x W or N x C x H x W tensor gets an
    all-False mask."""
    pairs = []
    for item in images_and_masks:
        if isinstance(item, torch.Tensor):
            image = item if item.dim() == 4 else item[None]
            mask = torch.zeros((image.shape[0],) + tuple(image.shape[-2:]), dtype=torch.bool, device=image.device)
        else:
            image, mask = item
            if image.dim() == 3:
                image, mask = image[None], mask[None]
        pairs.append((image, mask))
    if not pairs:
        raise ValueError("count_flops: no images given")
    return pairs


def split_unsupported(unsupported: Dict[str, int]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(operators that may matter, trivial elementwise operators), each {name: calls}, most called first."""

    def order(d):
        return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))

    matter = {k: int(v) for k, v in unsupported.items() if k not in TRIVIAL_OPS}
    trivial = {k: int(v) for k, v in unsupported.items() if k in TRIVIAL_OPS}
    return order(matter), order(trivial)


def count_flops(model: torch.nn.Module, images_and_masks: Iterable, extra_handles: Optional[dict] = None) -> dict:
    """fvcore FLOPs of ``model(images, mask)`` for each given input, in eval mode without gradients.

    ``images_and_masks``: (images, mask) pairs (mask True on padding) or bare image tensors; each is traced
    and counted on its own (the paper: one image at a time). The model is put in eval mode and left so.

    Returns ``gflops`` (mean over the inputs), ``gflops_std`` (population standard deviation; 0 for one
    input), ``gflops_min`` / ``gflops_max``, ``gflops_each``, ``num_inputs``, ``input_sizes`` (H x W of each),
    ``by_operator`` (mean GFLOPs per fvcore operator name), ``unsupported_ops`` (uncounted operators that may
    matter: {name: calls per input, the maximum over inputs}), ``trivial_unsupported_ops`` (uncounted
    elementwise operators, likewise) and ``handles`` (the operators counted by handles beside fvcore's).
    """
    handles = {**flop_handles(), **(extra_handles or {})}
    pairs = _as_pairs(images_and_masks)
    wrapper = _TensorOutputs(model).eval()
    totals: List[float] = []
    by_operator: Counter = Counter()
    unsupported: Dict[str, int] = {}
    sizes = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent Python values
        for images, mask in pairs:
            analysis = FlopCountAnalysis(wrapper, (images, mask))
            for name, handle in handles.items():
                analysis.set_op_handle(name, handle)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            totals.append(analysis.total() / 1e9)
            by_operator.update({k: v / 1e9 for k, v in analysis.by_operator().items()})
            for name, calls in analysis.unsupported_ops().items():
                unsupported[name] = max(unsupported.get(name, 0), int(calls))
            sizes.append("x".join(str(s) for s in images.shape[-2:]))
    n = len(totals)
    mean = sum(totals) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in totals) / n)
    matter, trivial = split_unsupported(unsupported)
    return {
        "gflops": mean,
        "gflops_std": std,
        "gflops_min": min(totals),
        "gflops_max": max(totals),
        "gflops_each": totals,
        "num_inputs": n,
        "input_sizes": sizes,
        "by_operator": dict(sorted(((k, v / n) for k, v in by_operator.items()), key=lambda kv: -kv[1])),
        "unsupported_ops": matter,
        "trivial_unsupported_ops": trivial,
        "handles": sorted(handles),
    }


# ------------------------------------------------------------------------------------------- models


def _freeze_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with its statistics (affine terms become buffers)."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norm(child)
    return module


def build_for_complexity(model_cfg) -> torch.nn.Module:
    """The model of ``model_cfg`` with random weights (weights do not change parameters or FLOPs), in eval mode.

    ImageNet weights are never loaded. Faster R-CNN built without them would have ordinary BatchNorm in its
    trunk; when the config asks for a pretrained trunk it is given the frozen BatchNorm a trained run has,
    so that parameters and FLOPs are those of the model that is trained and evaluated.
    """
    model, _, _ = build_model(dataclasses.replace(model_cfg, pretrained_backbone=False, backbone_weights=None))
    if model_cfg.arch == "faster_rcnn" and model_cfg.pretrained_backbone:
        _freeze_batch_norm(model.detector.backbone.body)
    return model.eval()


def set_attention_impl(model: torch.nn.Module, impl: str) -> int:
    """Set the implementation of every multi-scale deformable attention module; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = impl
            n += 1
    return n


def measure_complexity(
    run_cfg,
    images: Optional[int] = None,
    fixed_size: Optional[Tuple[int, int]] = None,
    root: Optional[str] = None,
    device="cpu",
    model: Optional[torch.nn.Module] = None,
    output_dir: Optional[str] = None,
) -> dict:
    """Parameters and fvcore GFLOPs of ``run_cfg.model``.

    Exactly one of ``images`` (the first N evaluation images, one at a time; default
    ``run_cfg.benchmark.flops_images``) and ``fixed_size`` ((H, W): one 3 x H x W image). ``model``: count
    this one (for example the trained model) instead of building a fresh one. Returns the fields of
    :func:`count_flops` plus ``params``, ``gflops_images`` (how many inputs), ``gflops_input`` (what they
    were, in words) and ``device``.
    """
    if images is not None and fixed_size is not None:
        raise ValueError("measure_complexity: give images or fixed_size, not both")
    device = torch.device(device)
    if fixed_size is not None:
        inputs = fixed_size_input(*fixed_size, device=device)
        described = f"3x{fixed_size[0]}x{fixed_size[1]}"
    else:
        n = images if images is not None else run_cfg.benchmark.flops_images
        inputs = [img.to(device) for img in evaluation_images(run_cfg, n, root=root, output_dir=output_dir)]
        described = f"first {len(inputs)} {run_cfg.data.val_split} images ({run_cfg.data.dataset})"
    if model is None:
        model = build_for_complexity(run_cfg.model)
    model = model.to(device).eval()
    counted = count_flops(model, inputs)
    return {
        "params": count_parameters(model),
        **counted,
        "gflops_images": counted["num_inputs"],
        "gflops_input": described,
        "device": device_name(device),
    }
