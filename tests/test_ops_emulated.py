"""The CUDA kernels' code on the host: deformable_detr::ms_deform_attn_emulated runs ms_deform_attn_group.h and
ms_deform_attn_launch.h (what the GPU runs) with every group's lanes in lockstep, and is compared with the
pure-PyTorch reference for every dtype of the CUDA kernel.

D sweeps the layouts: one element per lane (1), one 16-byte pack for float32 / two for float16 (8), packs that
do not divide D (12, 71: one element per pack), groups of 8, 16 and 32 lanes, several rounds of a full group
(256 float32 = 64 packs) and a D > 256 that is no power of two (300). Misaligned views force the one-element
fallback; points lie outside the map, on its edge and far away (make_inputs).

Built with the CPU kernel (about a minute the first time).
"""

import pytest
import torch

from model.ops import build, ms_deform_attn, ms_deform_attn_pytorch
from model.ops.selfcheck import TOLERANCES
from model.ops.testing import CASES, forward_and_grads, make_inputs, max_relative_error, misaligned

RESULTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
LEVELS = [(5, 7), (3, 1), (2, 4)]  # odd shapes, a one-pixel-wide level


def emulated(*args):
    return torch.ops.deformable_detr.ms_deform_attn_emulated(*args)


def as_float64(inputs):
    return [t.double() if t.is_floating_point() else t for t in inputs]


@pytest.fixture(scope="module", autouse=True)
def cpu_library_built():
    build.load("cpu")


@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize("D", [1, 8, 12, 24, 48, 71, 256, 300])
def test_emulated_kernel_matches_reference(D, dtype, layout):
    inputs = make_inputs(LEVELS, M=2, D=D, P=2, N=2, Lq=5, dtype=dtype)
    if layout == "misaligned":
        inputs = [misaligned(t) if t.is_floating_point() else t for t in inputs]
        assert inputs[0].data_ptr() % 16 != 0
    actual = forward_and_grads(emulated, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, as_float64(inputs))  # the same rounded inputs
    for what, a, e in zip(RESULTS, actual, expected):
        assert a.shape == e.shape, what
        assert a.dtype == dtype, what
        assert max_relative_error(a, e) <= TOLERANCES[dtype], what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_misaligned_grad_output_falls_back_to_one_element_packs(dtype):
    # value aligned (16-byte packs chosen), grad_output a view that starts mid-pack: the backward must change
    # the layout, or the emulator's alignment check fails
    value, shapes, starts, loc, attn = make_inputs(LEVELS, M=2, D=16, P=2, N=2, Lq=5, dtype=dtype)
    grad_output = torch.randn(2, 5, 2 * 16, dtype=torch.float64).to(dtype)
    backward = torch.ops.deformable_detr.ms_deform_attn_emulated_backward
    aligned = backward(grad_output, value, shapes, starts, loc, attn)
    shifted = backward(misaligned(grad_output), value, shapes, starts, loc, attn)
    for a, s in zip(aligned, shifted):
        assert max_relative_error(s, a) <= TOLERANCES[dtype]


def test_emulated_kernel_matches_cpu_kernel_at_model_sizes():
    inputs = make_inputs(CASES[-1][1], M=8, D=32, P=4, N=2, Lq=40, dtype=torch.float32)
    expected = forward_and_grads(lambda *a: ms_deform_attn(*a, impl="cpu"), inputs)
    actual = forward_and_grads(emulated, inputs)
    for a, e in zip(actual, expected):
        assert max_relative_error(a, e) <= 1e-5


def test_emulated_kernel_gradcheck():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], M=2, D=12, P=2, N=1, Lq=3)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, loc, a: emulated(v, shapes, starts, loc, a), leaves, eps=1e-6, atol=1e-6)


def test_emulated_kernel_half_values_float32_locations():
    value, shapes, starts, loc, attn = make_inputs(LEVELS, M=3, D=32, P=4)
    value = value.half().requires_grad_()
    loc, attn = loc.float().requires_grad_(), attn.float().requires_grad_()
    out = emulated(value, shapes, starts, loc, attn)
    out.float().sum().backward()
    assert out.dtype == value.grad.dtype == torch.float16
    assert loc.grad.dtype == attn.grad.dtype == torch.float32
    expected = ms_deform_attn_pytorch(value.double(), shapes, starts, loc.double(), attn.double())
    assert max_relative_error(out, expected) <= 5e-3


