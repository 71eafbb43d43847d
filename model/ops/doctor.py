"""Which implementations of multi-scale deformable attention work here, and are they right?

    python -m model.ops.doctor [--no-build] [--recheck]

For every device present (the CPU, each kind of GPU) and every implementation of it: whether it is available
(built, loaded, code for the GPU's architecture, installed) and why not, its self-check verdict (the cached
one unless --recheck), and what impl="auto" picks per dtype. Then each available implementation is compared
with the pure-PyTorch reference in float64 on small odd shapes (forward and the three gradients, relative
error <= 1e-8, plus torch.autograd.gradcheck), and on a GPU in float32 / float16 / bfloat16 within their
precision. Exit status 1 when a compiled kernel of a present device is unavailable or a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import build, implementation_info, implementations, ms_deform_attn, ms_deform_attn_pytorch, selfcheck
from .environment import device_name, versions
from .selfcheck import TOLERANCES
from .testing import CASES, forward_and_grads, make_inputs, max_relative_error

RESULTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def check(impl: str, device: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Worst relative error over the test cases (one with the fused softmax), forward and gradients, against the
    float64 reference."""
    worst, where = 0.0, ""
    for (name, spatial_shapes, M, D, P), softmax in [(case, False) for case in CASES] + [(CASES[-1], True)]:
        inputs = make_inputs(spatial_shapes, M=M, D=D, P=P, device=device, dtype=dtype, logits=softmax)
        expected = forward_and_grads(
            lambda *a: ms_deform_attn_pytorch(*a, softmax=softmax),
            [t.double() if t.is_floating_point() else t for t in inputs],
        )
        actual = forward_and_grads(lambda *a: ms_deform_attn(*a, impl=impl, softmax=softmax), inputs)
        for what, a, e in zip(RESULTS, actual, expected):
            error = max_relative_error(a, e)
            if not error <= worst:
                worst, where = error, f"{what}, {name}{' with the fused softmax' if softmax else ''}"
    ok = worst <= TOLERANCES[dtype]
    return ok, f"max rel. error {worst:.1e} ({where})"


def gradcheck(impl: str, device: str) -> tuple[bool, str]:
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], M=2, D=8, P=2, N=1, Lq=3, device=device)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    try:
        ok = torch.autograd.gradcheck(
            lambda v, loc, a: ms_deform_attn(v, shapes, starts, loc, a, impl=impl),
            leaves,
            eps=1e-6,
            atol=1e-6,
            raise_exception=False,
        )
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return False, f"gradcheck raised {type(e).__name__}: {e}"
    return ok, "gradcheck ok" if ok else "gradcheck FAILED"


def status(impl: implementations.Implementation, device: torch.device, dtype: torch.dtype) -> dict:
    """available, self_check, reason of one implementation on one device."""
    from . import _prepare

    try:
        _prepare(impl, device)
    except Exception as e:  # noqa: BLE001 - reported
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"available": False, "self_check": "-", "reason": reason}
    if not impl.needs_self_check:
        return {"available": True, "self_check": "not needed", "reason": ""}
    verdict = selfcheck.self_check(impl, device, dtype)
    reason = "" if verdict["ok"] else f"case {verdict.get('case')}: {verdict.get('error')}"
    return {"available": True, "self_check": verdict.get("status", ""), "reason": reason, "ok": verdict["ok"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.ops.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="only load kernels built before, compile nothing")
    parser.add_argument("--recheck", action="store_true", help="run the self-checks again (delete cached verdicts)")
    args = parser.parse_args(argv)
    if args.no_build:
        os.environ["DEFORMABLE_DETR_OPS_NO_BUILD"] = "1"

    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    v = versions()
    print(
        f"torch {v['torch']} (CUDA {v['cuda']}), Triton {v['triton']}, driver {v['driver']}, "
        f"Python {sys.version.split()[0]}, {torch.get_num_threads()} CPU threads"
    )
    print(f"GPUs: {', '.join(f'{d}: {device_name(d)}' for d in gpus) if gpus else 'none'}")
    print(f"CUDA toolkit: {build._find_cuda_home() or 'not found (needed only to build the CUDA kernel)'}")
    print(f"kernel cache: {build.cache_dir()}  (DEFORMABLE_DETR_OPS_CACHE)")

    devices = [torch.device("cpu")]
    names = {torch.device("cpu"): device_name("cpu")}
    for d in gpus:  # one of each kind of GPU
        if device_name(d) not in names.values():
            devices.append(d)
            names[d] = device_name(d)
    failed = False
    for device in devices:
        print(f"\n[{device.type}] {names[device]}")
        print(f"  {'impl':<8} {'available':<10} {'self-check':<40} reason")
        usable = []
        for impl in implementations.REGISTRY.values():
            if device.type not in impl.device_types:
                continue
            if args.recheck and impl.needs_self_check:
                for dtype in TOLERANCES:
                    path = selfcheck.verdict_path(impl, device, dtype)
                    path.unlink(missing_ok=True)
            s = status(impl, device, torch.float32)
            print(f"  {impl.name:<8} {'yes' if s['available'] else 'NO':<10} {s['self_check']:<40} {s['reason']}")
            if s["available"] and s.get("ok", True):
                usable.append(impl.name)
            elif impl.name == device.type:
                failed = True  # the compiled kernel of a present device
        picks = ", ".join(
            f"{str(dt).removeprefix('torch.')} -> {implementation_info(device, dt)['impl']}"
            for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        )
        print(f"  impl='auto' uses: {picks}")
        dtypes = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
        for name in usable:
            impl = implementations.REGISTRY[name]
            results = [
                check(name, str(device), dtype) + (str(dtype).removeprefix("torch."),)
                for dtype in (dtypes if name != "pytorch" else [torch.float32])
                if impl.supports(device, dtype)
            ]
            if name != "pytorch":
                results.append(gradcheck(name, str(device)) + ("float64",))
            for ok, message, dtype in results:
                print(f"  impl={name:<8} {dtype:<9} {'ok  ' if ok else 'FAIL'} {message}")
                failed |= not ok
    print()
    print("FAILED" if failed else "all implementations available here pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
