"""Rows -> runs: one :class:`RunSpec` per row and seed, and the run id that names its folder (pure).

A run id hashes the resolved config (less :data:`HASH_EXCLUDE`), so rows that resolve to the same config
share one run and an unchanged row is never trained twice.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from harness.config import RunConfig
from harness.grid.experiment import Experiment, load_experiment
from harness.grid.schema import SECTION_CLASSES, ExperimentError, coerce, hints

# Fields that say where or how a run is launched, not what it computes: left out of the run id so that
# moving the dataset or changing the partition does not rerun finished rows.
HASH_EXCLUDE = ("data.root", "data.num_workers", "train.print_freq", "launcher")
# What only evaluates or measures a training, not what changes its weights: left out of the run id (the
# training's identity) and hashed into the evaluation id instead, so that a row differing from another only
# there (test-time augmentation, another split, more detections per image) evaluates that training's
# checkpoint instead of training again. The checkpoint to evaluate or start from and eval_only stay in
# the run id: they decide the weights.
EVALUATION_FIELDS = ("eval.tta", "eval.tta_sizes", "eval.num_detections", "eval.batch_size_per_gpu", "data.val_split",
                     "data.eval_size")
MEASUREMENT_FIELDS = ("benchmark", "eval.save_detections")
# bumped when a field changes meaning (not when one is added: new fields with defaults change no id)
SCHEMA_VERSION = 2
EVALUATIONS = "evaluations"      # run folder -> evaluations/<eval_id>/
# What a measurement of the trained model (parameters, FLOPs over evaluation images, FPS) depends on besides the
# model: its own record, so that changing a benchmark setting measures again instead of training again.
MEASUREMENT_ID_FIELDS = ("benchmark", "data.val_split", "data.eval_size", "data.max_size")
MEASUREMENTS = "measurements"    # run folder -> measurements/<measure_id>/
KINDS = ("train", "evaluate", "measure")


@dataclass(frozen=True)
class RunSpec:
    experiment: str
    label: str
    seed: int
    config: RunConfig
    run_id: str
    scale: str
    paper: Mapping[str, Optional[float]]
    row_index: int
    eval_id: str = ""               # the evaluation of the run's checkpoint this row reports
    measure_id: str = ""            # the measurement of the run's model this row reports

    @property
    def eval_key(self) -> str:
        """The evaluation's record in the store: ``<run_id>/evaluations/<eval_id>``."""
        return f"{self.run_id}/{EVALUATIONS}/{self.eval_id}"

    @property
    def measure_key(self) -> str:
        """The measurement's record in the store: ``<run_id>/measurements/<measure_id>``."""
        return f"{self.run_id}/{MEASUREMENTS}/{self.measure_id}"

    def key(self, kind: str) -> str:
        """The record a job of ``kind`` (train | evaluate | measure) fills."""
        return {"train": self.run_id, "evaluate": self.eval_key, "measure": self.measure_key}[kind]


def expand(experiment: Experiment, scale: Optional[str] = None) -> List[RunSpec]:
    """One :class:`RunSpec` per (selected, non-cited) row and seed, at ``scale`` (default: the
    experiment's). Rows whose resolved configs are identical share a run id (and so one run)."""
    scale = scale or experiment.scale
    specs = []
    for index, row in enumerate(experiment.rows):
        if row.cited or (experiment.selected is not None and row.label not in experiment.selected):
            continue
        cfg = row.configs[scale]
        seeds = row.seeds or cfg.launcher.seeds or (cfg.train.seed,)
        for seed in seeds:
            resolved = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, seed=seed),
                launcher=dataclasses.replace(cfg.launcher, seeds=()))
            changed = _changed_fields(resolved)
            specs.append(RunSpec(experiment.name, row.label, seed, resolved, _run_id(changed), scale,
                                 row.paper, index, _sub_id(changed, EVALUATION_FIELDS),
                                 _sub_id(changed, MEASUREMENT_ID_FIELDS)))
    return specs


def unique_runs(specs: Sequence[RunSpec]) -> List[RunSpec]:
    """The specs to launch: the first of each (run, evaluation, measurement); rows that share all three share
    everything."""
    seen, out = set(), []
    for spec in specs:
        if (spec.run_id, spec.eval_id, spec.measure_id) not in seen:
            seen.add((spec.run_id, spec.eval_id, spec.measure_id))
            out.append(spec)
    return out


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (tuples as lists), the form written to config.yaml."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


