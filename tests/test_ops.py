"""Multi-scale deformable attention: the compiled CPU kernel against the pure-PyTorch reference, the
dispatcher registration (torch.compile, torch.export, opcheck, traces), the FLOP handle and `auto`.

The first run compiles the CPU kernel (about a minute); later runs load it from the cache.
"""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import model.ops as ops
from model.ops import build, ms_deform_attn, ms_deform_attn_pytorch
from model.ops.testing import CASES, forward_and_grads, make_inputs, max_relative_error

REPO = Path(__file__).resolve().parents[1]


def cpu_kernel(*args):
    return ms_deform_attn(*args, impl="cpu")


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel_built():
    build.load("cpu")  # a build failure fails every test here, with the compiler's message


@pytest.mark.parametrize("name,spatial_shapes,M,D,P", CASES, ids=[c[0] for c in CASES])
def test_cpu_kernel_matches_reference_float64(name, spatial_shapes, M, D, P):
    inputs = make_inputs(spatial_shapes, M=M, D=D, P=P)
    actual = forward_and_grads(cpu_kernel, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, inputs)
    for what, a, e in zip(
        ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"), actual, expected
    ):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        assert max_relative_error(a, e) <= 1e-8, what


@pytest.mark.parametrize("D", [1, 12, 64, 300])  # channel counts without (1, 12, 300) and with a specialised loop
def test_cpu_kernel_other_channel_counts(D):
    inputs = make_inputs(CASES[2][1], M=3, D=D, P=2, N=1, Lq=70)  # Lq > one block of queries
    actual = forward_and_grads(cpu_kernel, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, inputs)
    for a, e in zip(actual, expected):
        assert max_relative_error(a, e) <= 1e-8


def test_cpu_kernel_float32():
    inputs = make_inputs(CASES[-1][1], M=2, D=32, P=4, dtype=torch.float32)
    actual = forward_and_grads(cpu_kernel, inputs)
    expected = forward_and_grads(ms_deform_attn_pytorch, [t.double() if t.is_floating_point() else t for t in inputs])
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        assert max_relative_error(a, e) <= 1e-5


def test_cpu_kernel_gradcheck():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], M=2, D=8, P=2, N=1, Lq=3)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(cpu_kernel, (value, shapes, starts, loc, attn), eps=1e-6, atol=1e-6)


def test_cpu_kernel_noncontiguous_and_mixed_dtypes():
    value, shapes, starts, loc, attn = make_inputs(CASES[2][1], M=2, D=8, P=1)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not value_t.is_contiguous()
    expected = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    torch.testing.assert_close(cpu_kernel(value_t, shapes, starts, loc, attn), expected, rtol=1e-12, atol=1e-12)
    # float32 locations / weights with float64 values: computed in float64, gradients in the inputs' dtypes
    loc32, attn32 = loc.float().requires_grad_(), attn.float().requires_grad_()
    out = cpu_kernel(value, shapes, starts, loc32, attn32)
    out.sum().backward()
    assert out.dtype == torch.float64 and loc32.grad.dtype == attn32.grad.dtype == torch.float32


def test_cpu_kernel_empty_and_bad_inputs():
    value, shapes, starts, loc, attn = make_inputs([(3, 4)], Lq=0)
    assert cpu_kernel(value, shapes, starts, loc, attn).shape == (2, 0, 2 * 8)
    value, shapes, starts, loc, attn = make_inputs([(3, 4)])
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernel(value[:, :5], shapes, starts, loc, attn)
    with pytest.raises(RuntimeError, match="attention_weights"):
        cpu_kernel(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        cpu_kernel(value.half(), shapes, starts, loc, attn)


def test_opcheck():
    inputs = make_inputs(CASES[2][1], M=2, D=8, P=1, N=1, Lq=4)
    value, shapes, starts, loc, attn = inputs
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn.default, (value, shapes, starts, loc, attn))


