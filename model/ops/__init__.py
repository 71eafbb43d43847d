"""Multi-scale deformable attention: one function, several implementations.

    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto",
                   softmax=False)

softmax=True: attention_weights are logits, and every implementation applies the softmax over the L * P points of
each (batch, query, head) inside the op, forward and backward (the fused softmax of DCNv4's FlashDeformAttn: the
normalised weights are never written to memory, nor saved for the backward). The model uses it by default.

impl:
    "cuda"     the compiled CUDA kernel (float32/float16/bfloat16/float64)
    "triton"   the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    "cpu"      the compiled CPU kernel (float32/float64)
    "pytorch"  the pure-PyTorch reference (grid_sample), :func:`ms_deform_attn_pytorch`
    "auto"     the first of the device's chain (:data:`implementations.CHAINS`: cuda -> triton -> pytorch on
               GPUs, cpu -> pytorch on CPUs) that supports the dtype, can be built or loaded, has code for the
               GPU's architecture and passes its self-check; each fallback for another reason than the dtype is
               announced by one warning. A kernel that fails to launch is dropped the same way.

A named implementation never falls back: it raises instead. GPU implementations are self-checked against the
reference on their first use on a device (:mod:`model.ops.selfcheck`; the verdict is cached beside the
build). :func:`implementation_info` tells which implementation runs for a device and dtype, and its verdict.

The compiled kernels are the dispatcher op ``deformable_detr::ms_deform_attn`` (autograd, fake
implementation, torch.compile / torch.export; see :mod:`model.ops.library`), built on first use or ahead of
time by ``python -m model.ops.build`` (see :mod:`model.ops.build`). Importing this package compiles nothing.
"""

from __future__ import annotations

import warnings

import torch

from . import distributed, implementations, library  # noqa: F401 - library registers the dispatcher op on import
from .environment import device_name
from .flops import flop_handles
from .implementations import REGISTRY
from .reference import ms_deform_attn_pytorch
from .selfcheck import Shape

IMPLEMENTATIONS = ("auto",) + tuple(REGISTRY)
KERNEL_DTYPES = {name: REGISTRY[name].dtypes for name in ("cpu", "cuda")}

__all__ = [
    "IMPLEMENTATIONS",
    "ms_deform_attn",
    "ms_deform_attn_softmax",
    "ms_deform_attn_pytorch",
    "flop_handles",
    "kernel_available",
    "implementation_info",
    "SelfCheckError",
]


class SelfCheckError(RuntimeError):
    """A named implementation disagrees with the reference (or crashed) on its device."""


# (requested, device, dtype, shape) -> the implementation that runs; filled on first use (shape: selfcheck.Shape of
# the call, None for implementation_info without one)
_chosen: dict[tuple, implementations.Implementation] = {}
# Implementation.availability_key -> why it does not run there (announced once); the dtype-independent reasons
_unavailable: dict[tuple, BaseException] = {}
# (implementation name, device, dtype, shape) -> the failed self-check's or launch's message (announced once); shape
# None: for every shape (a launch failure)
_failed: dict[tuple, str] = {}
_shared: set[tuple] = set()  # keys of _chosen decided with every rank of the process group (distributed.py)
_warned: set[tuple] = set()  # (implementation name, device, dtype, reason) of the fallbacks announced


