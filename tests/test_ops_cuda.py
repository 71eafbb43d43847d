"""Multi-scale deformable attention: the CUDA kernel against the pure-PyTorch reference (skipped without a GPU).

The first run compiles the CUDA kernel (several minutes); `python -m model.ops.build --cuda` does it ahead.
"""

import pytest
import torch

from model.ops import build, implementation_info, ms_deform_attn, ms_deform_attn_pytorch
from model.ops.selfcheck import TOLERANCES
from model.ops.testing import CASES, forward_and_grads, make_inputs, max_relative_error, misaligned

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_kernel(*args):
    return ms_deform_attn(*args, impl="cuda")


def as_float64(inputs):
    return [t.double() if t.is_floating_point() else t for t in inputs]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernel_built():
    if torch.cuda.is_available():
        build.load("cuda")


@pytest.mark.parametrize("name,spatial_shapes,M,D,P", CASES, ids=[c[0] for c in CASES])
def test_cuda_kernel_matches_reference_float64(name, spatial_shapes, M, D, P):
    inputs = make_inputs(spatial_shapes, M=M, D=D, P=P, device="cuda")
    actual = forward_and_grads(cuda_kernel, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, [t.cpu() for t in inputs])
    for what, a, e in zip(
        ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"), actual, expected
    ):
        assert a.dtype == e.dtype and a.shape == e.shape and a.is_cuda, what
        assert max_relative_error(a, e) <= 1e-8, what


# D covers one pack per lane (8, 32), several rounds of a full warp (256 float32 = 64 packs), and the
# unvectorised path (12 is no multiple of 8 halves / 4 floats).
@pytest.mark.parametrize("D", [8, 12, 32, 256])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_cuda_kernel_reduced_precision(D, dtype, tolerance):
    inputs = make_inputs(CASES[-1][1], M=3, D=D, P=4, N=2, Lq=50, device="cuda", dtype=dtype)
    actual = forward_and_grads(cuda_kernel, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, as_float64(inputs))  # same rounded inputs
    for what, a, e in zip(
        ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"), actual, expected
    ):
        assert a.dtype == dtype, what
        assert max_relative_error(a, e) <= tolerance, what


def test_cuda_kernel_float32_locations_with_half_values():
    value, shapes, starts, loc, attn = make_inputs(CASES[1][1], M=3, D=32, P=4, device="cuda")
    value = value.half().requires_grad_()
    loc, attn = loc.float().requires_grad_(), attn.float().requires_grad_()
    out = cuda_kernel(value, shapes, starts, loc, attn)
    out.float().sum().backward()
    assert out.dtype == value.grad.dtype == torch.float16
    assert loc.grad.dtype == attn.grad.dtype == torch.float32
    expected = ms_deform_attn_pytorch(value.double(), shapes, starts, loc.double(), attn.double())
    assert max_relative_error(out, expected) <= 5e-3


def test_cuda_kernel_gradcheck():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], M=2, D=8, P=2, N=1, Lq=3, device="cuda")
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(cuda_kernel, (value, shapes, starts, loc, attn), eps=1e-6, atol=1e-6)


def test_cuda_kernel_matches_cpu_kernel_float32():
    inputs = make_inputs(CASES[-1][1], M=8, D=32, P=4, N=2, Lq=300, dtype=torch.float32)
    expected = forward_and_grads(lambda *a: ms_deform_attn(*a, impl="cpu"), inputs)
    actual = forward_and_grads(cuda_kernel, [t.cuda() for t in inputs])
    for a, e in zip(actual, expected):
        assert max_relative_error(a, e) <= 1e-5


def test_cuda_shapes_on_the_cpu_and_empty_queries():
    value, shapes, starts, loc, attn = make_inputs(CASES[2][1], M=2, D=8, P=1, device="cuda")
    expected = cuda_kernel(value, shapes, starts, loc, attn)
    torch.testing.assert_close(cuda_kernel(value, shapes.cpu(), starts.cpu(), loc, attn), expected)
    value, shapes, starts, loc, attn = make_inputs(CASES[2][1], M=2, D=8, P=1, Lq=0, device="cuda")
    assert cuda_kernel(value, shapes, starts, loc, attn).shape == (2, 0, 16)


