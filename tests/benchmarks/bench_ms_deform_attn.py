"""Benchmark of multi-scale deformable attention: every available implementation at the sizes of the
Deformable DETR encoder and decoder for an 800 x 1199 image.

    python tests/benchmarks/bench_ms_deform_attn.py [--device cpu cuda] [--batch 1 4] [--json PATH]
    python tests/benchmarks/bench_ms_deform_attn.py --fused-softmax [--device cpu] [--json PATH]

Levels 100x150, 50x75, 25x38, 13x19 (S = 19,947); M = 8 heads, D = 32 channels per head, L = 4 levels,
P = 4 points; encoder Lq = S = 19,947 queries, decoder Lq = 300. Prints the median forward and
forward+backward times; on a GPU also the bytes each must move at the least and the ratio of the measured
time to that floor at the measured device bandwidth (1.0 = as fast as memory allows).

``--fused-softmax``: what the fused softmax saves, at the encoder preset of an 800 x 1333 image
(model/ops/presets.py, batch 1 by default): the attention module (MSDeformAttn, d_model 256) with the softmax
inside the op (the default) and before it (fused_softmax=False), and the op alone on logits (softmax=True)
against torch.softmax then the op; forward+backward time (median, runs interleaved), the memory allocated at the
peak of forward+backward above what was allocated before (torch.profiler's allocator events, CPU), and the bytes
of the tensors saved for the backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.provenance import device_name  # noqa: E402
from model.ops import kernel_available, ms_deform_attn  # noqa: E402
from model.ops.triton_kernel import available as triton_available  # noqa: E402

SPATIAL_SHAPES = [(100, 150), (50, 75), (25, 38), (13, 19)]
M, D, P = 8, 32, 4
STAGES = {"encoder": sum(h * w for h, w in SPATIAL_SHAPES), "decoder": 300}


def make_inputs(N, Lq, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SPATIAL_SHAPES, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S, L = int((shapes[:, 0] * shapes[:, 1]).sum()), len(SPATIAL_SHAPES)
    value = torch.randn(N, S, M, D, generator=g)
    # As in the model: encoder queries sample around their own pixel (the centres of every level's pixels),
    # decoder queries around reference points spread over the image; offsets of a few pixels.
    if Lq == S:
        reference = (
            torch.cat(
                [
                    torch.stack(
                        torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1
                    ).reshape(-1, 2)
                    for h, w in SPATIAL_SHAPES
                ]
            )
            .view(1, Lq, 1, 1, 1, 2)
            .expand(N, -1, -1, -1, -1, -1)
        )
    else:
        reference = torch.rand(N, Lq, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(N, Lq, M, L, P, 2, generator=g) * 4 / shapes.flip(-1)[None, None, None, :, None, :]
    loc = reference + offsets
    attn = torch.randn(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P)
    return (
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        loc.to(device, dtype),
        attn.to(device, dtype),
    )


def min_bytes(N, Lq, dtype, backward):
    """Bytes that must cross the memory bus at the least: every input read and every output written once."""
    e = torch.empty((), dtype=dtype).element_size()
    S, L = STAGES["encoder"], len(SPATIAL_SHAPES)
    value, loc, attn, out = N * S * M * D * e, N * Lq * M * L * P * 2 * e, N * Lq * M * L * P * e, N * Lq * M * D * e
    forward = value + loc + attn + out
    if not backward:
        return forward
    # backward reads grad_output, value, loc, attn and writes the three gradients
    return forward + (out + value + loc + attn) + (value + loc + attn)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeat, warmup=1):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def device_bandwidth(device):
    """Measured copy bandwidth in bytes/s (read + write) of a 1 GiB buffer."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = Timer(device)(lambda: dst.copy_(src), repeat=10, warmup=3)
    return 2 * src.numel() * src.element_size() / seconds


