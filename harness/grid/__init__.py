"""Experiment files -> validated rows -> runs with ids and costs (pure: no torch, no I/O but reading YAML).

    schema.py      YAML reading, typed coercion, the error that names file, row and key
    validate.py    checks across config sections
    experiment.py  the experiment file: base, rows, axes, smoke profile
    runs.py        rows -> RunSpecs, run ids
    cost.py        GPU-hour estimates
"""
from harness.grid.cost import estimate_gpu_hours
from harness.grid.experiment import (SCALES, SMOKE_DEFAULTS, Experiment, Row, check_unique_name, find_experiment,
                                     load_experiment)
from harness.grid.runs import (EVALUATIONS, HASH_EXCLUDE, KINDS, RunSpec, canonical_json, config_from_dict,
                               config_to_dict, eval_id, expand, measure_id, run_id, runs_elsewhere, unique_runs)
from harness.grid.schema import ExperimentError
from harness.grid.validate import check_run_config, world_size

__all__ = ["HASH_EXCLUDE", "SCALES", "SMOKE_DEFAULTS", "Experiment", "ExperimentError", "Row", "RunSpec",
           "EVALUATIONS", "KINDS", "canonical_json", "eval_id", "measure_id", "check_run_config", "check_unique_name", "find_experiment", "config_from_dict", "config_to_dict", "estimate_gpu_hours",
           "expand", "load_experiment", "run_id", "runs_elsewhere", "unique_runs", "world_size"]
