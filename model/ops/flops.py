"""fvcore FLOP handle for ``deformable_detr::ms_deform_attn``.

fvcore counts the pure-PyTorch reference through ``aten::grid_sampler`` (4 per output element, "assume
bilinear"; one call per level with an N*M x D x Lq x P output) and counts nothing for the weighting
multiply and the sum over points. The handle gives the compiled op the same total, so a model's FLOPs do
not depend on the implementation that ran:

    flops = 4 * N * Lq * M * D * L * P

Usage::

    analysis = FlopCountAnalysis(model, inputs)
    for name, handle in flop_handles().items():
        analysis.set_op_handle(name, handle)
"""

from __future__ import annotations

from math import prod

from .library import FORWARD, TRITON


def _shape(value) -> list[int]:
    """Static shape of a TorchScript value from fvcore's trace."""
    return list(value.type().sizes())


def ms_deform_attn_flop_jit(inputs, outputs) -> int:
    # inputs: value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    N, Lq, M, L, P, _ = _shape(inputs[3])
    output_numel = prod(_shape(outputs[0]))  # N x Lq x (M * D)
    return 4 * output_numel * L * P


def flop_handles() -> dict:
    """{registered op name: fvcore handle}, for ``FlopCountAnalysis.set_op_handle``."""
    return {FORWARD: ms_deform_attn_flop_jit, TRITON: ms_deform_attn_flop_jit}