def run(device, impls, batches, stages, dtype, repeat):
    timer = Timer(device)
    bandwidth = device_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for stage in stages:
        Lq = STAGES[stage]
        for N in batches:
            inputs = make_inputs(N, Lq, device, dtype)
            value, shapes, starts, loc, attn = inputs
            for impl in impls:
                leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]

                def forward():
                    with torch.no_grad():
                        ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)

                def forward_backward():
                    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
                    out.backward(torch.ones_like(out))
                    for t in leaves:
                        t.grad = None

                row = {
                    "impl": impl,
                    "stage": stage,
                    "batch": N,
                    "Lq": Lq,
                    "forward_ms": 1000 * timer(forward, repeat),
                    "forward_backward_ms": 1000 * timer(forward_backward, repeat),
                }
                if bandwidth is not None:
                    for key, backward in (("forward", False), ("forward_backward", True)):
                        nbytes = min_bytes(N, Lq, dtype, backward)
                        row[f"{key}_min_bytes"] = nbytes
                        row[f"{key}_floor_ratio"] = row[f"{key}_ms"] / 1000 / (nbytes / bandwidth)
                rows.append(row)
                print(format_row(row), flush=True)
            inputs = value = loc = attn = leaves = None  # this batch's tensors freed before the next's
    return {
        "device": device_name(device),
        "device_type": device.type,
        "bandwidth_GBps": None if bandwidth is None else bandwidth / 1e9,
        "rows": rows,
    }


def format_row(row):
    text = (
        f"{row['impl']:>8} {row['stage']:>8} batch {row['batch']}  forward {row['forward_ms']:9.2f} ms"
        f"  forward+backward {row['forward_backward_ms']:9.2f} ms"
    )
    if "forward_floor_ratio" in row:
        text += f"  (x floor: {row['forward_floor_ratio']:.2f}, {row['forward_backward_floor_ratio']:.2f})"
    return text


def speedups(rows):
    """forward+backward time of the reference over each compiled kernel's, per (stage, batch)."""
    reference = {(r["stage"], r["batch"]): r["forward_backward_ms"] for r in rows if r["impl"] == "pytorch"}
    return [
        {
            "impl": r["impl"],
            "stage": r["stage"],
            "batch": r["batch"],
            "forward_backward_speedup": reference[(r["stage"], r["batch"])] / r["forward_backward_ms"],
        }
        for r in rows
        if r["impl"] != "pytorch" and (r["stage"], r["batch"]) in reference
    ]


