"""Multi-scale deformable attention in Triton: launchers of the kernels in ``triton_jit.py``.

    forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False) -> output
    backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             softmax=False) -> (grad_value, grad_sampling_locations, grad_attention_weights)
    available(device) -> (bool, reason)

The semantics are the compiled kernels' (``csrc/``): value float32, float16, bfloat16 or float64, output
and grad_value in value's dtype; locations and weights of any floating dtype, read in float32 (float64
for float64 values), their gradients returned in their own dtypes; arithmetic in float32 (float64).

CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment the same kernels run on CPU tensors through
Triton's interpreter (slowly; for tests on machines without a GPU). Importing this module imports no
Triton; the kernels are compiled on first use, once per shape family (Triton caches them on disk).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from . import library

__all__ = ["available", "forward", "backward", "interpreting", "launch_configs", "forced_blocks"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_JIT_FILE = Path(__file__).with_name("triton_jit.py")
_jit_modules: dict[bool, object] = {}  # interpreting -> the kernels loaded in that mode


def interpreting() -> bool:
    """Whether Triton kernels launched now run in the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the variable directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def available(device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``, and why (not)."""
    device = torch.device(device)
    try:
        import triton
    except ImportError as e:
        return False, f"Triton is not installed ({e}); it ships with the CUDA builds of PyTorch"
    if interpreting():
        if device.type in ("cpu", "cuda"):
            return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1)"
        return False, f"the Triton interpreter runs on CPU tensors, got {device}"
    if device.type != "cuda":
        return False, (
            f"the Triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 (before the "
            f"first Triton kernel is used) to run them on CPU tensors in Triton's interpreter"
        )
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False, "no NVIDIA GPU is available to PyTorch"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 5):
        return False, f"Triton {triton.__version__} needs compute capability 7.5 or newer, this GPU has {major}.{minor}"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def _kernels():
    """The module of kernels for the current mode; triton.jit reads TRITON_INTERPRET when it defines them."""
    interpret = interpreting()
    module = _jit_modules.get(interpret)
    if module is None:
        name = "model.ops.triton_jit" + ("_interpreted" if interpret else "")
        spec = importlib.util.spec_from_file_location(name, _JIT_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _jit_modules[interpret] = module
    return module


def block_config(
    num_groups: int, D: int, dtype: torch.dtype, backward: bool, interpret: bool = False, num_sms: int = 132
):
    """(BLOCK_G, BLOCK_D, num_warps): groups per program, padded channels, warps.

    A program holds BLOCK_G x BLOCK_D elements (of the output, or of grad_output in the backward). On a GPU:
    the largest tile, up to 2048 elements (1024 in the backward, which holds grad_output and a corner at
    once), that still gives 4 programs per SM (down to 512 elements): on an H100 (132 SMs) the decoder
    preset (N * Lq * M = 9,600 groups of 32 channels) gets 16 groups per program, the encoder preset
    (711,136 groups) 64 (32 in the backward). Warps: one 16-byte vector per thread and row piece. In the
    interpreter, large tiles, since its cost is per program and per operation, not per element.
    """
    BLOCK_D = _next_power_of_2(max(D, 1))
    if interpret:
        tile = 1 << 14
    else:
        tile = 1024 if backward else 2048
        while tile > 512 and -(-num_groups * BLOCK_D // tile) < 4 * num_sms:
            tile //= 2
    BLOCK_G = max(1, min(tile // BLOCK_D, _next_power_of_2(max(num_groups, 1))))
    vector = 16 // torch.empty((), dtype=dtype).element_size()  # elements per 16-byte load
    num_warps = max(1, min(8, BLOCK_G * BLOCK_D // (32 * vector)))
    return BLOCK_G, BLOCK_D, num_warps


def launch_configs(D: int, dtype: torch.dtype, num_sms: int = 132) -> list[dict]:
    """Every (forward, backward) pair of (BLOCK_G, num_warps) that :func:`block_config` picks on a GPU of
    ``num_sms`` SMs for D channels in ``dtype``, over all problem sizes of at least one full tile (the sizes of a
    training: decoder and encoder alike). The self-check runs each (:func:`forced_blocks`)."""
    configs = []
    BLOCK_D = _next_power_of_2(max(D, 1))
    for k in range(0, 31):
        num_groups = 1 << k
        forward_ = block_config(num_groups, D, dtype, False, False, num_sms)
        backward_ = block_config(num_groups, D, dtype, True, False, num_sms)
        if num_groups * BLOCK_D < 2048:
            continue  # a tile capped by a tiny problem, not a configuration of a training
        config = {"forward": (forward_[0], forward_[2]), "backward": (backward_[0], backward_[2])}
        if config not in configs:
            configs.append(config)
    return configs


_FORCED: dict | None = None  # {"forward": (BLOCK_G, num_warps), "backward": (...)}: set by forced_blocks


@contextlib.contextmanager
def forced_blocks(config: dict | None):
    """Launch with the given (BLOCK_G, num_warps) instead of :func:`block_config`'s (one of
    :func:`launch_configs`), so that small inputs run the kernels a large training launches."""
    global _FORCED
    previous, _FORCED = _FORCED, config
    try:
        yield
    finally:
        _FORCED = previous


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Checks shapes, dtypes and devices (without reading device memory); contiguous inputs."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be N x S x M x D, got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2, got {tuple(sampling_locations.shape)}"
        )
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} do not match "
            f"value {tuple(value.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be N x Lq x M x L x P = "
            f"{tuple(sampling_locations.shape[:5])}, got {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be L x 2 and level_start_index L with L = {L}, got "
            f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}"
        )
    if spatial_shapes.dtype != torch.long or level_start_index.dtype != torch.long:
        raise ValueError("ms_deform_attn: spatial_shapes and level_start_index must be int64")
    if value.dtype not in _DTYPES:
        raise TypeError(
            f"ms_deform_attn (Triton): value must be float32, float16, bfloat16 or float64, got {value.dtype}"
        )
    for t in (sampling_locations, attention_weights):
        if not t.is_floating_point():
            raise TypeError(
                f"ms_deform_attn: sampling_locations and attention_weights must be floating point, got {t.dtype}"
            )
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn (Triton): inputs on {t.device} and {value.device}")
    ok, reason = available(value.device)
    if not ok:
        raise RuntimeError(f"ms_deform_attn (Triton): {reason}")
    if N * Lq * M >= 2**31:
        raise ValueError(f"ms_deform_attn (Triton): N * Lq * M = {N * Lq * M} groups, at most 2**31 - 1")
    device = value.device
    # (tiny; copied when given on the CPU, as the official op expects them on the GPU)
    return (
        value.contiguous(),
        spatial_shapes.to(device).contiguous(),
        level_start_index.to(device).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


def _on(device):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_args(value, num_groups, backward, softmax=False):
    N, S, M, D = value.shape
    interpret = interpreting()
    num_sms = torch.cuda.get_device_properties(value.device).multi_processor_count if value.is_cuda else 132
    BLOCK_G, BLOCK_D, num_warps = block_config(num_groups, D, value.dtype, backward, interpret, num_sms)
    if _FORCED is not None:
        BLOCK_G, num_warps = _FORCED["backward" if backward else "forward"]
    import triton.language as tl

    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    grid = (-(-num_groups // BLOCK_G),)
    meta = dict(
        M=M,
        D=D,
        BLOCK_G=BLOCK_G,
        BLOCK_D=BLOCK_D,
        ACC=acc,
        INDEX_64=S * M * D >= 2**31,
        SOFTMAX=bool(softmax),
        num_warps=num_warps,
    )
    if interpret:
        del meta["num_warps"]  # the interpreter takes no launch options
    return grid, meta


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
    """N x Lq x (M * D) in value's dtype. ``softmax``: attention_weights are logits (the fused softmax)."""
    value, shapes, starts, loc, attn = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    output = value.new_empty((N, Lq, M * D))
    if output.numel() == 0:
        return output
    if L == 0 or P == 0:
        return output.zero_()
    grid, meta = _launch_args(value, N * Lq * M, backward=False, softmax=softmax)
    with _on(value.device):
        _kernels().ms_deform_attn_forward_kernel[grid](
            value, shapes, starts, loc, attn, output, N * Lq * M, Lq, S, L, P=P, **meta
        )
    return output


def backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False
):
    """(grad_value in value's dtype, grad_sampling_locations and grad_attention_weights in their inputs' dtypes)."""
    # grad_value rows are summed with atomics in whatever order the programs run: the last bits vary between runs
    library.alert_not_deterministic("ms_deform_attn_backward (Triton kernel: grad_value uses atomic adds)")
    value, shapes, starts, loc, attn = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    if grad_output.numel() != N * Lq * M * D:
        raise ValueError(
            f"ms_deform_attn_backward: grad_output has {grad_output.numel()} elements, expected "
            f"N x Lq x M*D = {N * Lq * M * D}"
        )
    if grad_output.device != value.device:
        raise ValueError(f"ms_deform_attn_backward: grad_output on {grad_output.device}, value on {value.device}")
    grad_output = grad_output.to(value.dtype).contiguous()
    # Float32 / float64 values accumulate straight into grad_value (zero-filled once, as it must be anyway);
    # float16 / bfloat16 into a float32 copy, since many queries add to the same value row.
    accumulate_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=accumulate_dtype, device=value.device)
    grad_loc = torch.zeros_like(loc) if D == 0 or L == 0 or P == 0 else torch.empty_like(loc)
    # with the fused softmax the weights' gradients are rewritten in place as the logits': kept in ACC meanwhile
    attn_grad_dtype = accumulate_dtype if softmax and attn.dtype in (torch.float16, torch.bfloat16) else attn.dtype
    grad_attn = (
        torch.zeros_like(attn, dtype=attn_grad_dtype)
        if D == 0 or L == 0 or P == 0
        else torch.empty_like(attn, dtype=attn_grad_dtype)
    )
    if grad_loc.numel() > 0 and D > 0:
        grid, meta = _launch_args(value, N * Lq * M, backward=True, softmax=softmax)
        with _on(value.device):
            _kernels().ms_deform_attn_backward_kernel[grid](
                grad_output,
                value,
                shapes,
                starts,
                loc,
                attn,
                grad_value,
                grad_loc,
                grad_attn,
                N * Lq * M,
                Lq,
                S,
                L,
                P=P,
                **meta,
            )
    return grad_value.to(value.dtype), grad_loc, grad_attn.to(attn.dtype)


# The Triton twins of the dispatcher ops (schema, fake implementation, autograd: model/ops/library.py) run these
# launchers; CPU tensors reach them only to be run by the interpreter, or to get forward's clear error.
_lib = torch.library.Library(library.NAMESPACE, "IMPL")
for _dispatch_key in ("CUDA", "CPU"):
    _lib.impl(library.TRITON.split("::")[1], forward, _dispatch_key)
    _lib.impl(library.TRITON_BACKWARD.split("::")[1], backward, _dispatch_key)
