"""Experiment files -> validated rows -> runs with ids and costs (pure: no torch, no I/O but reading YAML).

schema.py      YAML reading, typed coercion, the error that names file, row and key
overrides.py   command-line overrides and their comma sweeps
validate.py    checks across config sections
smoke.py       the smoke profile: any row at laptop scale, in two tiers
resolve.py     a row's config from its layers, and where each value came from (--print-config)
experiment.py  the experiment file: base, rows, axes
identity.py    the run, evaluation and measurement ids, from each field's declared role
specs.py       rows -> RunSpecs
cost.py        GPU-hour estimates
"""

from harness.grid.cost import estimate_gpu_hours
from harness.grid.experiment import (
    SCALES,
    SMOKE_DEFAULTS,
    Experiment,
    Row,
    check_unique_name,
    find_experiment,
    load_experiment,
)
from harness.grid.identity import SCHEMA_VERSION, canonical_json, differences, eval_id, measure_id, run_id
from harness.grid.schema import ExperimentError
from harness.grid.specs import (
    EVALUATIONS,
    KINDS,
    RunSpec,
    collapsed_at_smoke,
    config_from_dict,
    config_to_dict,
    expand,
    runs_elsewhere,
    unique_runs,
)
from harness.grid.validate import check_run_config, world_size

__all__ = [
    "SCHEMA_VERSION",
    "differences",
    "SCALES",
    "SMOKE_DEFAULTS",
    "Experiment",
    "ExperimentError",
    "Row",
    "RunSpec",
    "EVALUATIONS",
    "KINDS",
    "collapsed_at_smoke",
    "canonical_json",
    "eval_id",
    "measure_id",
    "check_run_config",
    "check_unique_name",
    "find_experiment",
    "config_from_dict",
    "config_to_dict",
    "estimate_gpu_hours",
    "expand",
    "load_experiment",
    "run_id",
    "runs_elsewhere",
    "unique_runs",
    "world_size",
]
