"""Rows -> runs: one :class:`RunSpec` per row and seed, with the ids of :mod:`harness.grid.identity` (pure
but for reading the bytes of a file a config names).

Rows whose configs agree on every field that changes the weights share one training; an unchanged row is
never trained twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from harness.config import RunConfig
from harness.grid.experiment import Experiment, load_experiment
from harness.grid.identity import Digest, file_digest, ids
from harness.grid.schema import SECTION_CLASSES, ExperimentError, coerce, hints
from model.config import ConfigError

EVALUATIONS = "evaluations"  # run folder -> evaluations/<eval_id>/
MEASUREMENTS = "measurements"  # run folder -> measurements/<measure_id>/
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
    eval_id: str = ""  # the evaluation of the run's checkpoint this row reports
    measure_id: str = ""  # the measurement of the run's model this row reports
    overrides: Tuple[str, ...] = ()  # the command-line overrides its row got (SECTION.FIELD=VALUE), recorded

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


def expand(experiment: Experiment, scale: Optional[str] = None, digest: Digest = file_digest) -> List[RunSpec]:
    """One :class:`RunSpec` per (selected, non-cited) row and seed, at ``scale`` (default: the
    experiment's). Rows whose resolved configs agree on what changes the weights share a run id."""
    scale = scale or experiment.scale
    specs = []
    for index, row in enumerate(experiment.rows):
        if row.cited or (experiment.selected is not None and row.label not in experiment.selected):
            continue
        cfg = row.configs[scale]
        for seed in row.seeds or (cfg.train.seed,):
            resolved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            try:
                run, evaluation, measurement = ids(resolved, digest)
            except ConfigError as e:
                raise ExperimentError(experiment.path, row.label, e.key, e.message) from None
            specs.append(
                RunSpec(
                    experiment.name,
                    row.label,
                    seed,
                    resolved,
                    run,
                    scale,
                    row.paper,
                    index,
                    evaluation,
                    measurement,
                    override_strings(row.command_line),
                )
            )
    return specs


def override_strings(command_line: Mapping) -> Tuple[str, ...]:
    """A row's command-line overrides (nested, :attr:`Row.command_line`) as ``SECTION.FIELD=VALUE`` strings
    that read back as given: ``train.epochs=3``, ``train.seed=[1, 2]``, ``data.root=/coco``."""
    out = []
    for section, values in (command_line or {}).items():
        for field, value in (values or {}).items():
            plain = isinstance(value, str) and "," not in value and _reads_as(value) == value
            out.append(f"{section}.{field}={value if plain else json.dumps(value)}")
    return tuple(out)


def _reads_as(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


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


def config_from_dict(d: Mapping) -> RunConfig:
    """Inverse of :func:`config_to_dict` (reads a run's config.yaml)."""
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        values = dict(d.get(section) or {})
        sections[section] = cls(
            **{
                k: coerce("config.yaml", None, f"{section}.{k}", v, hints(cls)[k])
                for k, v in values.items()
                if k in hints(cls)
            }
        )
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
            continue  # not an experiment file, or a broken one: says so when used
        for spec in expand(other):
            if spec.run_id in mine:
                found.setdefault(spec.run_id, []).append((other.name, spec.label))
    return found


def collapsed_at_smoke(experiment: Experiment) -> Dict[str, List[str]]:
    """Smoke-scale run id -> the labels of rows that train differently at full scale but share that one
    smoke training (the smoke profile replaced what told them apart): their smoke numbers are one run's."""
    every = dataclasses.replace(experiment, selected=None)
    full = {}
    for spec in expand(every, "full"):
        full.setdefault(spec.label, set()).add(spec.run_id)
    groups: Dict[str, List[str]] = {}
    for spec in expand(every, "smoke"):
        labels = groups.setdefault(spec.run_id, [])
        if spec.label not in labels:
            labels.append(spec.label)
    return {
        run: labels
        for run, labels in groups.items()
        if len(labels) > 1 and len({frozenset(full[label]) for label in labels}) > 1
    }
