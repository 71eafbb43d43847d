"""Everything to check on a GPU, in one go, written as one JSON record under reports/bench/.

    python tools/gpu_check.py [--out reports/bench/gpu_check_<gpu>.json] [--quick]

1. the CUDA tests of the kernel (pytest tests/test_ops_cuda.py, tests/test_ops_cuda_build.py and the host
   emulation and self-check tests), their summary line and exit status;
2. every GPU implementation (impl="auto"'s CUDA chain: the CUDA kernel, Triton) against the reference:
   availability, self-check verdict, worst relative error per dtype and a gradcheck;
3. the kernel benchmark (tests/benchmarks/bench_ms_deform_attn.py) with its ratio to the memory-traffic floor;
4. side by side with ``deformops`` (when installed, through its public entry point ``deformops.registry.msda``,
   with its own backend selection and each of its GPU backends): our implementations and its at the encoder and
   decoder presets of an 800 x 1333 image (model/ops/presets.py), float32 and bfloat16, weights as given and
   logits with the fused softmax; forward and forward+backward times, peak memory, and each one's largest error
   of the output and the three gradients against the float64 reference;
5. whole-model FPS at batch 1 and 4 (one 3 x 800 x 1199 image) and training-iteration time with mixed
   precision on (bf16) and off, for the default Deformable DETR configuration.

Each part is recorded even when it fails (with its error), so that one broken part does not hide the
others. With the device, driver, torch, CUDA and Triton versions. Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.ops import implementation_info, implementations  # noqa: E402
from model.ops.environment import device_name, versions  # noqa: E402

CUDA_TESTS = [
    "tests/test_ops_cuda.py",
    "tests/test_ops_cuda_build.py",
    "tests/test_ops_emulated.py",
    "tests/test_ops_selfcheck.py",
]
NO_GPU = 2


def run_tests() -> dict:
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines = result.stdout.strip().splitlines()
    return {
        "command": f"python -m pytest -q {' '.join(CUDA_TESTS)}",
        "returncode": result.returncode,
        "summary": lines[-1] if lines else "",
        "seconds": round(time.time() - start, 1),
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
    }


def check_implementations(device: torch.device) -> list[dict]:
    from model.ops import doctor

    rows = []
    for name in implementations.chain("cuda"):
        impl = implementations.REGISTRY[name]
        row = {"impl": name, "description": impl.description, **doctor.status(impl, device, torch.float32)}
        if row["available"] and row.get("ok", True):
            row["accuracy"] = {}
            for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                ok, message = doctor.check(name, str(device), dtype)
                row["accuracy"][str(dtype).removeprefix("torch.")] = {"ok": ok, "detail": message}
            row["gradcheck"] = dict(zip(("ok", "detail"), doctor.gradcheck(name, str(device))))
        rows.append(row)
    return rows


def run_benchmark(dtype: str, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [
            sys.executable,
            "tests/benchmarks/bench_ms_deform_attn.py",
            "--device",
            "cuda",
            "--dtype",
            dtype,
            "--json",
            str(out),
        ] + (["--repeat", "3"] if quick else [])
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            return {"error": (result.stdout + result.stderr)[-3000:], "command": " ".join(command)}
        return json.loads(out.read_text())


# What the side by side measures: both presets, in float32 and bfloat16, with the attention weights as given
# ("linear") and as logits normalised inside the op ("softmax", the model's default: DCNv4's and deformops'
# fused softmax).
SIDE_BY_SIDE_DTYPES = ("float32", "bfloat16")
METHODS = ("linear", "softmax")
RESULTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def our_entry_points(device: torch.device) -> dict:
    """name -> fn(value, shapes, starts, loc, weights, softmax) for our implementations that run on ``device``."""
    from model.ops import ms_deform_attn, triton_kernel

    names = ["pytorch"]
    if device.type == "cuda":
        names = ["cuda", "triton", "pytorch"]
    elif triton_kernel.interpreting():
        names.append("triton")

    def entry(name):
        return lambda v, s, st, loc, a, softmax: ms_deform_attn(v, s, st, loc, a, impl=name, softmax=softmax)

    return {f"ours_{name}": entry(name) for name in names}


def deformops_entry_points() -> tuple[str | None, dict]:
    """deformops 3.x through its public functional entry point, ``deformops.registry.msda(value, spatial_shapes,
    level_start_index, sampling_locations, attention_weights, method="linear" | "softmax", backend=...)``: its own
    backend selection (``backend=None``: Triton, then CUDA, on GPUs), and each GPU backend by name
    (``deformops.registry.Backend.TRITON`` / ``.CUDA``). Weights in value's dtype, (N, Lq, M, L, P) or flat."""
    import deformops
    from deformops.registry import Backend, msda

    def entry(backend):
        def call(value, shapes, starts, loc, weights, softmax):
            method = "softmax" if softmax else "linear"
            if backend is None:
                return msda(value, shapes, starts, loc, weights, method=method)
            return msda(value, shapes, starts, loc, weights, method=method, backend=backend)

        return call

    return getattr(deformops, "__version__", None), {
        "deformops": entry(None),
        "deformops_triton": entry(Backend.TRITON),
        "deformops_cuda": entry(Backend.CUDA),
    }


