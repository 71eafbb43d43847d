"""Which implementations of multi-scale deformable attention work here, and are they right?

    python -m model.ops.doctor [--no-build]

Loads (building if needed, unless --no-build) the kernel of every device present, then checks each
implementation against the pure-PyTorch reference in float64 on small odd shapes (forward and the three
gradients, relative error <= 1e-8, plus torch.autograd.gradcheck), and on a GPU float32 / float16 /
bfloat16 within their precision. Exit status 1 when a kernel of a present device is unavailable or a check
fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import build, ms_deform_attn, ms_deform_attn_pytorch
from .testing import CASES, forward_and_grads, make_inputs, max_relative_error

# dtype -> largest relative error accepted against the float64 reference
TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def check(impl: str, device: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Worst relative error over the test cases, forward and gradients, against the float64 reference."""
    worst, where = 0.0, ""
    for name, spatial_shapes, M, D, P in CASES:
        inputs = make_inputs(spatial_shapes, M=M, D=D, P=P, device=device, dtype=dtype)
        expected = forward_and_grads(ms_deform_attn_pytorch, [t.double() if t.is_floating_point() else t
                                                              for t in inputs])
        actual = forward_and_grads(lambda *a: ms_deform_attn(*a, impl=impl), inputs)
        for what, a, e in zip(GRAD_NAMES, actual, expected):
            error = max_relative_error(a, e)
            if error > worst:
                worst, where = error, f"{what}, {name}"
    ok = worst <= TOLERANCES[dtype]
    return ok, f"max rel. error {worst:.1e} ({where})"


def gradcheck(impl: str, device: str) -> tuple[bool, str]:
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 3)], M=2, D=8, P=2, N=1, Lq=3, device=device)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    try:
        ok = torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a, impl=impl),
                                      leaves, eps=1e-6, atol=1e-6, raise_exception=False)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return False, f"gradcheck raised {type(e).__name__}: {e}"
    return ok, "gradcheck ok" if ok else "gradcheck FAILED"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.ops.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="only load kernels built before, compile nothing")
    args = parser.parse_args(argv)
    if args.no_build:
        os.environ["DEFORMABLE_DETR_OPS_NO_BUILD"] = "1"

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    cuda_home = build._find_cuda_home()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"GPUs: {', '.join(gpus) if gpus else 'none'}")
    print(f"CUDA toolkit: {cuda_home or 'not found (needed only to build the CUDA kernel)'}")
    print(f"kernel cache: {build.cache_dir()}  (DEFORMABLE_DETR_OPS_CACHE)")
    print()

    devices = ["cpu"] + (["cuda"] if gpus else [])
    failed = False
    for device in devices:
        start = time.time()
        try:
            path = build.load(device)
            print(f"[{device}] kernel loaded ({time.time() - start:.1f} s): {path}")
            impls = ["pytorch", device]
        except build.BuildError as e:
            print(f"[{device}] kernel UNAVAILABLE (impl='auto' falls back to the reference): "
                  f"{str(e).strip().splitlines()[0]}")
            failed = True
            impls = ["pytorch"]
        dtypes = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
        for impl in impls:
            results = [check(impl, device, dtype) + (str(dtype).removeprefix("torch."),)
                       for dtype in (dtypes if impl != "pytorch" else [torch.float32])]
            if impl != "pytorch":
                results.append(gradcheck(impl, device) + ("float64",))
            for ok, message, dtype in results:
                print(f"  impl={impl:<8} {dtype:<9} {'ok  ' if ok else 'FAIL'} {message}")
                failed |= not ok
    print()
    print("FAILED" if failed else "all implementations available here pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
