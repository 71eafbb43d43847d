"""Everything to check on a GPU, in one go, written as one JSON record under reports/bench/.

    python tools/gpu_check.py [--out reports/bench/gpu_check_<gpu>.json] [--quick]

1. the CUDA tests of the kernel (pytest tests/test_ops_cuda.py, tests/test_ops_cuda_build.py and the host
   emulation and self-check tests), their summary line and exit status;
2. every GPU implementation (impl="auto"'s CUDA chain: the CUDA kernel, Triton) against the reference:
   availability, self-check verdict, worst relative error per dtype and a gradcheck;
3. the kernel benchmark (tests/benchmarks/bench_ms_deform_attn.py) with its ratio to the memory-traffic floor;
4. the ``deformops`` package side by side, when it is installed;
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

CUDA_TESTS = ["tests/test_ops_cuda.py", "tests/test_ops_cuda_build.py", "tests/test_ops_emulated.py",
              "tests/test_ops_selfcheck.py"]
NO_GPU = 2


def run_tests() -> dict:
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                            cwd=REPO, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    return {"command": f"python -m pytest -q {' '.join(CUDA_TESTS)}", "returncode": result.returncode,
            "summary": lines[-1] if lines else "", "seconds": round(time.time() - start, 1),
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))]}


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
        command = [sys.executable, "tests/benchmarks/bench_ms_deform_attn.py", "--device", "cuda", "--dtype", dtype,
                   "--json", str(out)] + (["--repeat", "3"] if quick else [])
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            return {"error": (result.stdout + result.stderr)[-3000:], "command": " ".join(command)}
        return json.loads(out.read_text())


def deformops_side_by_side(device: torch.device) -> dict:
    try:
        import deformops
    except ImportError as e:
        return {"installed": False, "reason": str(e)}
    record = {"installed": True, "version": getattr(deformops, "__version__", None)}
    # Its entry point is looked up by name; an unrecognised API is recorded, not guessed at.
    names = [n for n in dir(deformops) if re.search(r"ms_?deform|multi_?scale", n, re.IGNORECASE)]
    record["candidates"] = names
    if not names:
        record["reason"] = "no multi-scale deformable attention function found by name"
        return record
    from model.ops.testing import forward_and_grads, make_inputs, max_relative_error
    from model.ops.reference import ms_deform_attn_pytorch

    fn = getattr(deformops, names[0])
    inputs = make_inputs([(9, 11), (5, 6), (3, 2), (1, 4)], M=8, D=32, P=4, N=2, Lq=50, device=device,
                         dtype=torch.float32)
    try:
        actual = forward_and_grads(fn, inputs)
        expected = forward_and_grads(ms_deform_attn_pytorch, [t.double() if t.is_floating_point() else t
                                                              for t in inputs])
        record["function"] = names[0]
        record["max_relative_errors"] = [max_relative_error(a, e) for a, e in zip(actual, expected)]
    except Exception as e:  # noqa: BLE001 - recorded
        record["error"] = f"{names[0]}: {type(e).__name__}: {e}"
    return record


def model_speed(device: torch.device, quick: bool) -> dict:
    from harness.config import RunConfig
    from harness.measure.speed import measure_run_speed, measure_run_train_step

    run_cfg = RunConfig()
    run_cfg = dataclasses.replace(run_cfg, benchmark=dataclasses.replace(run_cfg.benchmark, fps_batch_sizes=(1, 4)))
    iters = 5 if quick else 50
    record = {"fps": measure_run_speed(run_cfg, device=device, fixed_size=(800, 1199), iters=iters)}
    for amp in ("off", "bf16"):
        record[f"train_step_amp_{amp}"] = measure_run_train_step(run_cfg, device=device, amp=amp,
                                                                 iters=3 if quick else 10)
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
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no GPU: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}); nothing was checked. Run this on a machine with an "
              "NVIDIA GPU.", file=sys.stderr)
        return NO_GPU
    device = torch.device("cuda", torch.cuda.current_device())
    name = device_name(device)
    results = {"device": name, "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
               **versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "auto": {str(dt).removeprefix("torch."): implementation_info(device, dt)
                        for dt in (torch.float32, torch.float16, torch.bfloat16)}}
    part(results, "tests", run_tests)
    part(results, "implementations", check_implementations, device)
    for dtype in ("float32", "bfloat16"):
        part(results, f"benchmark_{dtype}", run_benchmark, dtype, args.quick)
    part(results, "deformops", deformops_side_by_side, device)
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