def _reference(value, shapes, starts, loc, weights, softmax):
    from model.ops.reference import ms_deform_attn_pytorch

    if softmax:
        weights = weights.flatten(-2).softmax(-1).view_as(weights)
    return ms_deform_attn_pytorch(value, shapes, starts, loc, weights)


def _timer(device: torch.device):
    def time_ms(fn, repeat: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    return time_ms


def location_dtype(dtype: torch.dtype) -> torch.dtype:
    """Locations in float32 for 16-bit values, as the model makes them under autocast (reference points in float32;
    in bfloat16 a location on a 167-pixel-wide level would be off by up to 0.65 pixel)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def max_errors(fn, preset, dtype: torch.dtype, softmax: bool, device: torch.device) -> dict:
    """Largest error of the output and the three gradients relative to the largest reference value, against the
    reference in float64 on the same (rounded) inputs."""
    from model.ops import presets
    from model.ops.testing import forward_and_grads, max_relative_error

    inputs = presets.make_inputs(preset, device, dtype, softmax=softmax, location_dtype=location_dtype(dtype))
    grad_output = torch.randn(
        preset.batch, preset.Lq, preset.M * preset.D, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    actual = forward_and_grads(lambda *a: fn(*a, softmax), inputs, grad_output)
    expected = forward_and_grads(
        lambda *a: _reference(*a, softmax), [t.double() if t.is_floating_point() else t for t in inputs], grad_output
    )
    return {what: max_relative_error(a, e) for what, a, e in zip(RESULTS, actual, expected)}


def measure(
    fn, preset, dtype: torch.dtype, softmax: bool, device: torch.device, repeat: int, error_preset=None, warmup: int = 2
) -> dict:
    """forward and forward+backward time (median, ms), peak memory of forward+backward (CUDA), max errors."""
    from model.ops import presets

    timer = _timer(device)

    def time_ms(fn_, repeat_):
        return timer(fn_, repeat_, warmup)

    value, shapes, starts, loc, weights = presets.make_inputs(
        preset, device, dtype, softmax=softmax, location_dtype=location_dtype(dtype)
    )
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
    grad_output = torch.randn(preset.batch, preset.Lq, preset.M * preset.D, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            fn(value, shapes, starts, loc, weights, softmax)

    def forward_backward():
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2], softmax)
        out.backward(grad_output)
        for t in leaves:
            t.grad = None

    row = {"forward_ms": time_ms(forward, repeat), "forward_backward_ms": time_ms(forward_backward, repeat)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward_backward()
        torch.cuda.synchronize(device)
        row["forward_backward_peak_MB"] = (torch.cuda.max_memory_allocated(device) - base) / 1e6
    row["max_errors"] = max_errors(fn, error_preset or preset, dtype, softmax, device)
    return row


def side_by_side(
    device: torch.device,
    names=("encoder", "decoder"),
    dtypes=SIDE_BY_SIDE_DTYPES,
    methods=METHODS,
    batch: int = 4,
    repeat: int = 20,
    height: int = 800,
    width: int = 1333,
    entry_points: dict | None = None,
    warmup: int = 2,
) -> dict:
    """Ours and deformops (when installed) at the encoder and decoder presets of a ``height`` x ``width`` image:
    per implementation, preset, dtype and weight method, the times, peak memory and errors against the float64
    reference (measured at batch 1 of the same preset, to bound the reference's memory). Values, weights (or
    logits) in the dtype, locations in float32 for bfloat16 (as under autocast). A row that fails records its
    error."""
    from model.ops import presets

    record: dict = {"presets": {}, "rows": []}
    entry_points = dict(our_entry_points(device) if entry_points is None else entry_points)
    try:
        version, theirs = deformops_entry_points()
        record["deformops"] = {
            "installed": True,
            "version": version,
            "entry_point": "deformops.registry.msda(..., method=..., backend=None | Backend.TRITON | Backend.CUDA)",
        }
        entry_points.update(theirs)
    except ImportError as e:
        record["deformops"] = {"installed": False, "reason": str(e)}
    for name in names:
        preset = presets.preset(name, batch=batch, height=height, width=width)
        record["presets"][name] = preset.as_dict()
        error_preset = presets.preset(name, batch=1, height=height, width=width)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for method in methods:
                for impl, fn in entry_points.items():
                    row = {"impl": impl, "preset": name, "dtype": dtype_name, "method": method}
                    try:
                        row.update(
                            measure(fn, preset, dtype, method == "softmax", device, repeat, error_preset, warmup)
                        )
                    except Exception as e:  # noqa: BLE001 - recorded; the other rows go on
                        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    record["rows"].append(row)
                    print(
                        f"   {impl:>17} {name:>8} {dtype_name:>9} {method:>7}: "
                        + (
                            row["error"]
                            if "error" in row
                            else f"forward {row['forward_ms']:.3f} ms, "
                            f"forward+backward {row['forward_backward_ms']:.3f} ms, "
                            f"max error {max(row['max_errors'].values()):.1e}"
                        ),
                        flush=True,
                    )
    return record


def model_speed(device: torch.device, quick: bool) -> dict:
    from harness.config import RunConfig
    from harness.measure.speed import measure_run_speed
    from harness.run.step import measure_run_train_step

    run_cfg = RunConfig()
    run_cfg = dataclasses.replace(run_cfg, benchmark=dataclasses.replace(run_cfg.benchmark, fps_batch_sizes=(1, 4)))
    iters = 5 if quick else 50
    record = {"fps": measure_run_speed(run_cfg, device=device, fixed_size=(800, 1199), iters=iters)}
    for amp in ("off", "bf16"):
        record[f"train_step_amp_{amp}"] = measure_run_train_step(
            run_cfg, device=device, amp=amp, iters=3 if quick else 10
        )
    return record


def part(results: dict, name: str, fn, *args) -> None:
    print(f"== {name}", flush=True)
    start = time.time()
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - one broken part does not hide the others
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    print(f"   {time.time() - start:.0f} s: {json.dumps(results[name], default=str)[:300]}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="default: reports/bench/gpu_check_<gpu>.json")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run of this command)")
    parser.add_argument("--batch", type=int, default=4, help="batch of the side-by-side presets (default 4)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: no GPU: torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}); nothing was checked. Run this on a machine with an "
            "NVIDIA GPU.",
            file=sys.stderr,
        )
        return NO_GPU
    device = torch.device("cuda", torch.cuda.current_device())
    name = device_name(device)
    results = {
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        **versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "auto": {
            str(dt).removeprefix("torch."): implementation_info(device, dt)
            for dt in (torch.float32, torch.float16, torch.bfloat16)
        },
    }
    part(results, "tests", run_tests)
    part(results, "implementations", check_implementations, device)
    for dtype in ("float32", "bfloat16"):
        part(results, f"benchmark_{dtype}", run_benchmark, dtype, args.quick)
    part(
        results,
        "side_by_side",
        side_by_side,
        device,
        ("encoder", "decoder"),
        SIDE_BY_SIDE_DTYPES,
        METHODS,
        args.batch,
        5 if args.quick else 20,
    )
    part(results, "model_speed", model_speed, device, args.quick)
    out = args.out or REPO / "reports" / "bench" / f"gpu_check_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    impls = results["implementations"] if isinstance(results["implementations"], list) else []
    cuda_ok = any(r["impl"] == "cuda" and r["available"] and r.get("ok", True) for r in impls)
    failed = results["tests"].get("returncode") != 0 or not cuda_ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
