"""Full-scale complexity of every model row of an experiment, without training: parameters and fvcore GFLOPs
into each run's benchmark.json (the report shows them beside the paper's).

    python -m harness.measure experiments/table1.yaml [--rows LABEL ...]
        [--images N | --fixed-size 800x1199] [--out results] [--root COCO_ROOT]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence, Tuple

import torch

from harness.grid import ExperimentError, expand, load_experiment
from harness.measure.complexity import measure_complexity
from harness.provenance import git_commit, utc_now
from harness.store import ResultsStore


def benchmark_record(spec, measured: dict, seconds: float) -> dict:
    """The benchmark.json fields of one row from :func:`measure_complexity`'s result."""
    cfg = spec.config
    notes = []
    if measured["gflops_input"].startswith("3x"):
        notes.append(f"FLOPs of one {measured['gflops_input']} image (the official reference count), not the "
                     f"paper's mean over the first 100 COCO val images: COCO was not available where this was "
                     f"measured")
    if cfg.eval.tta:
        notes.append("one forward pass counted; test-time augmentation runs the model once per flip and scale")
    if measured["unsupported_ops"]:
        notes.append("operators fvcore has no handle for are not counted: " +
                     ", ".join(f"{k} x{v}" for k, v in measured["unsupported_ops"].items()))
    return {
        "label": spec.label,
        "scale": spec.scale,
        "params": measured["params"],
        "gflops": round(measured["gflops"], 4),
        "gflops_std": round(measured["gflops_std"], 4),
        "gflops_images": measured["gflops_images"],
        "gflops_input": measured["gflops_input"],
        "gflops_by_operator": {k: round(v, 4) for k, v in measured["by_operator"].items()},
        "unsupported_ops": measured["unsupported_ops"],
        "trivial_unsupported_ops": measured["trivial_unsupported_ops"],
        "flop_counter": f"fvcore FlopCountAnalysis, eval mode, no grad; default handles + "
                        f"{', '.join(measured['handles'])}",
        "device": measured["device"],
        "torch": torch.__version__,
        "date": utc_now(),
        "commit": git_commit(),
        "seconds": round(seconds, 1),
        "notes": "; ".join(notes),
    }


def _parse_size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 800x1199, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"image too small: {text}")
    return h, w


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.measure",
        description="Parameters and fvcore GFLOPs of every model row of an experiment, at full scale, written to "
                    "results/runs/<run_id>/benchmark.json.")
    parser.add_argument("experiment", help="experiment YAML, e.g. experiments/table1.yaml")
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="only these row labels")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--images", type=int, metavar="N",
                     help="mean over the first N evaluation images (default: the config's benchmark.flops_images)")
    how.add_argument("--fixed-size", type=_parse_size, metavar="HxW",
                     help="one 3xHxW image instead of evaluation images (e.g. 800x1199; needs no dataset)")
    parser.add_argument("--out", default="results", help="results root (default: results)")
    parser.add_argument("--root", help="dataset root (overrides data.root)")
    parser.add_argument("--smoke", action="store_true", help="the smoke-scale configs instead of full scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="print the rows and run ids, measure nothing")
    args = parser.parse_args(argv)

    try:
        experiment = load_experiment(args.experiment, smoke=args.smoke, rows=args.rows, check_data=False)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    specs, measured = [], set()
    for spec in expand(experiment):          # one measurement per run, however many rows evaluate it
        if spec.run_id not in measured:
            measured.add(spec.run_id)
            specs.append(spec)
    def has_dataset(cfg) -> bool:
        root = args.root or cfg.data.root
        return cfg.data.dataset == "synthetic" or bool(root and os.path.isdir(root))

    if not args.fixed_size and not all(has_dataset(spec.config) for spec in specs):
        print("error: no dataset for the evaluation images (set --root or data.root); "
              "--fixed-size 800x1199 needs none", file=sys.stderr)
        return 2
    store = ResultsStore(args.out)
    for spec in specs:
        print(f"{spec.label} [{spec.run_id}]", flush=True)
        if args.dry_run:
            continue
        start = time.time()
        measured = measure_complexity(spec.config, images=args.images if not args.fixed_size else None,
                                      fixed_size=args.fixed_size, root=args.root, device=args.device)
        record = benchmark_record(spec, measured, time.time() - start)
        previous = store.read_benchmark(spec.run_id) or {}
        store.write_benchmark(spec.run_id, {**previous, **record})
        uncounted = ", ".join(measured["unsupported_ops"]) or "none"
        print(f"  params {record['params']:,}  GFLOPs {record['gflops']:.1f} (+-{record['gflops_std']:.1f}, "
              f"{record['gflops_input']})  uncounted: {uncounted}  [{record['seconds']:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