@functools.lru_cache(maxsize=None)
def _defaults(cls) -> dict:
    """A config class's field defaults, as JSON values (tuples as lists)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    return json.loads(json.dumps(defaults))


def _changed_fields(cfg: RunConfig) -> dict:
    """{section: {field: value}} of the fields whose value differs from the field's default."""
    out: dict = {}
    for section, cls in SECTION_CLASSES.items():
        values = json.loads(json.dumps(dataclasses.asdict(getattr(cfg, section))))
        defaults = _defaults(cls)
        changed = {k: v for k, v in values.items() if v != defaults.get(k)}
        if changed:
            out[section] = changed
    return out


def _select(changed: dict, keys, keep: bool) -> dict:
    """The fields of ``changed`` named by ``keys`` (sections or dotted fields), or all the others."""
    out: dict = {}
    for section, fields in changed.items():
        for name, value in fields.items():
            named = section in keys or f"{section}.{name}" in keys
            if named == keep:
                out.setdefault(section, {})[name] = value
    return out


def _canonical(changed: dict) -> str:
    d = _select(changed, HASH_EXCLUDE + EVALUATION_FIELDS + MEASUREMENT_FIELDS, keep=False)
    return json.dumps({"schema": SCHEMA_VERSION, **d}, sort_keys=True, separators=(",", ":"))


def _run_id(changed: dict) -> str:
    return hashlib.sha1(_canonical(changed).encode()).hexdigest()[:12]


def _sub_id(changed: dict, fields) -> str:
    """The identity of an evaluation or measurement within its run: ``default`` when ``fields`` are."""
    d = _select(changed, fields, keep=True)
    if not d:
        return "default"
    return hashlib.sha1(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]


def canonical_json(cfg: RunConfig) -> str:
    """The JSON the run id hashes: the schema version and, per section, only the fields whose value differs
    from the field's default (sorted keys), less :data:`HASH_EXCLUDE` and the evaluation and measurement
    fields. A new field with a default thus leaves every existing run id as it is; a change in what a
    field means bumps :data:`SCHEMA_VERSION`."""
    return _canonical(_changed_fields(cfg))


def run_id(cfg: RunConfig) -> str:
    """The training's identity: what changes the weights (the hash of :func:`canonical_json`)."""
    return _run_id(_changed_fields(cfg))


def eval_id(cfg: RunConfig) -> str:
    """The evaluation's identity within its training: split, input size, test-time augmentation, detections
    per image (``default`` when all are the defaults)."""
    return _sub_id(_changed_fields(cfg), EVALUATION_FIELDS)


def measure_id(cfg: RunConfig) -> str:
    """The measurement's identity within its training: benchmark settings and the images it measures on."""
    return _sub_id(_changed_fields(cfg), MEASUREMENT_ID_FIELDS)


def config_from_dict(d: Mapping) -> RunConfig:
    """Inverse of :func:`config_to_dict` (reads a run's config.yaml)."""
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        values = dict(d.get(section) or {})
        sections[section] = cls(**{k: coerce("config.yaml", None, f"{section}.{k}", v, hints(cls)[k])
                                   for k, v in values.items() if k in hints(cls)})
    return RunConfig(**sections)


def runs_elsewhere(experiment: Experiment, experiments_dir) -> Dict[str, List[Tuple[str, str]]]:
    """Run id -> [(other experiment, row label)] for the runs of ``experiment`` that other experiment files in
    ``experiments_dir`` need too (at the same scale): one training serves them all."""
    mine = {spec.run_id for spec in expand(experiment)}
    found: Dict[str, List[Tuple[str, str]]] = {}
    if not os.path.isdir(experiments_dir):
        return found
    for entry in sorted(os.listdir(experiments_dir)):
        other_path = os.path.join(str(experiments_dir), entry)
        if not entry.endswith((".yaml", ".yml")) or os.path.realpath(other_path) == os.path.realpath(experiment.path):
            continue
        try:
            other = load_experiment(other_path, smoke=experiment.smoke, check_data=False)
        except ExperimentError:
            continue                             # not an experiment file, or a broken one: says so when used
        for spec in expand(other):
            if spec.run_id in mine:
                found.setdefault(spec.run_id, []).append((other.name, spec.label))
    return found