def test_emulated_kernel_checks_levels_in_the_kernel():
    # the CUDA kernel reads the shapes from device memory: it checks each level itself (a device assert)
    value, shapes, starts, loc, attn = make_inputs(LEVELS, M=2, D=8, P=2)
    bad_starts = starts.clone()
    bad_starts[-1] += 1  # the last level ends one row past S
    with pytest.raises(RuntimeError, match="device-side assert: a level does not fit"):
        emulated(value, shapes, bad_starts, loc, attn)
    grad_output = torch.randn(2, 13, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="device-side assert: a level does not fit"):
        torch.ops.deformable_detr.ms_deform_attn_emulated_backward(grad_output, value, shapes, bad_starts, loc, attn)


def test_emulated_backward_is_flagged_nondeterministic():
    inputs = make_inputs(LEVELS, M=2, D=8, P=2)
    previous, previous_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(True)
        emulated(*inputs)  # the forward is deterministic
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward.*atomicAdd.*does not have a deterministic"):
            forward_and_grads(emulated, inputs)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward"):
            forward_and_grads(emulated, inputs)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def test_block_count_checked_before_the_launch():
    # 2^35 groups of 32 lanes need 2^32 blocks: refused from the sizes alone (the inputs are stride-0 views)
    N, Lq, M, D = 1, 2**20, 2**15, 128
    value = torch.zeros(1, 1, 1, D).expand(N, 1, M, D)
    shapes, starts = torch.tensor([[1, 1]]), torch.tensor([0])
    loc = torch.zeros(1, 1, 1, 1, 1, 2).expand(N, Lq, M, 1, 1, 2)
    attn = torch.zeros(1, 1, 1, 1, 1).expand(N, Lq, M, 1, 1)
    with pytest.raises(RuntimeError, match="need 4294967296 blocks, more than a CUDA grid holds"):
        emulated(value.contiguous(), shapes, starts, loc, attn)


def test_emulated_kernel_empty_inputs():
    value, shapes, starts, loc, attn = make_inputs(LEVELS, Lq=0, dtype=torch.float16)
    assert emulated(value, shapes, starts, loc, attn).shape == (2, 0, 16)
    value, shapes, starts, loc, attn = make_inputs(LEVELS, M=2, D=8, P=2)
    out = emulated(value, shapes[:0], starts[:0], loc[:, :, :, :0], attn[:, :, :, :0])
    assert out.shape == (2, 13, 16) and not out.any()


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize("D", [1, 12, 48, 300])  # one element per lane, unvectorised, 16 lanes, several rounds
def test_emulated_fused_softmax_matches_reference(D, dtype):
    """The CUDA kernels' fused softmax (every lane computes the group's max and sum; lane 0 rewrites the weights'
    gradients as the logits' once every round has added to them)."""
    inputs = make_inputs(LEVELS, M=2, D=D, P=2, N=2, Lq=5, dtype=dtype, logits=True)
    actual = forward_and_grads(lambda *a: torch.ops.deformable_detr.ms_deform_attn_emulated(*a, True), inputs)
    expected = forward_and_grads(lambda *a: ms_deform_attn_pytorch(*a, softmax=True), as_float64(inputs))
    for what, a, e in zip(RESULTS, actual, expected):
        assert a.dtype == dtype, what
        assert max_relative_error(a, e) <= TOLERANCES[dtype], what


def test_emulated_fused_softmax_gradcheck():
    value, shapes, starts, loc, logits = make_inputs([(3, 4), (2, 3)], M=2, D=12, P=2, N=1, Lq=3, logits=True)
    leaves = [t.requires_grad_(True) for t in (value, loc, logits)]
    assert torch.autograd.gradcheck(
        lambda v, loc, a: torch.ops.deformable_detr.ms_deform_attn_emulated(v, shapes, starts, loc, a, True),
        leaves,
        eps=1e-6,
        atol=1e-6,
    )
