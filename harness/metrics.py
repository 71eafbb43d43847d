"""The one registry of the numbers a table can compare with the paper (pure, no torch).

Each :class:`Metric` says where its value comes from (``field`` in the metrics.json of the record that
produces it: an evaluated metric's evaluation record, a measured one's measurement record, ``gpu_hours`` the
sum over the training, evaluation and measurement records; times ``factor`` to the paper's unit), how many
decimals our values print with, whether the paper's own numbers print as given (``%g``) or with one decimal,
its Markdown and LaTeX titles, for the COCO AP columns the run-to-run noise band a single run is judged with, and
for a number that depends on the machine (FPS, GPU hours) the record field naming the device it was measured on
and the device class of the references' numbers: ours is set against them only when measured on that class.
Validation (an experiment's ``metrics:``), collection, tables and figures all read this list: a new column is one
entry here plus the code that measures its field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# Run-to-run noise of one COCO training run, in AP points: retraining the same detector with another seed moves
# COCO val AP by about 0.2-0.3 (the spread commonly seen between identical COCO trainings). The reports use
# the top of that range as the band of a number that has a single run: a reproduction within +-0.3 AP of its
# reference is "within noise". Rows with >= 2 seeds use their own standard deviation instead. The size-wise APs
# (APs/APm/APl) scatter more than AP, so the same band flags them more readily: a flag asks for a look, it is
# not a significance test.
NOISE_BAND_AP = 0.3
# A released checkpoint evaluated here (an evaluation-only row): the same weights, so only the evaluation can move
# its AP (image decoding and resizing libraries, kernels, float rounding), by a few hundredths. Beyond 0.1 AP of
# what its publisher reports, the data pipeline, the model or the post-processing differ from the publisher's.
RELEASED_BAND_AP = 0.1

# The scales whose numbers are set against the paper's: only the paper's setting. A smoke line is another model
# size on another (synthetic) dataset, so its AP, parameters, FLOPs and FPS carry no difference to the paper's;
# its differences to the experiment's reference row (ablation deltas) are between like and like and stay.
COMPARED_SCALES: Tuple[str, ...] = ("full",)

# The machine the paper's and the official code's speed and training time were measured on: "Inference speed is
# measured on NVIDIA Tesla V100 GPU" (the official repository's README; the paper's Table 1 likewise). A device
# class is what :func:`harness.report.devices.device_class` makes of a device's name ("V100", "H100", "CPU").
REFERENCE_DEVICE = "NVIDIA Tesla V100"
REFERENCE_DEVICE_CLASS = "V100"


@dataclass(frozen=True)
class Metric:
    name: str  # the paper's key, as in experiments/*.yaml ``paper:`` and ``metrics:``
    field: str  # its field in the metrics.json of the record that produces it
    factor: float = 1.0  # field x factor = the paper's unit
    decimals: int = 1  # of our values
    paper_as_given: bool = False  # the paper's numbers print as given (%g) instead of with one decimal
    title_md: str = ""
    title_tex: str = ""
    noise: Optional[float] = None  # the run-to-run band of one run at full scale; None: no noise marker
    evaluated: bool = False  # measured by evaluating a checkpoint (its evaluation record has it)
    device_field: Optional[str] = None  # the collected column naming the device it was measured on; None: any


METRICS: Tuple[Metric, ...] = (
    Metric("AP", "AP", title_md="AP", title_tex="AP", noise=NOISE_BAND_AP, evaluated=True),
    Metric("AP50", "AP50", title_md="AP50", title_tex="AP$_{50}$", noise=NOISE_BAND_AP, evaluated=True),
    Metric("AP75", "AP75", title_md="AP75", title_tex="AP$_{75}$", noise=NOISE_BAND_AP, evaluated=True),
    Metric("APs", "APs", title_md="APS", title_tex="AP$_{S}$", noise=NOISE_BAND_AP, evaluated=True),
    Metric("APm", "APm", title_md="APM", title_tex="AP$_{M}$", noise=NOISE_BAND_AP, evaluated=True),
    Metric("APl", "APl", title_md="APL", title_tex="AP$_{L}$", noise=NOISE_BAND_AP, evaluated=True),
    Metric("params", "params", 1e-6, 2, True, "params (M)", "params (M)"),
    Metric("flops", "gflops", 1.0, 1, True, "FLOPs (G)", "FLOPs (G)"),
    Metric("gpu_hours", "gpu_hours", 1.0, 1, True, "GPU hours", "GPU hours", device_field="train_device"),
    Metric("fps", "fps_bs1", 1.0, 1, True, "FPS", "FPS", device_field="fps_device"),
)
BY_NAME: Dict[str, Metric] = {m.name: m for m in METRICS}
PAPER_METRICS: Tuple[str, ...] = tuple(m.name for m in METRICS)
DEFAULT_METRICS: Tuple[str, ...] = PAPER_METRICS[:6]  # the six AP columns

# Numeric fields of metrics.json that are collected besides the metrics' own (spread, bookkeeping).
EXTRA_NUMERIC_FIELDS: Tuple[str, ...] = ("gflops_std", "fps_bs4", "epochs_trained", "num_detections")
NUMERIC_FIELDS: Tuple[str, ...] = tuple(dict.fromkeys([m.field for m in METRICS] + list(EXTRA_NUMERIC_FIELDS)))
# The fields an evaluation of a checkpoint measures (its own record, one per split / TTA / detections setting).
EVALUATED_FIELDS: Tuple[str, ...] = tuple(m.field for m in METRICS if m.evaluated)
# The fields a measurement of the model gives (its own record, one per benchmark setting).
MEASURED_FIELDS: Tuple[str, ...] = ("params", "gflops", "gflops_std", "fps_bs1", "fps_bs4")
