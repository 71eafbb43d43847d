"""The Triton kernels of multi-scale deformable attention against the pure-PyTorch reference, run on CPU tensors
by Triton's interpreter (TRITON_INTERPRET=1, set per test: model.ops.triton_kernel loads the kernels for the mode
in force at launch), and compiled for a GPU architecture without a GPU to look at the code they become.
"""

import re
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import model.ops as ops  # noqa: E402
from model.ops import ms_deform_attn, ms_deform_attn_pytorch, triton_kernel  # noqa: E402
from model.ops.testing import forward_and_grads, make_inputs, max_relative_error  # noqa: E402

RESULTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
# largest error relative to the float64 reference on the same (rounded) inputs; measured: float32 <= 1e-6,
# float16 <= 6e-4, bfloat16 <= 6e-3
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ODD_LEVELS = [(9, 11), (5, 6), (3, 2), (1, 4), (2, 1)]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_SELF_CHECK", "0")  # the self-check has its own tests


class _Triton(torch.autograd.Function):
    """The module's forward / backward, called directly."""

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, attn, softmax=False):
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        ctx.softmax = softmax
        return triton_kernel.forward(value, shapes, starts, loc, attn, softmax)

    @staticmethod
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = triton_kernel.backward(grad_output, *ctx.saved_tensors, ctx.softmax)
        return grad_value, None, None, grad_loc, grad_attn, None


def check_against_reference(inputs, dtype, softmax=False):
    actual = forward_and_grads(lambda *a: _Triton.apply(*a, softmax), inputs)
    # the reference in float64 on the very inputs the kernel got (rounded to dtype)
    expected = forward_and_grads(
        lambda *a: ms_deform_attn_pytorch(*a, softmax=softmax),
        [t.double() if t.is_floating_point() else t for t in inputs],
    )
    for what, a, e, t in zip(RESULTS, actual, expected, (inputs[0], inputs[0], inputs[3], inputs[4])):
        assert a.shape == e.shape and a.dtype == t.dtype, what
        assert torch.isfinite(a).all(), what
        assert max_relative_error(a, e) <= TOLERANCES[dtype], what


# (levels, M, D, P, N, Lq): every D of {8, 24, 32, 48, 64, 71, 256}, L of {1, 4, 5} and K of {1, 4, 8}, not their
# product
CASES = [
    ([(5, 7)], 2, 8, 1, 2, 13),
    (ODD_LEVELS[:4], 2, 24, 4, 1, 9),
    (ODD_LEVELS, 2, 32, 8, 1, 7),
    (ODD_LEVELS[:4], 1, 48, 4, 2, 5),
    ([(6, 3)], 3, 64, 8, 1, 6),
    (ODD_LEVELS, 1, 71, 4, 1, 9),
    (ODD_LEVELS[:4], 1, 256, 1, 1, 4),
]


