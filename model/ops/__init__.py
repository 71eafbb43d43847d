"""Multi-scale deformable attention: one function, several implementations."""
from .reference import ms_deform_attn_pytorch


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl="auto"):
    """Multi-scale deformable attention (shapes in :mod:`model.ops.reference`)."""
    if impl not in ("auto", "pytorch"):
        raise NotImplementedError(f"attention implementation {impl!r} is not built yet")
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
