"""The self-check and impl="auto"'s chain, on the CPU: test implementations (model/ops/testing.py) that ask for
the self-check as the GPU kernels do — the host-emulated CUDA kernel, a kernel made wrong on purpose, one that
kills its process and one that cannot launch — are put at the head of the CPU chain.

Each self-check runs a child process (a few seconds: it imports torch).
"""
import json
import warnings

import pytest
import torch

import model.ops as ops
from model.ops import build, implementations, ms_deform_attn, ms_deform_attn_pytorch, selfcheck, testing
from model.ops.environment import runs_on
from model.ops.testing import CASES, make_inputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch, tmp_path):
    """impl="auto" as in a new process, with verdicts stored under tmp_path."""
    build.load("cpu")
    for name in ("_chosen", "_unavailable", "_failed"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.delenv("DEFORMABLE_DETR_OPS_SELF_CHECK", raising=False)
    for impl in (testing.EMULATED, testing.WRONG, testing.CRASHING, testing.UNLAUNCHABLE):
        monkeypatch.setattr(impl, "verdict_dir", lambda impl=impl: tmp_path / impl.name)
        monkeypatch.setitem(implementations.REGISTRY, impl.name, impl)


def use_chain(monkeypatch, *names):
    monkeypatch.setitem(implementations.CHAINS, "cpu", names)


def test_wrong_kernel_is_caught_and_auto_falls_back_with_one_warning(monkeypatch, tmp_path):
    use_chain(monkeypatch, "wrong", "cpu", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning) as record:
        out = ms_deform_attn(*inputs)
    message = str(record[0].message)
    assert len(record) == 1
    # names the device, the case and the error
    assert "deliberately wrong kernel" in message and "FAILED its self-check" in message
    assert "CPU (" in message and "in case odd_levels_d12" in message
    assert "output differs from the reference by" in message and "uses the compiled cpu kernel instead" in message
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        ms_deform_attn(*inputs)
    # the verdict is on disk, keyed by build, device, driver and torch version
    (path,) = (tmp_path / "wrong").glob("*_float64.json")
    verdict = json.loads(path.read_text())
    assert verdict["ok"] is False and verdict["case"].startswith("odd_levels_d12")
    assert {"build", "device", "driver", "torch"} <= set(verdict) and verdict["dtypes"] == ["float64"]
    # a named implementation raises instead of falling back
    with pytest.raises(ops.SelfCheckError, match="FAILED its self-check"):
        ms_deform_attn(*inputs, impl="wrong")


def test_cached_verdict_is_read_not_recomputed(monkeypatch):
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1, dtype=torch.float32)
    first = selfcheck.self_check(testing.WRONG, CPU, torch.float32)
    assert first["ok"] is False and first["status"] == "FAILED" and first["dtypes"] == ["float64", "float32"]
    monkeypatch.setattr(selfcheck, "_verdicts", {})  # a new process on the same node
    monkeypatch.setattr(selfcheck, "_run_child", lambda *a: pytest.fail("the self-check ran again"))
    again = selfcheck.self_check(testing.WRONG, CPU, torch.float32)
    assert again["status"].startswith("FAILED (cached: ") and again["case"] == first["case"]
    use_chain(monkeypatch, "wrong", "pytorch")
    with pytest.warns(RuntimeWarning, match="FAILED its self-check"):
        ms_deform_attn(*inputs)


def test_emulated_cuda_kernel_passes_its_self_check(monkeypatch):
    use_chain(monkeypatch, "emulated", "cpu", "pytorch")
    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
    assert torch.allclose(out, ms_deform_attn_pytorch(*inputs), atol=1e-5)
    info = ops.implementation_info(CPU, torch.float32)
    assert (info["impl"], info["self_check"], info["fallbacks"]) == ("emulated", "passed", [])
    verdict = selfcheck.self_check(testing.EMULATED, CPU, torch.float32)
    assert set(verdict["max_errors"]) == {"float64", "float32"} and verdict["max_errors"]["float64"] < 1e-12


def test_a_crashing_kernel_does_not_kill_the_caller(monkeypatch):
    use_chain(monkeypatch, "crashing", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning, match=r"crashing kernel .* in case odd_levels_d12 .*killed by signal 6"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "pytorch"


def test_auto_falls_back_when_a_launch_fails(monkeypatch):
    use_chain(monkeypatch, "unlaunchable", "cpu", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning, match="unlaunchable kernel .* failed to launch: .*no kernel image"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "cpu"
    with pytest.raises(RuntimeError, match="no kernel image"):
        ms_deform_attn(*inputs, impl="unlaunchable")  # a named implementation raises


def test_self_check_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_SELF_CHECK", "0")
    use_chain(monkeypatch, "wrong", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    ms_deform_attn(*inputs)  # trusted unchecked: it is the wrong one that runs
    info = ops.implementation_info(CPU, torch.float64)
    assert info["impl"] == "wrong" and info["self_check"].startswith("skipped")


def test_compute_capability_against_the_build():
    assert runs_on(["7.5", "8.0", "9.0+PTX"], (8, 6)) == (True, "machine code for sm_80")
    assert runs_on(["7.5", "8.0", "9.0+PTX"], (9, 0))[0]
    assert runs_on(["7.5", "8.0", "9.0+PTX"], (10, 0)) == (True, "PTX of compute_90, compiled by the driver at load")
    ok, reason = runs_on(["7.5", "8.0", "9.0"], (10, 0))
    assert not ok and "sm_100" in reason and '--arch "7.5;8.0;9.0;10.0"' in reason
    assert not runs_on(["7.5", "8.0", "9.0+PTX"], (7, 0))[0]  # a V100 with a CUDA 13 build
    assert not runs_on(["9.0a"], (10, 0))[0] and runs_on(["9.0a"], (9, 0))[0]
