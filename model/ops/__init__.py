"""Multi-scale deformable attention: one function, several implementations.

    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto")

impl:
    "cuda"     the compiled CUDA kernel (float32/float16/bfloat16/float64); never falls back
    "cpu"      the compiled CPU kernel (float32/float64); never falls back
    "pytorch"  the pure-PyTorch reference (grid_sample), :func:`ms_deform_attn_pytorch`
    "auto"     the compiled kernel of the tensors' device; the reference, with one warning, when that kernel
               cannot be built or loaded, and (silently) for dtypes or devices without a kernel

The compiled kernels are the dispatcher op ``deformable_detr::ms_deform_attn`` (autograd, fake
implementation, torch.compile / torch.export; see :mod:`model.ops.library`), built on first use or ahead of
time by ``python -m model.ops.build`` (see :mod:`model.ops.build`). Importing this package compiles nothing.
"""
from __future__ import annotations

import warnings

import torch

from . import library
from .flops import flop_handles
from .reference import ms_deform_attn_pytorch

IMPLEMENTATIONS = ("auto", "cuda", "cpu", "pytorch")
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}

__all__ = ["IMPLEMENTATIONS", "ms_deform_attn", "ms_deform_attn_pytorch", "flop_handles", "kernel_available"]

# device type -> True (kernel loaded) or the exception that prevented it; filled on first use
_kernel_status: dict[str, object] = {}


def _load_kernel(device_type: str) -> None:
    from . import build  # imports torch.utils.cpp_extension only when a kernel is needed

    try:
        build.load(device_type)
    except Exception as e:
        _kernel_status[device_type] = e
        raise
    _kernel_status[device_type] = True


def _require_kernel(device_type: str) -> None:
    status = _kernel_status.get(device_type)
    if status is True:
        return
    if status is not None:
        raise status
    _load_kernel(device_type)


def kernel_available(device_type: str) -> bool:
    """Whether the compiled kernel for ``device_type`` is loaded, loading (or building) it if needed.

    The first failure for a device type is reported by one warning; later calls return False quietly.
    """
    status = _kernel_status.get(device_type)
    if status is None:
        try:
            _load_kernel(device_type)
        except Exception as e:
            lines = str(e).strip().splitlines()
            reason = lines[0] if len(lines) <= 3 else "\n".join(lines[:1] + ["..."] + lines[-2:])
            warnings.warn(
                f"ms_deform_attn: the compiled {device_type} kernel is unavailable, using the pure-PyTorch "
                f"reference instead (slower, more memory). Run `python -m model.ops.doctor` for details. "
                f"Reason: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True
    return status is True


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto"):
    """Multi-scale deformable attention.

    Args:
        value:              N x S x M x D, S = sum_l H_l * W_l
        spatial_shapes:     L x 2 (int64), (H_l, W_l), on the device of ``value`` for the CUDA kernel
        level_start_index:  L (int64), offset of level l in S
        sampling_locations: N x Lq x M x L x P x 2, normalised (x, y); [0, 1] is inside the map,
                            outside reads zeros (grid_sample(align_corners=False, padding_mode="zeros"))
        attention_weights:  N x Lq x M x L x P
        impl:               "auto" | "cuda" | "cpu" | "pytorch" (see the module docstring)
    Returns:
        N x Lq x (M * D)
    """
    device_type = value.device.type
    if impl == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl == "auto":
        if value.dtype not in KERNEL_DTYPES.get(device_type, ()) or not kernel_available(device_type):
            return ms_deform_attn_pytorch(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )
    elif impl in ("cpu", "cuda"):
        if device_type != impl:
            raise ValueError(f"ms_deform_attn(impl={impl!r}) needs {impl} tensors, got value on {value.device}")
        _require_kernel(impl)
    else:
        raise ValueError(f"unknown ms_deform_attn implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    return torch.ops.deformable_detr.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