def _normalise(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _prepare(impl: implementations.Implementation, device: torch.device) -> None:
    """impl.prepare(device) once per process and device; its failure is remembered and raised again."""
    key = impl.availability_key(device)
    if key in _unavailable:
        if _unavailable[key] is None:
            return
        raise _unavailable[key]
    try:
        impl.prepare(device)
    except Exception as e:
        _unavailable[key] = e
        raise
    _unavailable[key] = None


def _verdict(
    impl: implementations.Implementation,
    device: torch.device,
    dtype: torch.dtype,
    shape=None,
    timeout: float | None = None,
) -> dict | None:
    if not impl.needs_self_check:
        return None
    from . import selfcheck

    return selfcheck.self_check(impl, device, dtype, shape, timeout)


def _failed_for(name, device, dtype, shape) -> str | None:
    return _failed.get((name, device, dtype, shape)) or _failed.get((name, device, dtype, None))


def _failure(impl, device, verdict: dict) -> str:
    """Why a self-check verdict rules an implementation out, in words."""
    if verdict.get("compared") is False:
        where = f" in case {verdict['case']}" if verdict.get("case") else ""
        return (
            f"its self-check could not run on {device_name(device)} ({device}){where}: "
            f"{verdict.get('environment')}; it is not used in this process and is checked again in the next one "
            f"(nothing cached)"
        )
    return (
        f"it FAILED its self-check against the reference on {device_name(device)} ({device}) in case "
        f"{verdict.get('case')}: {verdict.get('error')}"
    )


def _why_not(impl, device, dtype, shape=None, timeout: float | None = None, check: bool = True) -> str | None:
    """None when ``impl`` may run on ``device`` for ``dtype`` (and ``shape``); otherwise the reason (a failure is
    recorded). ``check`` False: prepared only (another rank self-checks it); ``timeout``: the check's limit."""
    failed = _failed_for(impl.name, device, dtype, shape)
    if failed is not None:
        return failed
    try:
        _prepare(impl, device)
    except Exception as e:  # noqa: BLE001 - a build error, Unavailable, an import error: all mean "not here"
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return lines[0] if len(lines) <= 3 else "\n".join(lines[:1] + ["..."] + lines[-2:])
    if not check:
        return None
    try:
        verdict = _verdict(impl, device, dtype, shape, timeout)
    except Exception as e:  # noqa: BLE001 - whatever breaks in the check (a cache, a child), auto moves on
        verdict = {"ok": False, "compared": False, "environment": f"{type(e).__name__}: {e}"}
    if verdict is not None and not verdict["ok"]:
        reason = _failure(impl, device, verdict)
        _failed[(impl.name, device, dtype, shape)] = reason
        return reason
    return None


def _warn_fallback(impl, device, reason, next_name) -> None:
    warnings.warn(
        f"\n{'!' * 100}\nms_deform_attn: the {impl.description} ({impl.name}) is not used on {device}: {reason}\n"
        f"impl='auto' uses the {REGISTRY[next_name].description if next_name in REGISTRY else next_name} instead. "
        f"Run `python -m model.ops.doctor` for details.\n{'!' * 100}",
        RuntimeWarning,
        stacklevel=4,
    )


def _resolve(requested: str, device: torch.device, dtype: torch.dtype, shape=None) -> implementations.Implementation:
    key = (requested, device, dtype, shape)
    chosen = _chosen.get(key)
    if chosen is not None and (key in _shared or requested != "auto" or not distributed.active()):
        return chosen  # (a choice made alone, under no_grad, is made again with the other ranks for training)
    if requested != "auto":
        impl = implementations.get(requested)
        if device.type not in impl.device_types:
            raise ValueError(
                f"ms_deform_attn(impl={requested!r}) needs {' or '.join(impl.device_types)} tensors, "
                f"got value on {device}"
            )
        failed = _failed_for(impl.name, device, dtype, shape)
        if failed is not None:
            raise SelfCheckError(f"ms_deform_attn(impl={requested!r}): {failed}")
        _prepare(impl, device)  # raises the build's or Unavailable's error
        verdict = _verdict(impl, device, dtype, shape)
        if verdict is not None and not verdict["ok"]:
            reason = _failure(impl, device, verdict)
            _failed[(impl.name, device, dtype, shape)] = reason
            raise SelfCheckError(f"ms_deform_attn(impl={requested!r}): {reason} (verdict: {verdict.get('file')})")
        _chosen[key] = impl
        return impl
    names = implementations.chain(device.type)
    if distributed.active():
        return _resolve_shared(key, names, device, dtype, shape)
    for position, name in enumerate(names):
        impl = REGISTRY[name]
        if not impl.supports(device, dtype):
            continue  # no kernel for this dtype: the next one, silently
        reason = _why_not(impl, device, dtype, shape)
        if reason is None:
            _chosen[key] = impl
            return impl
        if (name, device, dtype, reason) not in _warned:  # the same reason at another shape: not again
            _warned.add((name, device, dtype, reason))
            following = next((n for n in names[position + 1 :] if REGISTRY[n].supports(device, dtype)), "pytorch")
            _warn_fallback(impl, device, reason, following)
    raise RuntimeError(f"ms_deform_attn: no implementation runs {dtype} on {device}")


def _resolve_shared(key, names, device, dtype, shape) -> implementations.Implementation:
    """impl="auto" under DDP: the node leaders self-check, all ranks agree (:mod:`model.ops.distributed`)."""
    group = distributed.group()
    candidates = [n for n in names if REGISTRY[n].supports(device, dtype)] or ["pytorch"]
    timeout = distributed.check_timeout(group.pg_timeout)
    decision = f"{device.type}/{str(dtype).removeprefix('torch.')}/{shape}/{','.join(candidates)}"
    name, passed_over = group.agree(
        decision,
        candidates,
        leader_check=lambda n: _why_not(REGISTRY[n], device, dtype, shape, timeout=timeout),
        follower_check=lambda n: _why_not(REGISTRY[n], device, dtype, shape, check=False),
        describe=lambda n: f"{REGISTRY[n].description} ({n})",
        checked=lambda n: REGISTRY[n].needs_self_check,
    )
    if name is None:
        raise RuntimeError(f"ms_deform_attn: no implementation runs {dtype} on {device} on every rank: {passed_over}")
    for position, (skipped, reason) in enumerate(passed_over):
        _failed.setdefault((skipped, device, dtype, shape), reason)
        if (skipped, device, dtype, reason) not in _warned:
            _warned.add((skipped, device, dtype, reason))
            following = passed_over[position + 1][0] if position + 1 < len(passed_over) else name
            _warn_fallback(
                REGISTRY[skipped], device, f"{reason} (the same implementation runs on every rank)", following
            )
    _chosen[key] = REGISTRY[name]
    _shared.add(key)
    return REGISTRY[name]


def _drop(impl, device, dtype, error) -> None:
    """A kernel that failed to launch: never again on this device and dtype, for impl='auto'."""
    _failed[(impl.name, device, dtype, None)] = f"it failed to launch: {error}"
    for key in [k for k, v in _chosen.items() if k[0] == "auto" and k[1] == device and v is impl]:
        del _chosen[key]


def ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto", softmax=False
):
    """Multi-scale deformable attention.

    Args:
        value:              N x S x M x D, S = sum_l H_l * W_l
        spatial_shapes:     L x 2 (int64), (H_l, W_l)
        level_start_index:  L (int64), offset of level l in S
        sampling_locations: N x Lq x M x L x P x 2, normalised (x, y); [0, 1] is inside the map,
                            outside reads zeros (grid_sample(align_corners=False, padding_mode="zeros"))
        attention_weights:  N x Lq x M x L x P (softmax=True: logits)
        impl:               "auto" | "cuda" | "triton" | "cpu" | "pytorch" (see the module docstring)
        softmax:            normalise attention_weights with a softmax over each (batch, query, head)'s L * P
                            points inside the op (the fused softmax)
    Returns:
        N x Lq x (M * D)
    """
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl == "pytorch":
        return ms_deform_attn_pytorch(*args, softmax=softmax)
    if impl != "auto" and impl not in REGISTRY:
        raise ValueError(f"unknown ms_deform_attn implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    chosen = _resolve(impl, value.device, value.dtype, Shape.of(value, sampling_locations, softmax))
    if impl != "auto" or torch.compiler.is_compiling():
        return chosen.forward(*args, softmax=softmax)
    try:
        return chosen.forward(*args, softmax=softmax)
    except RuntimeError as e:
        if not chosen.launch_failure(e):
            raise
        _drop(chosen, value.device, value.dtype, e)
        return ms_deform_attn(*args, impl="auto", softmax=softmax)  # warns, then the next implementation


def ms_deform_attn_softmax(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, impl="auto"):
    """:func:`ms_deform_attn` with the fused softmax: ``attention_logits`` (N x Lq x M x L x P) are normalised over
    the L * P points of each (batch, query, head) inside the op, forward and backward."""
    return ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_logits, impl=impl, softmax=True
    )