@pytest.mark.parametrize("levels,M,D,P,N,Lq", CASES, ids=[f"L{len(c[0])}_D{c[2]}_K{c[3]}" for c in CASES])
def test_matches_reference_float32(levels, M, D, P, N, Lq):
    check_against_reference(make_inputs(levels, M=M, D=D, P=P, N=N, Lq=Lq, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_other_dtypes(dtype):
    check_against_reference(make_inputs(ODD_LEVELS[:4], M=2, D=32, P=4, N=2, Lq=9, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("levels,M,D,P,N,Lq", [CASES[2], CASES[5]], ids=["L5_D32_K8", "L5_D71_K4"])
def test_fused_softmax_matches_reference(levels, M, D, P, N, Lq, dtype):
    """Logits normalised inside the kernels: forward, and the logits' gradients rewritten from the weights' after
    the main loop (float32 scratch for bfloat16 logits)."""
    check_against_reference(
        make_inputs(levels, M=M, D=D, P=P, N=N, Lq=Lq, dtype=dtype, logits=True), dtype, softmax=True
    )


def test_fused_softmax_gradcheck_and_dispatcher():
    value, shapes, starts, loc, logits = make_inputs([(3, 4), (2, 3)], M=2, D=5, P=2, N=1, Lq=3, logits=True)
    for t in (value, loc, logits):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, a: _Triton.apply(v, shapes, starts, loc, a, True),
        (value, loc, logits),
        eps=1e-6,
        atol=1e-7,
        fast_mode=True,
    )
    inputs = make_inputs(ODD_LEVELS[:4], M=2, D=16, P=2, N=1, Lq=5, dtype=torch.float32, logits=True)
    expected = forward_and_grads(lambda *a: ms_deform_attn_pytorch(*a, softmax=True), inputs)
    for a, e in zip(forward_and_grads(lambda *a: ms_deform_attn(*a, impl="triton", softmax=True), inputs), expected):
        assert max_relative_error(a, e) <= TOLERANCES[torch.float32]


def test_half_values_with_float32_locations():
    value, shapes, starts, loc, attn = make_inputs(ODD_LEVELS[:2], M=2, D=16, P=2, N=1, Lq=6, dtype=torch.float32)
    actual = forward_and_grads(_Triton.apply, (value.half(), shapes, starts, loc, attn))
    expected = forward_and_grads(
        ms_deform_attn_pytorch, (value.half().double(), shapes, starts, loc.double(), attn.double())
    )
    # output and grad_value in value's dtype, the other gradients in their inputs' (float32)
    assert [t.dtype for t in actual] == [torch.float16, torch.float16, torch.float32, torch.float32]
    for a, e in zip(actual, expected):
        assert max_relative_error(a, e) <= TOLERANCES[torch.float16]


def test_gradcheck_float64():
    """Gradients by finite differences (along random directions: each evaluation is a kernel launch)."""
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], M=2, D=5, P=2, N=1, Lq=3)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        _Triton.apply, (value, shapes, starts, loc, attn), eps=1e-6, atol=1e-7, fast_mode=True
    )


def test_points_on_and_past_the_borders():
    """Pixel coordinates x * W - 0.5 on every case of the bounds (-1 exactly, between the border and the first
    centre, the last centre, past the end), NaN, and points so far out that they overflow int32. H and W are
    powers of two, so that the coordinates are exact: on a pixel centre, where bilinear sampling has a kink, the
    gradient is a one-sided derivative, and a rounding to either side picks the other one."""
    H, W = 4, 8
    shapes, starts = torch.tensor([[H, W]]), torch.tensor([0])

    def normalised(n):  # pixel coordinates -> normalised locations along a side of n pixels
        pixel = torch.tensor([-1.5, -1.0, -0.75, -0.5, 0.0, 0.25, n - 1.0, n - 0.75, n - 0.5, n, n + 0.5])
        return (pixel.double() + 0.5) / n

    grid = torch.cartesian_prod(normalised(W), normalised(H))  # all (x, y) pairs
    loc = torch.cat([grid, torch.tensor([[1e12, 0.5], [0.5, -1e12]], dtype=torch.float64)])
    loc = loc.view(1, -1, 1, 1, 1, 2)
    value = torch.randn(1, H * W, 1, 8, dtype=torch.float64)
    attn = torch.rand(loc.shape[:-1], dtype=torch.float64)
    inputs = (value, shapes, starts, loc, attn)
    actual = forward_and_grads(_Triton.apply, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, inputs)
    for what, a, e in zip(RESULTS, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=what)
    # a NaN location reads nothing and gets no gradient (grid_sample would propagate the NaN)
    loc_nan = loc.clone()
    loc_nan[0, 0, 0, 0, 0, 0] = float("nan")
    out, _, grad_loc, _ = forward_and_grads(_Triton.apply, (value, shapes, starts, loc_nan, attn))
    torch.testing.assert_close(out[0, 1:], expected[0][0, 1:])
    assert out[0, 0].eq(0).all() and grad_loc[0, 0].eq(0).all()


