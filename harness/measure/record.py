"""A measurement record: what ``runs/<run_id>/measurements/<measure_id>/metrics.json`` holds.

Parameters, FLOPs and FPS live only here (the training and evaluation records never repeat them), with the
settings that made them (the benchmark section, the input's split and resize) and where and when they were
measured. Written by the training job (after its training), by a measurement job, and by
``python -m harness.measure`` (complexity without training: ``trained: false``, ``checkpoint_sha256: null``;
parameters, FLOPs and FPS do not depend on the weights).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from harness.metrics import MEASURED_FIELDS

# what a measurement gives besides MEASURED_FIELDS (fps_bs<B> for every batch size are kept too)
DESCRIBED = (
    "gflops_input",
    "gflops_images",
    "gflops_by_operator",
    "unsupported_ops",
    "trivial_unsupported_ops",
    "flop_counter",
    "fps_input",
    "fps_device",
    "fps_attn_impl",
    "fps_details",
    "precision",
    "notes",
    "seconds",
)


def measurement_settings(cfg) -> dict:
    """The settings a measurement of ``cfg`` ran with: the benchmark section and the input images' split and
    resize (the fields of the measurement id, and the input size they imply)."""
    return {
        "benchmark": json.loads(json.dumps(dataclasses.asdict(cfg.benchmark))),
        "split": cfg.data.val_split,
        "eval_size": cfg.data.eval_size,
        "max_size": cfg.data.max_size,
    }


def measurement_record(
    spec,
    measured: dict,
    *,
    checkpoint_sha256: Optional[str],
    trained: bool,
    gpu_hours: Optional[float],
    device: str,
    commit: Optional[str],
    date: str,
    torch: str,
    **extra,
) -> dict:
    """The measurement record of ``spec``'s row from what was measured (:func:`harness.run.job.measure` or
    :func:`harness.measure.complexity.measure_complexity`): the numbers, their description, the settings, the
    checkpoint it belongs to (None: measured without a trained checkpoint) and its provenance."""
    keep = set(MEASURED_FIELDS) | set(DESCRIBED)
    kept = {k: v for k, v in measured.items() if k in keep or k.startswith("fps_bs")}
    return {
        **kept,
        "run_id": spec.run_id,
        "measure_id": spec.measure_id,
        "label": spec.label,
        "scale": spec.scale,
        "trained": bool(trained),
        "checkpoint_sha256": checkpoint_sha256,
        **measurement_settings(spec.config),
        "gpu_hours": gpu_hours,
        "device": device,
        "commit": commit,
        "date": date,
        "torch": torch,
        **extra,
    }