def kernel_available(device_type: str) -> bool:
    """Whether the compiled kernel for ``device_type`` is loaded, loading (or building) it if needed.

    The first failure for a device type is reported by one warning; later calls return False quietly.
    """
    impl = REGISTRY[device_type]
    device = _normalise(device_type)
    key = (impl.name, device)
    first = key not in _unavailable
    try:
        _prepare(impl, device)
        return True
    except Exception as e:  # noqa: BLE001
        if first:
            _warn_fallback(
                impl, device, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, "pytorch"
            )
        return False


def implementation_info(device, dtype=torch.float32, impl: str = "auto", shape=None) -> dict:
    """Which implementation runs ``ms_deform_attn(..., impl=impl)`` on tensors of ``dtype`` on ``device``, and its
    self-check verdict; resolves it as a first call would (building, loading, self-checking if needed). ``shape``:
    a model's (M, D, L, P) (:class:`model.ops.selfcheck.Shape`), as the op's first call at that shape resolves it;
    by default the shape of the first call made in this process (for these impl, device and dtype), if any.

    Returns ``impl`` (its name), ``description``, ``requested``, ``device`` (the device's name), ``dtype``,
    ``build`` (what identifies the code), ``self_check`` ("passed", "passed (cached: ...)", "not needed",
    "skipped ...") and ``fallbacks``: the implementations ``auto`` passed over and why.
    """
    device = _normalise(device)
    if shape is not None:
        shape = Shape(*shape)
    else:  # the shape of the calls made so far in this process (a model's), if any: what ran
        shape = next((k[3] for k in _chosen if k[:3] == (impl, device, dtype) and k[3] is not None), None)
    if impl == "pytorch":
        chosen, verdict = REGISTRY["pytorch"], None
    else:
        chosen = _resolve(impl, device, dtype, shape)
        verdict = _verdict(chosen, device, dtype, shape)
    fallbacks = []
    if impl == "auto":
        for name in implementations.chain(device.type):
            if name == chosen.name:
                break
            if REGISTRY[name].supports(device, dtype):
                fallbacks.append({"impl": name, "reason": _why_not(REGISTRY[name], device, dtype, shape)})
            else:
                fallbacks.append({"impl": name, "reason": f"no {str(dtype).removeprefix('torch.')} support"})
    return {
        "impl": chosen.name,
        "description": chosen.description,
        "requested": impl,
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "build": chosen.build_id(),
        "self_check": "not needed"
        if verdict is None
        else verdict.get("status", "passed" if verdict["ok"] else "FAILED"),
        "fallbacks": fallbacks,
    }
