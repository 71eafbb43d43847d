"""Complexity of every model row of an experiment without training it: parameters and fvcore GFLOPs into
each row's measurement record (``runs/<run_id>/measurements/<measure_id>/``, status done), which the report
reads like any other measurement.

    python -m harness.measure experiments/table1.yaml [--rows LABEL ...]
        [--images N | --fixed-size 800x1199] [--out results] [--root COCO_ROOT] [--force]

A record made here belongs to no trained checkpoint (``trained: false``, ``checkpoint_sha256: null``):
parameters and FLOPs do not depend on the weights. A record a trained run's job measured is left alone
(``--force`` replaces it); one made here before is replaced, keeping the fields this command does not
measure (FPS).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Optional, Sequence, Tuple

import torch

from harness.grid import ExperimentError, expand, load_experiment
from harness.measure.complexity import measure_complexity
from harness.measure.record import measurement_record
from harness.provenance import git_commit, utc_now
from harness.store import CorruptFileError, ResultsStore


def complexity_fields(spec, measured: dict, seconds: float) -> dict:
    """The measured fields of one row from :func:`measure_complexity`'s result, with notes on what they count."""
    cfg = spec.config
    notes = []
    if measured["gflops_input"].startswith("3x"):
        notes.append(
            f"FLOPs of one {measured['gflops_input']} image (the official reference count), not the "
            f"paper's mean over the first 100 COCO val images: COCO was not available where this was "
            f"measured"
        )
    if cfg.eval.tta:
        notes.append("one forward pass counted; test-time augmentation runs the model once per flip and scale")
    if measured["unsupported_ops"]:
        notes.append(
            "operators fvcore has no handle for are not counted: "
            + ", ".join(f"{k} x{v}" for k, v in measured["unsupported_ops"].items())
        )
    return {
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


def _previous(store: ResultsStore, key: str) -> Tuple[Optional[dict], bool]:
    """(the record's numbers, whether a trained run's job made it) of a done measurement record."""
    try:
        status, metrics = store.read_status(key), store.read_metrics(key)
    except CorruptFileError:
        return None, False
    if status is None or status.state != "done" or metrics is None:
        return None, False
    return metrics, bool(metrics.get("trained") or metrics.get("checkpoint_sha256"))


def measure_row(store: ResultsStore, spec, args) -> Optional[dict]:
    """Measure one row into its measurement record; None when it is left as it is."""
    key = spec.measure_key
    previous, trained = _previous(store, key)
    if trained and not args.force:
        print(f"  kept: {key} was measured by its trained run's job (--force replaces it)", flush=True)
        return None
    store.prepare(spec, key)
    claim = store.claim(key)
    if claim is None:
        print(f"  skipped: {key} is claimed by a running job", flush=True)
        return None
    try:
        attempt = store.mark_running(key).attempts
        started, gpus = time.time(), int(torch.device(args.device).type == "cuda")
        store.record_attempt(key, attempt, started, gpus)
        measured = measure_complexity(
            spec.config,
            images=args.images if not args.fixed_size else None,
            fixed_size=args.fixed_size,
            root=args.root,
            device=args.device,
        )
        fields = complexity_fields(spec, measured, time.time() - started)
        store.record_attempt(key, attempt, started, gpus)
        kept = {k: v for k, v in (previous or {}).items() if k.startswith("fps_")} if not trained else {}
        record = measurement_record(
            spec,
            {**kept, **fields},
            checkpoint_sha256=None,
            trained=False,
            gpu_hours=round(store.gpu_hours(key), 4) if gpus else None,
            device=measured["device"],
            commit=git_commit(),
            date=utc_now()[:10],
            torch=torch.__version__,
            fixed_size=list(args.fixed_size) if args.fixed_size else None,
        )
        store.complete(key, record)
        return record
    except Exception as err:
        store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        raise
    finally:
        store.release(claim)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness measure",
        description="Parameters and fvcore GFLOPs of every model row of an experiment, without training, written "
        "to each row's measurement record results/runs/<run_id>/measurements/<measure_id>/.",
    )
    parser.add_argument("experiment", help="experiment YAML, e.g. experiments/table1.yaml")
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="only these row labels")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--images",
        type=int,
        metavar="N",
        help="mean over the first N evaluation images (default: the config's benchmark.flops_images)",
    )
    how.add_argument(
        "--fixed-size",
        type=_parse_size,
        metavar="HxW",
        help="one 3xHxW image instead of evaluation images (e.g. 800x1199; needs no dataset)",
    )
    parser.add_argument("--out", default="results", help="results root (default: results)")
    parser.add_argument("--root", help="dataset root (overrides data.root)")
    parser.add_argument("--smoke", action="store_true", help="the smoke-scale configs instead of full scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--force", action="store_true", help="replace measurement records that a trained run's job made too"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the rows and records, measure nothing")
    args = parser.parse_args(argv)

    try:
        experiment = load_experiment(args.experiment, smoke=args.smoke, rows=args.rows, check_data=False)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    specs, seen = [], set()
    for spec in expand(experiment):  # one measurement per record, however many rows report it
        if spec.measure_key not in seen:
            seen.add(spec.measure_key)
            specs.append(spec)

    def has_dataset(cfg) -> bool:
        root = args.root or cfg.data.root
        return cfg.data.dataset == "synthetic" or bool(root and os.path.isdir(root))

    if not args.fixed_size and not all(has_dataset(spec.config) for spec in specs):
        print(
            "error: no dataset for the evaluation images (set --root or data.root); --fixed-size 800x1199 needs none",
            file=sys.stderr,
        )
        return 2
    store = ResultsStore(args.out)
    for spec in specs:
        print(f"{spec.label} [{spec.measure_key}]", flush=True)
        if args.dry_run:
            continue
        record = measure_row(store, spec, args)
        if record is None:
            continue
        uncounted = ", ".join(record["unsupported_ops"]) or "none"
        print(
            f"  params {record['params']:,}  GFLOPs {record['gflops']:.1f} (+-{record['gflops_std']:.1f}, "
            f"{record['gflops_input']})  uncounted: {uncounted}  [{record['seconds']:.0f} s]",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