@pytest.mark.parametrize("N,Lq,L,P", [(0, 5, 2, 2), (2, 0, 2, 2), (1, 3, 2, 0)])
def test_empty(N, Lq, L, P):
    value, shapes, starts, loc, attn = make_inputs(ODD_LEVELS[: max(L, 1)], M=2, D=8, P=max(P, 1), N=max(N, 1), Lq=Lq)
    value, loc, attn = value[:N], loc[:N, :, :, :L, :P], attn[:N, :, :, :L, :P]
    out, grad_value, grad_loc, grad_attn = forward_and_grads(_Triton.apply, (value, shapes, starts, loc, attn))
    assert out.shape == (N, Lq, 16) and not out.any()
    assert grad_value.shape == value.shape and not grad_value.any()
    assert grad_loc.shape == loc.shape and grad_attn.shape == attn.shape


def test_every_access_stays_inside_its_tensor(monkeypatch):
    """The interpreter, watched: every load, store and atomic that its mask lets through lands inside one of the
    tensors given to the kernel (a corner outside the map is masked, never read at a clamped address)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = interpreter.InterpreterBuilder
    if not all(hasattr(builder, f) for f in ("create_masked_load", "create_masked_store", "create_atomic_rmw")):
        pytest.skip("this Triton's interpreter has other internals")
    inputs = make_inputs(ODD_LEVELS, M=2, D=24, P=4, N=2, Lq=9, dtype=torch.float32)
    grad_output = torch.randn(2, 9, 48)
    spans, checked = [], []

    def inside(ptrs, mask):
        import numpy as np

        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        ok = np.zeros(addresses.shape, dtype=bool)
        for start, end in spans:
            ok |= (addresses >= start) & (addresses < end)
        checked.append(addresses.size)
        assert ok.all(), "a masked-in access outside every tensor"

    def watch(name, ptr_index, mask_index):
        original = getattr(builder, name)

        def watched(self, *args):
            inside(args[ptr_index], args[mask_index])
            return original(self, *args)

        monkeypatch.setattr(builder, name, watched)

    watch("create_masked_load", 0, 1)
    watch("create_masked_store", 0, 2)
    watch("create_atomic_rmw", 1, 3)
    real_zeros, real_empty_like, real_new_empty = torch.zeros, torch.empty_like, torch.Tensor.new_empty

    def record(t):  # the span of every tensor the launchers allocate
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(torch, "zeros", lambda *a, **k: record(real_zeros(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: record(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda *a, **k: record(real_new_empty(*a, **k)))
    for t in (*inputs, grad_output):
        record(t)
    triton_kernel.forward(*inputs)
    triton_kernel.backward(grad_output, *inputs)
    assert sum(checked) > 0


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs = make_inputs([(3, 4)], dtype=torch.float32)
    ok, reason = triton_kernel.available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        triton_kernel.forward(*inputs)
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        torch.ops.deformable_detr.ms_deform_attn_triton(*inputs)  # (the dispatcher remembers what is unavailable)


def test_bad_inputs():
    value, shapes, starts, loc, attn = make_inputs([(3, 4)], dtype=torch.float32)
    with pytest.raises(ValueError, match="attention_weights"):
        triton_kernel.forward(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        triton_kernel.forward(value.int(), shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="int64"):
        triton_kernel.forward(value, shapes.int(), starts, loc, attn)


def test_dispatcher_op_compile_and_flops():
    """impl="triton": the dispatcher op's Triton twin, with the same fake implementation (torch.compile with a
    full graph), autograd and FLOP count as the other implementations."""
    inputs = make_inputs(ODD_LEVELS[:4], M=2, D=16, P=2, N=1, Lq=5, dtype=torch.float32)
    expected = forward_and_grads(ms_deform_attn_pytorch, inputs)
    actual = forward_and_grads(lambda *a: ms_deform_attn(*a, impl="triton"), inputs)
    for a, e in zip(actual, expected):
        assert max_relative_error(a, e) <= TOLERANCES[torch.float32]
    compiled = torch.compile(lambda *a: ms_deform_attn(*a, impl="triton") * 2, backend="aot_eager", fullgraph=True)
    for a, e in zip(forward_and_grads(compiled, inputs), expected):
        assert max_relative_error(a, 2 * e) <= TOLERANCES[torch.float32]
    torch.library.opcheck(
        torch.ops.deformable_detr.ms_deform_attn_triton.default,
        tuple(t.requires_grad_(t.is_floating_point()) for t in inputs),
    )

    fvcore = pytest.importorskip("fvcore.nn")

    class Attention(torch.nn.Module):
        def __init__(self, impl):
            super().__init__()
            self.impl = impl

        def forward(self, *args):
            return ms_deform_attn(*args, impl=self.impl)

    counts = {}
    for impl in ("pytorch", "triton"):
        analysis = fvcore.FlopCountAnalysis(Attention(impl), tuple(t.detach() for t in inputs))
        analysis.set_op_handle(**ops.flop_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts[impl] = analysis.total()
    N, Lq, M, L, P, _ = inputs[3].shape
    assert counts["triton"] == counts["pytorch"] == 4 * N * Lq * M * 16 * L * P


class _HopperWithoutGPU:
    """Just enough of a Triton driver for kernels to be compiled for sm_90 (never launched) on a machine without
    a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "fused_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiles_for_hopper_with_vector_accesses(monkeypatch, dtype, softmax):
    """Without a GPU, through the launchers: at the decoder preset (batch 4, 300 queries, levels of an 800 x 1333
    image, M = 8, D = 32, L = K = 4) the kernels compile for sm_90; each bilinear corner is one 16-byte load per
    thread and, in the backward, one vector atomic add of float32 (into grad_value itself for float32 values,
    into the float32 accumulator for bfloat16: no 16-bit atomics)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.runtime import driver
    from triton.runtime.jit import KernelInterface

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(triton_kernel, "available", lambda device: (True, "compiling only"))
    # kernels of their own, so that no kernel compiled for this pretend GPU stays cached in the process
    monkeypatch.setattr(triton_kernel, "_jit_modules", {})
    monkeypatch.delitem(sys.modules, "model.ops.triton_jit", raising=False)
    monkeypatch.setattr(driver, "_active", _HopperWithoutGPU())
    compiled = []  # (grid, compiled kernel) of each launch, compiled instead of launched
    monkeypatch.setattr(
        KernelInterface,
        "__getitem__",
        lambda kernel, grid: (
            lambda *args, **kwargs: compiled.append((grid, kernel.run(*args, grid=grid, warmup=True, **kwargs)))
        ),
    )
    inputs = make_inputs([(100, 167), (50, 84), (25, 42), (13, 21)], M=8, D=32, P=4, N=4, Lq=300, dtype=dtype)
    triton_kernel.forward(*inputs, softmax)
    triton_kernel.backward(torch.zeros(4, 300, 8 * 32, dtype=dtype), *inputs, softmax)

    (forward_grid, forward), (backward_grid, backward) = compiled
    if softmax:  # the logits' gradients are rewritten after a CTA barrier
        assert "bar.sync" in backward.asm["ptx"] or "barrier.sync" in backward.asm["ptx"]
    assert forward_grid == backward_grid == (4 * 300 * 8 // 16,)  # 16 (query, head) groups per program
    corners = 4 * 4  # K points x 4 corners, unrolled
    for kernel in (forward, backward):
        assert len(re.findall(r"ld\.global(\.\w+)*\.v4\.b32", kernel.asm["ptx"])) >= corners
    atomics = re.findall(r"(?:atom|red)\.global(?:\.\w+)*\.add(?:\.noftz)?((?:\.v\d)?\.\w+)", backward.asm["ptx"])
    assert atomics and set(atomics) == {".v4.f32"}


def test_backward_is_flagged_nondeterministic():
    """Like the CUDA kernel (and torch's own atomic kernels): torch.use_deterministic_algorithms(True) raises in
    the backward, warn_only=True warns; the forward is deterministic."""
    inputs = make_inputs(ODD_LEVELS[:2], M=2, D=8, P=2, N=1, Lq=3, dtype=torch.float32)
    previous, previous_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(True)
        ms_deform_attn(*inputs, impl="triton")
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward \\(Triton.*does not have a deterministic"):
            forward_and_grads(lambda *a: ms_deform_attn(*a, impl="triton"), inputs)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward \\(Triton"):
            forward_and_grads(lambda *a: ms_deform_attn(*a, impl="triton"), inputs)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