def test_torch_compile_cpu():
    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32)
    expected = forward_and_grads(cpu_kernel, inputs)

    def f(value, shapes, starts, loc, attn):
        return ms_deform_attn(value, shapes, starts, loc, attn, impl="cpu") * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    actual = forward_and_grads(compiled, inputs)
    for a, e in zip(actual, expected):
        # the compiled graph multiplies grad_output by 2 (f's "* 2"), hence 2 * expected
        torch.testing.assert_close(a, 2 * e)


def test_export_and_trace_show_the_op_by_name():
    class Attention(torch.nn.Module):
        def forward(self, value, shapes, starts, loc, attn):
            return ms_deform_attn(value, shapes, starts, loc, attn, impl="cpu")

    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1, dtype=torch.float32)
    exported = torch.export.export(Attention(), tuple(inputs))
    assert "deformable_detr.ms_deform_attn" in str(exported.graph)
    torch.testing.assert_close(exported.module()(*inputs), cpu_kernel(*inputs))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpu_kernel(*inputs)
    assert "deformable_detr::ms_deform_attn" in {e.key for e in prof.key_averages()}


def test_flop_handle_matches_reference_count():
    fvcore = pytest.importorskip("fvcore.nn")

    class Attention(torch.nn.Module):
        def __init__(self, impl):
            super().__init__()
            self.impl = impl

        def forward(self, value, shapes, starts, loc, attn):
            return ms_deform_attn(value, shapes, starts, loc, attn, impl=self.impl)

    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, N=2, Lq=5, dtype=torch.float32)
    counts = {}
    for impl in ("pytorch", "cpu"):
        analysis = fvcore.FlopCountAnalysis(Attention(impl), tuple(inputs))
        analysis.set_op_handle(**ops.flop_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts[impl] = analysis.total()
    N, Lq, M, L, P, _ = inputs[3].shape
    assert counts["pytorch"] == counts["cpu"] == 4 * N * Lq * M * 32 * L * P


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """impl="auto" as in a new process: nothing resolved, loaded, failed or announced yet."""
    for name in ("_chosen", "_unavailable", "_failed"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())


def test_auto_falls_back_with_one_warning(monkeypatch, fresh_dispatch):
    def cannot_build(device_type, **kwargs):
        raise build.BuildError("no compiler here")

    monkeypatch.setattr(build, "load", cannot_build)
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    expected = ms_deform_attn_pytorch(*inputs)
    with pytest.warns(RuntimeWarning, match="compiled cpu kernel .* not used on cpu: no compiler here"):
        torch.testing.assert_close(ms_deform_attn(*inputs, impl="auto"), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        torch.testing.assert_close(ms_deform_attn(*inputs, impl="auto"), expected)
    with pytest.raises(build.BuildError, match="no compiler here"):
        ms_deform_attn(*inputs, impl="cpu")  # never falls back
    info = ops.implementation_info("cpu", torch.float64)
    assert info["impl"] == "pytorch" and info["fallbacks"] == [{"impl": "cpu", "reason": "no compiler here"}]


def test_auto_uses_the_kernel_and_impl_errors(fresh_dispatch):
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs, impl="auto")
    assert ops._chosen[("auto", torch.device("cpu"), torch.float64, (2, 8, 1, 1, False))].name == "cpu"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ms_deform_attn(*inputs, impl="auto")
    assert "deformable_detr::ms_deform_attn" in {e.key for e in prof.key_averages()}
    with pytest.raises(ValueError, match="needs cuda tensors"):
        ms_deform_attn(*inputs, impl="cuda")
    with pytest.raises(ValueError, match="unknown ms_deform_attn implementation"):
        ms_deform_attn(*inputs, impl="tpu")
    info = ops.implementation_info("cpu", torch.float64)
    assert (info["impl"], info["self_check"], info["fallbacks"]) == ("cpu", "not needed", [])
    assert info["build"] == build.extension_spec("cpu").name
    # no CPU kernel for float16: the reference, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*[t.half() if t.is_floating_point() else t for t in inputs], impl="auto")
    assert ops.implementation_info("cpu", torch.float16)["fallbacks"] == [
        {"impl": "cpu", "reason": "no float16 support"}
    ]


def test_reference_takes_mixed_dtypes_outside_autocast():
    value, shapes, starts, loc, attn = make_inputs(CASES[2][1], M=2, D=8, P=1)
    expected = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    value16 = value.half().requires_grad_()
    loc32, attn32 = loc.float().requires_grad_(), attn.float().requires_grad_()
    out = ms_deform_attn(value16, shapes, starts, loc32, attn32, impl="pytorch")
    out.float().sum().backward()
    assert out.dtype == value16.grad.dtype == torch.float16
    assert loc32.grad.dtype == attn32.grad.dtype == torch.float32
    assert max_relative_error(out, expected) <= 5e-3


def test_first_build_says_what_it_builds(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_CACHE", str(tmp_path))
    monkeypatch.delenv("DEFORMABLE_DETR_OPS_NO_BUILD", raising=False)
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "_compile", lambda spec, verbose: spec.directory / "built.so")
    build.load("cpu")
    err = capfd.readouterr().err
    name = build.extension_spec("cpu").name
    assert f"compiling the cpu kernel {name}" in err and "about a minute" in err
    assert f"other processes that need it wait on {tmp_path / name}.lock" in err


def test_build_lock_says_that_it_waits(tmp_path, capfd):
    import fcntl
    import threading

    lock = tmp_path / "x.lock"
    with open(lock, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process building
        threading.Timer(0.5, fcntl.flock, (holder, fcntl.LOCK_UN)).start()
        with build._file_lock(lock, "waiting for the other build"):
            pass
    assert "waiting for the other build" in capfd.readouterr().err


def test_no_build_mode_reports_a_missing_library(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_CACHE", str(tmp_path))
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_NO_BUILD", "1")
    monkeypatch.setattr(build, "_LOADED", {})
    with pytest.raises(build.BuildError, match="python -m model.ops.build --cpu"):
        build.load("cpu")
    assert not list(tmp_path.iterdir())


def test_cuda_arch_flags():
    assert build.parse_arch_list("7.5;8.0 9.0+PTX") == ["7.5", "8.0", "9.0+PTX"]
    assert build.gencode_flags(["8.0", "9.0+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    with pytest.raises(ValueError):
        build.parse_arch_list("sm_80")
    spec = build.extension_spec("cuda", ["8.0"])
    assert spec.name != build.extension_spec("cuda", ["9.0"]).name  # the architectures are part of the key


def test_import_compiles_nothing():
    code = "import sys, model.ops; assert 'torch.utils.cpp_extension' not in sys.modules, 'imported the builder'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_doctor(monkeypatch, capsys):
    from model.ops import doctor

    monkeypatch.setenv("DEFORMABLE_DETR_OPS_NO_BUILD", "1")  # the fixture built the CPU kernel already
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert doctor.main(["--no-build"]) == 0
    report = capsys.readouterr().out
    assert "[cpu] CPU (" in report
    assert re.search(r"\n  cpu +yes +not needed", report) and re.search(r"\n  pytorch +yes +not needed", report)
    assert re.search(r"\n  triton +(yes|NO)", report)  # listed with its reason
    assert "impl='auto' uses: float64 -> cpu, float32 -> cpu, float16 -> pytorch, bfloat16 -> pytorch" in report
    assert "impl=cpu" in report and "gradcheck ok" in report


# The fused softmax: attention logits normalised over the L * P points of each (batch, query, head) inside the op.


def softmax_first(*args, impl):
    """The unfused path: the softmax computed outside, then the op on the weights."""
    value, shapes, starts, loc, logits = args
    weights = torch.softmax(logits.flatten(-2), -1).view_as(logits)
    return ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)


@pytest.mark.parametrize("name,spatial_shapes,M,D,P", CASES, ids=[c[0] for c in CASES])
def test_fused_softmax_cpu_kernel_matches_reference(name, spatial_shapes, M, D, P):
    inputs = make_inputs(spatial_shapes, M=M, D=D, P=P, logits=True)
    expected = forward_and_grads(lambda *a: softmax_first(*a, impl="pytorch"), inputs)
    for fn in (
        lambda *a: ms_deform_attn(*a, impl="cpu", softmax=True),
        ops.ms_deform_attn_softmax,
        lambda *a: ms_deform_attn_pytorch(*a, softmax=True),
    ):
        for what, a, e in zip(
            ("output", "grad_value", "grad_sampling_locations", "grad_logits"), forward_and_grads(fn, inputs), expected
        ):
            assert a.dtype == e.dtype and a.shape == e.shape, what
            assert max_relative_error(a, e) <= 1e-12, what


@pytest.mark.parametrize("D", [12, 300])  # no specialised loop; several tasks per level
def test_fused_softmax_cpu_kernel_float32_and_gradcheck(D):
    inputs = make_inputs(CASES[2][1], M=3, D=D, P=2, N=1, Lq=70, dtype=torch.float32, logits=True)
    actual = forward_and_grads(lambda *a: ms_deform_attn(*a, impl="cpu", softmax=True), inputs)
    expected = forward_and_grads(
        lambda *a: ms_deform_attn_pytorch(*a, softmax=True),
        [t.double() if t.is_floating_point() else t for t in inputs],
    )
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32 and max_relative_error(a, e) <= 1e-5
    value, shapes, starts, loc, logits = make_inputs([(3, 4), (2, 3)], M=2, D=8, P=2, N=1, Lq=3, logits=True)
    leaves = [t.requires_grad_(True) for t in (value, loc, logits)]
    assert torch.autograd.gradcheck(
        lambda v, loc, a: ms_deform_attn(v, shapes, starts, loc, a, impl="cpu", softmax=True),
        leaves,
        eps=1e-6,
        atol=1e-6,
    )


def test_fused_softmax_opcheck_and_compile():
    value, shapes, starts, loc, logits = make_inputs(CASES[2][1], M=2, D=8, P=1, N=1, Lq=4, logits=True)
    for t in (value, loc, logits):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn.default, (value, shapes, starts, loc, logits, True))
    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32, logits=True)
    expected = forward_and_grads(lambda *a: ms_deform_attn(*a, impl="cpu", softmax=True), inputs)
    compiled = torch.compile(
        lambda *a: ms_deform_attn(*a, impl="cpu", softmax=True), backend="aot_eager", fullgraph=True
    )
    for a, e in zip(forward_and_grads(compiled, inputs), expected):
        torch.testing.assert_close(a, e)


def test_attention_module_fused_and_unfused_softmax_agree():
    """MSDeformAttn with the softmax inside the op (the default) and outside (fused_softmax=False): the same
    parameters (a checkpoint loads into either), the same output and gradients."""
    from model.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    fused = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=2, impl="cpu").double()
    unfused = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=2, impl="cpu", fused_softmax=False).double()
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.2)
    unfused.load_state_dict(fused.state_dict())
    assert fused.fused_softmax and not unfused.fused_softmax
    shapes = torch.tensor([[6, 5], [3, 3], [2, 1]])
    starts = torch.tensor([0, 30, 39])
    query = torch.randn(2, 7, 64, dtype=torch.float64)
    src = torch.randn(2, 41, 64, dtype=torch.float64)
    ref = torch.rand(2, 7, 3, 2, dtype=torch.float64)
    outputs = []
    for module in (fused, unfused):
        out = module(query, ref, src, shapes, starts)
        out.square().sum().backward()
        outputs.append((out.detach(), {k: p.grad.clone() for k, p in module.named_parameters()}))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-12, atol=1e-12)
    for key, grad in outputs[0][1].items():
        torch.testing.assert_close(grad, outputs[1][1][key], rtol=1e-10, atol=1e-12, msg=key)
