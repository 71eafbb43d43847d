"""The op as the PyTorch dispatcher sees it: schema, fake (meta) implementation and autograd.

Two ops in the ``deformable_detr`` namespace::

    deformable_detr::ms_deform_attn(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights, softmax=False) -> output
    deformable_detr::ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights, softmax=False)
        -> (grad_value, grad_sampling_locations, grad_attention_weights)

``softmax=True``: attention_weights are logits, normalised over the L * P points of each (batch, query, head)
inside the kernels (the fused softmax), and grad_attention_weights is the logits' gradient.

their Triton twins ``deformable_detr::ms_deform_attn_triton`` / ``ms_deform_attn_triton_backward`` (same schema,
fake implementation, autograd and FLOP count; kernels registered by :mod:`model.ops.triton_kernel` when it is
imported), and their test-only twins ``deformable_detr::ms_deform_attn_emulated`` /
``ms_deform_attn_emulated_backward``: the
CUDA kernels' code run on the CPU by the host emulator (built with the CPU kernel), for every CUDA dtype.

The schema, the fake implementations (shapes only, for torch.compile / torch.export) and autograd live
here, so importing this module is cheap and compiles nothing. The CPU and CUDA kernels are registered
when the compiled libraries are loaded (see :mod:`model.ops.build`); until then calling an op on a
device raises NotImplementedError from the dispatcher.
"""

from __future__ import annotations

import torch

NAMESPACE = "deformable_detr"
FORWARD = f"{NAMESPACE}::ms_deform_attn"
BACKWARD = f"{NAMESPACE}::ms_deform_attn_backward"
EMULATED = f"{NAMESPACE}::ms_deform_attn_emulated"
EMULATED_BACKWARD = f"{NAMESPACE}::ms_deform_attn_emulated_backward"
TRITON = f"{NAMESPACE}::ms_deform_attn_triton"
TRITON_BACKWARD = f"{NAMESPACE}::ms_deform_attn_triton_backward"

_lib = torch.library.Library(NAMESPACE, "DEF")


def alert_not_deterministic(caller: str) -> None:
    """What torch's own non-deterministic kernels do: under ``torch.use_deterministic_algorithms(True)`` raise a
    RuntimeError ("<caller> does not have a deterministic implementation, but you set
    'torch.use_deterministic_algorithms(True)'..."), with ``warn_only=True`` warn; else nothing. The C++ kernels
    call at::globalContext().alertNotDeterministic; this is its Python side (torch._C._alert_not_deterministic
    where torch has it, else torch._prims_common.alert_not_deterministic, else the same check here)."""
    alert = getattr(torch._C, "_alert_not_deterministic", None)
    if alert is None:
        try:
            from torch._prims_common import alert_not_deterministic as alert
        except ImportError:
            alert = None
    if alert is not None:
        alert(caller)
        return
    if torch.are_deterministic_algorithms_enabled():
        message = (
            f"{caller} does not have a deterministic implementation, but you set "
            f"'torch.use_deterministic_algorithms(True)'."
        )
        if torch.is_deterministic_algorithms_warn_only_enabled():
            import warnings

            warnings.warn(message, UserWarning, stacklevel=3)
        else:
            raise RuntimeError(message)


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    # N x Lq x (M * D)
    return value.new_empty((N, Lq, M * D))


def _backward_fake(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False
):
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *rest = inputs
    ctx.softmax = bool(rest[0]) if rest else False
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _define(forward: str, backward: str) -> None:
    """Schema, fake implementations and autograd of one forward op and its backward op."""
    forward_name, backward_name = forward.split("::")[1], backward.split("::")[1]
    _lib.define(
        f"{forward_name}(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights, bool softmax=False) -> Tensor"
    )
    _lib.define(
        f"{backward_name}(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
        "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, bool softmax=False) "
        "-> (Tensor, Tensor, Tensor)"
    )
    torch.library.register_fake(forward, _forward_fake, lib=_lib)
    torch.library.register_fake(backward, _backward_fake, lib=_lib)
    backward_op = getattr(torch.ops.deformable_detr, backward_name)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_sampling_locations, grad_attention_weights = backward_op(
            grad_output.contiguous(),
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            ctx.softmax,
        )
        return grad_value, None, None, grad_sampling_locations, grad_attention_weights, None

    torch.library.register_autograd(forward, _backward, setup_context=_setup_context, lib=_lib)


_define(FORWARD, BACKWARD)
_define(EMULATED, EMULATED_BACKWARD)
_define(TRITON, TRITON_BACKWARD)