def _peak_allocated(fn) -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated when it started (CPU: the profiler's
    allocator events; CUDA: max_memory_allocated)."""
    import json as json_
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json_.loads(path.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
    ]
    return max(totals, default=0)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward during ``fn()``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def fused_softmax(device, impl, batch, repeat, height=800, width=1333):
    """The attention module and the op, softmax fused and not, at the encoder preset (see the module docstring)."""
    from model.ms_deform_attn import MSDeformAttn
    from model.ops import ms_deform_attn as op
    from model.ops import presets

    p = presets.preset("encoder", batch=batch, height=height, width=width)
    value, shapes, starts, loc, logits = presets.make_inputs(p, device, torch.float32, softmax=True)
    torch.manual_seed(0)
    d_model = p.M * p.D
    src = torch.randn(p.batch, p.S, d_model, device=device)
    reference_points = torch.rand(p.batch, p.S, p.L, 2, device=device)
    modules = {}
    for fused in (True, False):
        torch.manual_seed(0)
        modules[fused] = MSDeformAttn(d_model, p.L, p.M, p.P, impl=impl, fused_softmax=fused).to(device)
        with torch.no_grad():  # trained-like attention: non-zero logits and offsets
            modules[fused].attention_weights.weight.normal_(0, 0.05)
            modules[fused].sampling_offsets.weight.normal_(0, 0.01)
    modules[False].load_state_dict(modules[True].state_dict())

    def module_step(fused):
        def step():
            x = src.detach().requires_grad_(True)
            out = modules[fused](x, reference_points, x, shapes, starts)
            out.backward(torch.ones_like(out))
            modules[fused].zero_grad(set_to_none=True)

        return step

    def op_step(fused):
        def step():
            leaves = [t.detach().requires_grad_(True) for t in (value, loc, logits)]
            if fused:
                out = op(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl, softmax=True)
            else:
                weights = torch.softmax(leaves[2].flatten(-2), -1).view_as(leaves[2])
                out = op(leaves[0], shapes, starts, leaves[1], weights, impl=impl)
            out.backward(torch.ones_like(out))

        return step

    def forward_only(fused, what):
        def run():
            if what == "module":
                return modules[fused](src, reference_points, src, shapes, starts)
            if fused:
                return op(value, shapes, starts, loc, logits.requires_grad_(True), impl=impl, softmax=True)
            weights = torch.softmax(logits.requires_grad_(True).flatten(-2), -1).view_as(logits)
            return op(value, shapes, starts, loc, weights, impl=impl)

        return run

    timer = Timer(device)
    rows = []
    for what, make in (("module", module_step), ("op", op_step)):
        for fused in (True, False):
            make(fused)()  # warm up
        times = {True: [], False: []}
        for _ in range(repeat):  # interleaved: a load change on a shared machine hits both alike
            for fused in (True, False):
                times[fused].append(timer(make(fused), repeat=1, warmup=0))
        for fused in (True, False):
            saved = _saved_bytes(lambda: forward_only(fused, what)())
            logits.grad = None
            row = {
                "what": what,
                "softmax": "fused (in the op)" if fused else "torch.softmax, then the op",
                "forward_backward_ms": 1000 * statistics.median(times[fused]),
                "forward_backward_ms_min": 1000 * min(times[fused]),
                "forward_backward_ms_all": [round(1000 * t, 1) for t in times[fused]],
                "peak_allocated_MB": _peak_allocated(make(fused)) / 1e6 if device.type == "cpu" else None,
                "saved_for_backward_MB": saved / 1e6,
            }
            rows.append(row)
            print(
                f"{what:>6} {row['softmax']:>28}: forward+backward {row['forward_backward_ms']:8.1f} ms (min "
                f"{row['forward_backward_ms_min']:.1f}), peak "
                f"{row['peak_allocated_MB']:.1f} MB, saved for backward {row['saved_for_backward_MB']:.1f} MB",
                flush=True,
            )
    savings = []
    for what in ("module", "op"):
        fused, unfused = [r for r in rows if r["what"] == what]
        savings.append(
            {
                "what": what,
                "time_saved_ms": unfused["forward_backward_ms"] - fused["forward_backward_ms"],
                "time_saved_percent": 100 * (1 - fused["forward_backward_ms"] / unfused["forward_backward_ms"]),
                "time_saved_ms_of_the_minima": unfused["forward_backward_ms_min"] - fused["forward_backward_ms_min"],
                "peak_saved_MB": unfused["peak_allocated_MB"] - fused["peak_allocated_MB"],
                "saved_for_backward_saved_MB": unfused["saved_for_backward_MB"] - fused["saved_for_backward_MB"],
            }
        )
    return {"preset": p.as_dict(), "impl": impl, "rows": rows, "savings": savings, "weights_MB": p.points * 4 / 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", nargs="+", choices=["cpu", "cuda"], default=["cuda"] if torch.cuda.is_available() else ["cpu"]
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=["pytorch", "cpu", "cuda", "triton"],
        help="implementations (default: the reference and the device's kernels)",
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--stage", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (default: 3 on CPU, 20 on GPU)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--fused-softmax",
        action="store_true",
        help="what the fused softmax saves: the attention module and the op at the encoder preset",
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.fused_softmax:
        device = torch.device(args.device[0])
        impl = (args.impl or [device.type])[0]
        results = {
            "load_average_at_start": os.getloadavg()[0],
            "torch": torch.__version__,
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            **fused_softmax(device, impl, args.batch[0], args.repeat or 7),
        }
        results["load_average_at_end"] = os.getloadavg()[0]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.json}")
        return
    results = {
        "load_average_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "sizes": {"spatial_shapes": SPATIAL_SHAPES, "M": M, "D": D, "P": P, "Lq": STAGES},
        "devices": [],
    }
    for device_type in args.device:
        device = torch.device(device_type)
        if device_type == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU, skipped")
            continue
        kernels = (device_type, "triton") if device_type == "cuda" else (device_type,)
        impls = [i for i in (args.impl or ["pytorch", *kernels]) if i in ("pytorch", *kernels)]
        impls = [
            i
            for i in impls
            if i == "pytorch" or (triton_available(device)[0] if i == "triton" else kernel_available(i))
        ]
        repeat = args.repeat or (20 if device_type == "cuda" else 3)
        print(f"{device_name(device)}, torch {torch.__version__}, {args.dtype}")
        result = run(device, impls, args.batch, args.stage, dtype, repeat)
        result["speedups"] = speedups(result["rows"])
        for s in result["speedups"]:
            print(
                f"{s['impl']} vs pytorch, {s['stage']} batch {s['batch']}: "
                f"forward+backward {s['forward_backward_speedup']:.1f}x faster"
            )
        results["devices"].append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
