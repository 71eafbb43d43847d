"""tools/gpu_check.py without a GPU: it says so and exits non-zero, writing nothing; its presets and its side by
side with deformops (through a stand-in of deformops' entry point) run on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run the checks")
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--out", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "gpu_check: no GPU" in result.stderr and "nothing was checked" in result.stderr
    assert not out.exists()


def test_presets_of_an_800x1333_image():
    from model.ops import presets

    encoder, decoder = presets.preset("encoder"), presets.preset("decoder")
    assert list(encoder.levels) == [(100, 167), (50, 84), (25, 42), (13, 21)] and encoder.S == 22_223
    assert (encoder.Lq, decoder.Lq) == (22_223, 300) and (encoder.groups, decoder.groups) == (711_136, 9_600)
    assert (encoder.M, encoder.D, encoder.L, encoder.P) == (8, 32, 4, 4)
    assert encoder.bytes(4)["value"] == 4 * 22_223 * 8 * 32 * 4  # 91.0 MB
    with pytest.raises(ValueError):
        presets.preset("neck")


def fake_deformops(calls):
    """deformops 3.x's public entry point, deformops.registry.msda(..., method=, backend=), on our reference."""
    import enum
    import types

    from model.ops.reference import ms_deform_attn_pytorch

    class Backend(enum.StrEnum if hasattr(enum, "StrEnum") else str, enum.Enum):
        CUDA = "cuda"
        TRITON = "triton"
        EAGER = "eager"

    def msda(value, shapes, starts, loc, weights, /, *, method=None, softmax=False, chunk_step=128, backend=None):
        calls.append((method, backend))
        assert weights.dtype == value.dtype
        return ms_deform_attn_pytorch(value, shapes, starts, loc, weights, softmax=method == "softmax")

    package, registry = types.ModuleType("deformops"), types.ModuleType("deformops.registry")
    package.__version__, package.registry = "3.0.1", registry
    registry.Backend, registry.msda = Backend, msda
    return {"deformops": package, "deformops.registry": registry}


def test_side_by_side_on_the_cpu(monkeypatch):
    """tools/gpu_check.py's side by side, run on the CPU at a small image (its code, not its numbers): every
    implementation, ours and deformops' entry points, at both presets, float32 and bfloat16, weights and fused
    softmax; times, and errors against the float64 reference."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "tools"))
    calls = []
    for name, module in fake_deformops(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    record = gpu_check.side_by_side(torch.device("cpu"), batch=1, repeat=1, height=32, width=48, warmup=0)
    assert record["deformops"]["installed"] and record["deformops"]["version"] == "3.0.1"
    assert record["presets"]["encoder"]["levels"] == [[4, 6], [2, 3], [1, 2], [1, 1]]
    assert record["presets"]["decoder"]["Lq"] == 300
    impls = {"ours_pytorch", "deformops", "deformops_triton", "deformops_cuda"}
    assert {r["impl"] for r in record["rows"]} >= impls
    assert len(record["rows"]) == len({r["impl"] for r in record["rows"]}) * 2 * 2 * 2
    for row in record["rows"]:
        assert "error" not in row, row
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        assert set(row["max_errors"]) == {"output", "grad_value", "grad_sampling_locations", "grad_attention_weights"}
        assert max(row["max_errors"].values()) <= (1e-5 if row["dtype"] == "float32" else 2e-2), row
    assert {c for c in calls} >= {("softmax", None), ("linear", None), ("softmax", "triton"), ("linear", "cuda")}