def test_auto_picks_the_cuda_kernel():
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1, device="cuda", dtype=torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ms_deform_attn(*inputs, impl="auto")
    assert "deformable_detr::ms_deform_attn" in {e.key for e in prof.key_averages()}


def test_torch_compile_cuda():
    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, device="cuda", dtype=torch.float32)
    expected = forward_and_grads(cuda_kernel, inputs)
    compiled = torch.compile(cuda_kernel, fullgraph=True)
    actual = forward_and_grads(compiled, inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_opcheck_cuda():
    value, shapes, starts, loc, attn = make_inputs(CASES[2][1], M=2, D=8, P=1, N=1, Lq=4, device="cuda")
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn.default, (value, shapes, starts, loc, attn))


# The host emulator's sweep (tests/test_ops_emulated.py), on the GPU.
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize("D", [1, 8, 12, 24, 48, 71, 256, 300])
def test_cuda_kernel_sweep(D, dtype, layout):
    inputs = make_inputs([(5, 7), (3, 1), (2, 4)], M=2, D=D, P=2, N=2, Lq=5, dtype=dtype, device="cuda")
    if layout == "misaligned":
        inputs = [misaligned(t) if t.is_floating_point() else t for t in inputs]
    actual = forward_and_grads(cuda_kernel, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, as_float64([t.cpu() for t in inputs]))
    for what, a, e in zip(
        ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"), actual, expected
    ):
        assert a.dtype == dtype and a.is_cuda, what
        assert max_relative_error(a, e) <= TOLERANCES[dtype], what


def test_cuda_kernel_checks_levels_given_on_the_cpu():
    value, shapes, starts, loc, attn = make_inputs(CASES[2][1], M=2, D=8, P=1, device="cuda")
    with pytest.raises(RuntimeError, match="does not fit in value"):
        cuda_kernel(value[:, :5], shapes.cpu(), starts.cpu(), loc, attn)


def test_cuda_backward_is_flagged_nondeterministic():
    inputs = make_inputs(CASES[2][1], M=2, D=8, P=1, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward"):
            forward_and_grads(cuda_kernel, inputs)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_cuda_kernel_passes_its_self_check():
    info = implementation_info("cuda", torch.float16, impl="cuda")
    assert info["impl"] == "cuda" and info["self_check"].startswith("passed"), info
    auto = implementation_info("cuda", torch.float32)
    assert auto["impl"] == "cuda" and auto["fallbacks"] == [], auto


@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("D", [8, 32, 300])
def test_fused_softmax_on_the_gpu(impl, dtype, tolerance, D):
    """Logits normalised inside the CUDA and Triton kernels (the model's default), forward and gradients, at
    the model's tile sizes (Lq = 300 queries of 8 heads) and a D that needs several rounds."""
    if impl == "triton":
        pytest.importorskip("triton")
    inputs = make_inputs(CASES[-1][1], M=8, D=D, P=4, N=2, Lq=300, device="cuda", dtype=dtype, logits=True)
    actual = forward_and_grads(lambda *a: ms_deform_attn(*a, impl=impl, softmax=True), inputs)
    expected = forward_and_grads(
        lambda *a: ms_deform_attn_pytorch(*a, softmax=True), as_float64([t.cpu() for t in inputs])
    )
    for what, a, e in zip(("output", "grad_value", "grad_sampling_locations", "grad_logits"), actual, expected):
        assert a.dtype == dtype and a.is_cuda, what
        assert max_relative_error(a, e) <= tolerance, what


def test_triton_backward_is_flagged_nondeterministic_on_the_gpu():
    pytest.importorskip("triton")
    inputs = make_inputs(CASES[2][1], M=2, D=8, P=1, device="cuda", dtype=torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward \\(Triton"):
            forward_and_grads(lambda *a: ms_deform_attn(*a, impl="triton"), inputs)
    finally:
        torch.use_deterministic_algorithms(previous)
