"""Experiment files: load, validate, and expand rows into fully resolved runs (pure, no torch).

An experiment YAML has a ``base`` configuration (sections ``model``, ``data``, ``train``, ``eval``,
``benchmark``, ``launcher``), ``rows`` that each state only what differs from the base, the paper's
numbers beside every row, optional ``axes`` that expand into a cartesian grid of extra rows, and an
optional ``smoke`` profile that shrinks any row to laptop scale (merged over :data:`SMOKE_DEFAULTS`).

Every problem is reported as one :class:`ExperimentError` naming the file, the row and the dotted key.

    name: table2                    # results/<name>/, reports/<name>.{md,tex}
    table: "2"                      # the paper's table number (titles)
    caption: ...
    columns: [ms_inputs, K, fpn]    # the paper's descriptive columns, filled from each row's cells
    metrics: [AP, AP50, ...]        # paper columns compared (AP AP50 AP75 APs APm APl params flops
                                    #   gpu_hours fps); default: the six AP columns
    reference_row: LABEL            # optional: ablation deltas are measured against this row
    base: {model: {...}, data: {...}, train: {...}, eval: {...}, benchmark: {...}, launcher: {...}}
    rows:
      - label: MS inputs, K=1       # unique
        cells: {ms_inputs: true, K: 1, fpn: w/o}
        overrides: {model: {ms_attention: false, enc_n_points: 1, dec_n_points: 1}}
        paper: {AP: 41.4, AP50: 60.9}
        seeds: [1, 2, 3]            # optional: one run per seed (mean and std in the report)
        cited: true                 # optional: the paper's numbers only, never run
    axes: {model.enc_n_points: [1, 2, 4]}   # optional: one extra row per combination
    smoke: {train: {epochs: 1}}     # optional: refines SMOKE_DEFAULTS

A row's config is ``base`` <- ``overrides`` (<- the smoke profile), with ``model`` starting from
``arch_defaults(arch)``; its run id hashes that resolved config (less :data:`HASH_EXCLUDE`), so rows
that resolve to the same config share one run.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from harness.config import (BenchmarkConfig, DataConfig, EvalConfig, LauncherConfig, RunConfig,
                            TrainConfig)
from model.config import ConfigError, ModelConfig, arch_defaults

SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                   "benchmark": BenchmarkConfig, "launcher": LauncherConfig}
TOP_KEYS = ("name", "table", "caption", "description", "columns", "metrics", "reference_row", "base",
            "rows", "axes", "smoke")
ROW_KEYS = ("label", "cells", "overrides", "paper", "cited", "seeds", "notes")
# Paper metrics an experiment may compare, in the units of paper_tables.yaml.
PAPER_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "params", "flops", "gpu_hours", "fps")
SCALES = ("full", "smoke")

# Any row at laptop scale: synthetic COCO-format data, a small transformer, one CPU process.
SMOKE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # small enough that Table 2's six rows train, evaluate and measure in minutes on 2 CPU cores, large
    # enough that the detector learns the synthetic objects (non-zero AP after a few epochs)
    "model": {"backbone": "resnet50", "pretrained_backbone": False, "backbone_weights": None,
              "hidden_dim": 64, "dim_feedforward": 128, "nheads": 8, "enc_layers": 1, "dec_layers": 2,
              "num_queries": 30, "dropout": 0.0},
    "data": {"dataset": "synthetic", "root": None, "val_split": "val2017", "augmentation": "none",
             "num_workers": 0, "eval_size": 128, "max_size": 160, "synthetic_image_size": [128, 160],
             "synthetic_train_images": 32, "synthetic_val_images": 8},
    "train": {"epochs": 12, "lr": 1.0e-3, "lr_backbone": 1.0e-4, "lr_drop": 10, "batch_size_per_gpu": 4,
              "total_batch_size": 4, "accumulate_to_total": True, "amp": "off", "print_freq": 4,
              "eval_every": 2},
    "eval": {"eval_only": False, "checkpoint": None, "tta_sizes": [112, 128, 144]},
    "benchmark": {"flops_images": 2, "fps_images": 4, "fps_warmup": 1, "precision": "fp32"},
    "launcher": {"executor": "local", "partition": None, "nodes": 1, "gpus_per_node": 0,
                 "tasks_per_node": 1, "cpus_per_task": 2, "mem_gb": None, "timeout_min": 60},
}

# Fields that say where or how a run is launched, not what it computes: left out of the run id so that
# moving the dataset or changing the partition does not rerun finished rows.
HASH_EXCLUDE = ("data.root", "data.num_workers", "train.print_freq", "launcher")


class ExperimentError(Exception):
    """A problem in an experiment file: names the file, the row and the dotted key."""

    def __init__(self, path: str, row: Optional[str], key: Optional[str], message: str):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row!r}")
        if key:
            where.append(key)
        super().__init__(": ".join(where + [message]))
        self.path, self.row, self.key, self.message = str(path), row, key, message


@dataclass(frozen=True)
class Row:
    label: str
    cells: Mapping[str, Any]                 # descriptive columns as printed in the paper
    paper: Mapping[str, Optional[float]]     # the paper's numbers for this row
    overrides: Mapping[str, Any]             # nested, only what differs from the base
    cited: bool = False                      # paper numbers only, never run
    seeds: Tuple[int, ...] = ()
    notes: str = ""
    configs: Mapping[str, RunConfig] = dataclasses.field(default_factory=dict)   # scale -> resolved


@dataclass(frozen=True)
class Experiment:
    name: str
    path: str
    table: str
    caption: str
    columns: Tuple[str, ...]
    metrics: Tuple[str, ...]
    rows: Tuple[Row, ...]
    smoke: bool = False
    selected: Optional[Tuple[str, ...]] = None    # labels chosen with rows=...; None: all
    reference_row: Optional[str] = None           # the row ablation deltas are measured against
    description: str = ""

    @property
    def scale(self) -> str:
        return "smoke" if self.smoke else "full"

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)


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


# ---------------------------------------------------------------------------------------------- loading

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str) -> dict:
    """Parse ``path``; syntax errors, a missing or empty file become :class:`ExperimentError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ExperimentError(path, None, None, f"cannot read the file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ExperimentError(path, None, None, f"YAML syntax error at {at}{problem}") from None
    if data is None:
        raise ExperimentError(path, None, None, "the file is empty; expected a mapping with "
                              "'name', 'base' and 'rows'")
    if not isinstance(data, dict):
        raise ExperimentError(path, None, None, f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_experiment(path: str, smoke: bool = False, rows: Optional[Sequence[str]] = None,
                    check_data: bool = True) -> Experiment:
    """Load and validate an experiment file.

    ``smoke`` picks the scale :func:`expand` produces (both scales are always resolved and validated);
    ``rows`` selects row labels for :func:`expand`; ``check_data`` checks that a full-scale run's
    dataset root exists (turn off for reports and status, which need no data).
    """
    path = str(path)
    data = read_yaml(path)
    _check_keys(path, None, "", data, TOP_KEYS)
    for key in ("name", "rows"):
        if key not in data:
            raise ExperimentError(path, None, key, "missing; expected " +
                                  ("the experiment's name" if key == "name" else "a list of rows"))
    name = _expect(path, None, "name", data["name"], str)
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ExperimentError(path, None, "name", f"got {name!r}, expected a folder-safe name")
    metrics = tuple(_expect(path, None, "metrics", data.get("metrics", list(PAPER_METRICS[:6])), list))
    for i, m in enumerate(metrics):
        if m not in PAPER_METRICS:
            raise ExperimentError(path, None, f"metrics[{i}]", _unknown(m, PAPER_METRICS))
    columns = tuple(str(c) for c in _expect(path, None, "columns", data.get("columns", []), list))
    base = _expect(path, "base", "base", data.get("base") or {}, dict)
    _check_sections(path, "base", base)
    smoke_profile = _merge(SMOKE_DEFAULTS, _expect(path, "smoke", "smoke", data.get("smoke") or {}, dict))
    _check_sections(path, "smoke", smoke_profile)

    raw_rows = list(_expect(path, None, "rows", data["rows"], list)) + _axes_rows(path, data.get("axes"))
    if not raw_rows:
        raise ExperimentError(path, None, "rows", "empty; expected at least one row")
    parsed: List[Row] = []
    for i, raw in enumerate(raw_rows):
        parsed.append(_parse_row(path, i, raw, base, smoke_profile, columns, metrics, check_data and not smoke))
    labels = [r.label for r in parsed]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise ExperimentError(path, label, "label", "given to two rows; expected unique labels")
    selected = None
    if rows:
        for label in rows:
            if label not in labels:
                raise ExperimentError(path, label, None, "no such row; " + _unknown(label, labels, "row"))
        selected = tuple(rows)
    reference = data.get("reference_row")
    if reference is not None and reference not in labels:
        raise ExperimentError(path, None, "reference_row", _unknown(reference, labels, "row"))
    return Experiment(name=name, path=path, table=str(data.get("table", name)),
                      caption=str(data.get("caption", "")), columns=columns, metrics=metrics,
                      rows=tuple(parsed), smoke=smoke, selected=selected, reference_row=reference,
                      description=str(data.get("description", "")))


def _parse_row(path, index, raw, base, smoke_profile, columns, metrics, check_data) -> Row:
    if not isinstance(raw, dict):
        raise ExperimentError(path, f"rows[{index}]", None, f"expected a mapping, got {type(raw).__name__}")
    where = str(raw.get("label", f"rows[{index}]"))
    _check_keys(path, where, "", raw, ROW_KEYS)
    if "label" not in raw:
        raise ExperimentError(path, where, "label", "missing; expected a short name for the row")
    label = _expect(path, where, "label", raw["label"], str)
    cells = _expect(path, label, "cells", raw.get("cells") or {}, dict)
    _check_keys(path, label, "cells.", cells, columns)
    paper = _expect(path, label, "paper", raw.get("paper") or {}, dict)
    _check_keys(path, label, "paper.", paper, metrics)
    for key, value in paper.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ExperimentError(path, label, f"paper.{key}", f"got {value!r}, expected a number or null")
    cited = _expect(path, label, "cited", raw.get("cited", False), bool)
    seeds = _expect(path, label, "seeds", raw.get("seeds", []), list)
    for i, s in enumerate(seeds):
        _expect(path, label, f"seeds[{i}]", s, int)
    overrides = _expect(path, label, "overrides", raw.get("overrides") or {}, dict)
    notes = str(raw.get("notes", ""))
    if cited:
        if overrides or seeds:
            raise ExperimentError(path, label, "overrides" if overrides else "seeds",
                                  "a cited row has the paper's numbers only; expected no overrides or seeds")
        return Row(label, dict(cells), dict(paper), {}, True, (), notes, {})
    _check_sections(path, label, overrides)
    full = resolve(path, label, base, overrides, None, check_data)
    try:
        smoke = resolve(path, label, base, overrides, smoke_profile, False)
    except ExperimentError as e:
        raise ExperimentError(path, label, e.key, f"with the smoke profile: {e.message}") from None
    configs = {"full": full, "smoke": smoke}
    return Row(label, dict(cells), dict(paper), overrides, False, tuple(seeds), notes, configs)


def _axes_rows(path, axes) -> List[dict]:
    """``axes: {model.enc_n_points: [1, 4], model.num_feature_levels: [1, 4]}`` -> one row per combination."""
    if axes is None:
        return []
    axes = _expect(path, None, "axes", axes, dict)
    keys = list(axes)
    value_lists = []
    for key in keys:
        section = key.split(".", 1)[0]
        if "." not in key or section not in SECTION_CLASSES:
            raise ExperimentError(path, None, f"axes.{key}",
                                  "expected a dotted key SECTION.FIELD, e.g. model.enc_n_points")
        values = _expect(path, None, f"axes.{key}", axes[key], list)
        if not values:
            raise ExperimentError(path, None, f"axes.{key}", "empty; expected at least one value")
        value_lists.append(values)
    leaves = [k.rsplit(".", 1)[1] for k in keys]
    short = len(set(leaves)) == len(leaves)
    rows = []
    for combo in itertools.product(*value_lists):
        overrides: Dict[str, Any] = {}
        for key, value in zip(keys, combo):
            node = overrides
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        names = leaves if short else keys
        label = ", ".join(f"{n}={_yaml_scalar(v)}" for n, v in zip(names, combo))
        rows.append({"label": label, "overrides": overrides})
    return rows


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ------------------------------------------------------------------------------------------- resolving

def resolve(path: str, label: str, base: Mapping, overrides: Mapping, smoke_profile: Optional[Mapping],
            check_data: bool) -> RunConfig:
    """base <- row overrides <- smoke profile, typed and validated; ``model`` starts from
    :func:`arch_defaults` of the resolved ``arch``."""
    merged = _merge(base, overrides)
    if smoke_profile is not None:
        merged = _merge(merged, smoke_profile)
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        values = dict(merged.get(section) or {})
        if section == "model":
            arch = values.get("arch", ModelConfig.arch)
            if not isinstance(arch, str):
                raise ExperimentError(path, label, "model.arch", f"got {arch!r}, expected a string")
            values = {**arch_defaults(arch), **values}
        typed = {k: _coerce(path, label, f"{section}.{k}", v, _hints(cls)[k]) for k, v in values.items()}
        try:
            sections[section] = cls(**typed)
        except ConfigError as e:
            raise ExperimentError(path, label, f"{section}.{e.key}", e.message) from None
    if sections["data"].root is not None:
        sections["data"] = dataclasses.replace(sections["data"], root=os.path.expanduser(
            os.path.expandvars(sections["data"].root)))
    cfg = RunConfig(**sections)
    try:
        check_run_config(cfg)
    except ConfigError as e:
        raise ExperimentError(path, label, e.key, e.message) from None
    if check_data:
        _check_dataset(path, label, cfg.data)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    """Ranges and combinations across sections; raises :class:`ConfigError` with a dotted key."""
    d, t, e, b, l = cfg.data, cfg.train, cfg.eval, cfg.benchmark, cfg.launcher
    _choice("data.dataset", d.dataset, ("coco", "synthetic"))
    _choice("data.augmentation", d.augmentation, ("official", "none"))
    _choice("train.amp", t.amp, ("off", "bf16", "fp16"))
    _choice("benchmark.precision", b.precision, ("fp32", "tf32", "bf16"))
    _choice("launcher.executor", l.executor, ("auto", "slurm", "local", "debug"))
    for key, value in (("train.epochs", t.epochs), ("train.batch_size_per_gpu", t.batch_size_per_gpu),
                       ("train.total_batch_size", t.total_batch_size), ("train.print_freq", t.print_freq),
                       ("train.eval_every", t.eval_every), ("data.eval_size", d.eval_size),
                       ("data.max_size", d.max_size), ("data.synthetic_train_images", d.synthetic_train_images),
                       ("data.synthetic_val_images", d.synthetic_val_images),
                       ("eval.num_detections", e.num_detections), ("benchmark.flops_images", b.flops_images),
                       ("benchmark.fps_images", b.fps_images), ("launcher.nodes", l.nodes),
                       ("launcher.cpus_per_task", l.cpus_per_task), ("launcher.timeout_min", l.timeout_min),
                       ("launcher.max_array_size", l.max_array_size)):
        if value < 1:
            raise ConfigError(key, f"got {value!r}, expected an integer >= 1")
    for key, value in (("train.lr_drop", t.lr_drop), ("data.num_workers", d.num_workers),
                       ("benchmark.fps_warmup", b.fps_warmup), ("launcher.gpus_per_node", l.gpus_per_node),
                       ("launcher.max_requeues", l.max_requeues), ("data.synthetic_seed", d.synthetic_seed)):
        if value < 0:
            raise ConfigError(key, f"got {value!r}, expected an integer >= 0")
    for key, value in (("train.lr", t.lr), ("train.lr_linear_proj_mult", t.lr_linear_proj_mult)):
        if value <= 0:
            raise ConfigError(key, f"got {value!r}, expected a number > 0")
    for key, value in (("train.lr_backbone", t.lr_backbone), ("train.weight_decay", t.weight_decay),
                       ("train.clip_max_norm", t.clip_max_norm)):
        if value < 0:
            raise ConfigError(key, f"got {value!r}, expected a number >= 0")
    if t.max_iters_per_epoch is not None and t.max_iters_per_epoch < 1:
        raise ConfigError("train.max_iters_per_epoch", f"got {t.max_iters_per_epoch!r}, expected null or >= 1")
    if l.mem_gb is not None and l.mem_gb < 1:
        raise ConfigError("launcher.mem_gb", f"got {l.mem_gb!r}, expected null or >= 1")
    if l.tasks_per_node is not None and l.tasks_per_node < 1:
        raise ConfigError("launcher.tasks_per_node", f"got {l.tasks_per_node!r}, expected null or >= 1")
    if any(s < 1 for s in b.fps_batch_sizes):
        raise ConfigError("benchmark.fps_batch_sizes", f"got {list(b.fps_batch_sizes)}, expected sizes >= 1")
    if any(s < 1 for s in e.tta_sizes) or (e.tta and not e.tta_sizes):
        raise ConfigError("eval.tta_sizes", f"got {list(e.tta_sizes)}, expected one or more sizes >= 1")
    if any(s < 1 for s in d.synthetic_image_size):
        raise ConfigError("data.synthetic_image_size", "expected [height, width] >= 1")
    if d.max_size < d.eval_size:
        raise ConfigError("data.max_size", f"got {d.max_size}, expected >= data.eval_size ({d.eval_size})")
    if l.gpus_per_node < 0:
        raise ConfigError("launcher.gpus_per_node", f"got {l.gpus_per_node}, expected >= 0 (0: a CPU job)")
    per_step = t.batch_size_per_gpu * world_size(l)
    if t.accumulate_to_total and t.total_batch_size % per_step:
        raise ConfigError("train.total_batch_size",
                          f"got {t.total_batch_size}, expected a multiple of batch_size_per_gpu x processes "
                          f"({t.batch_size_per_gpu} x {world_size(l)} = {per_step})")
    if e.eval_only and not e.checkpoint:
        raise ConfigError("eval.checkpoint", "eval_only: true needs a checkpoint to evaluate")
    if e.tta and cfg.model.arch == "faster_rcnn":
        raise ConfigError("eval.tta", "test-time augmentation is implemented for the DETR family only")


def world_size(launcher: LauncherConfig) -> int:
    """Processes of one run: one per GPU unless ``tasks_per_node`` says otherwise (CPU runs)."""
    per_node = launcher.tasks_per_node or max(launcher.gpus_per_node, 1)
    return launcher.nodes * per_node


def _check_dataset(path, label, data: DataConfig) -> None:
    if data.dataset != "coco":
        return
    if data.root is None:
        raise ExperimentError(path, label, "data.root", "not set; expected the COCO 2017 folder "
                              "(train2017/, val2017/, annotations/), or run with --smoke")
    if "$" in data.root:
        raise ExperimentError(path, label, "data.root", f"{data.root!r}: an environment variable in it "
                              "is not set; expected the COCO 2017 folder, or run with --smoke")
    if not os.path.isdir(data.root):
        raise ExperimentError(path, label, "data.root", f"{data.root!r} does not exist; expected the COCO "
                              "2017 folder (train2017/, val2017/, annotations/), or run with --smoke")


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(key, f"got {value!r}, expected one of {', '.join(map(repr, choices))}")


# ------------------------------------------------------------------------------------------ expansion

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
            specs.append(RunSpec(experiment.name, row.label, seed, resolved, run_id(resolved), scale,
                                 row.paper, index))
    return specs


def unique_runs(specs: Sequence[RunSpec]) -> List[RunSpec]:
    """The specs to launch: the first of each run id."""
    seen, out = set(), []
    for spec in specs:
        if spec.run_id not in seen:
            seen.add(spec.run_id)
            out.append(spec)
    return out


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (tuples as lists), the form written to config.yaml."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def canonical_json(cfg: RunConfig) -> str:
    """The JSON the run id hashes: sorted keys, :data:`HASH_EXCLUDE` left out."""
    d = config_to_dict(cfg)
    for key in HASH_EXCLUDE:
        parts = key.split(".")
        node = d
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def run_id(cfg: RunConfig) -> str:
    return hashlib.sha1(canonical_json(cfg).encode()).hexdigest()[:12]


def config_from_dict(d: Mapping) -> RunConfig:
    """Inverse of :func:`config_to_dict` (reads a run's config.yaml)."""
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        values = dict(d.get(section) or {})
        sections[section] = cls(**{k: _coerce("config.yaml", None, f"{section}.{k}", v, _hints(cls)[k])
                                   for k, v in values.items() if k in _hints(cls)})
    return RunConfig(**sections)


# ---------------------------------------------------------------------------------------- GPU-hours

# Training GPU-hours per COCO epoch on V100 at total batch 32, from the official README
# (train_gpu_hours_per_epoch): Deformable DETR 6.5 (two-stage 6.8), single scale 3.2, DETR 4.0,
# DETR-DC5 14.0, Faster R-CNN + FPN 3.5.
_HOURS_PER_EPOCH = {"deformable_detr": 6.5, "detr": 4.0, "faster_rcnn": 3.5}
_BACKBONE_FACTOR = {"resnet50": 1.0, "resnet101": 1.45, "resnext101_32x8d": 2.4, "resnext101_64x4d": 2.4}


def estimate_gpu_hours(cfg: RunConfig, paper_gpu_hours: Optional[float] = None,
                       paper_epochs: Optional[float] = None) -> float:
    """Training GPU-hours of one run (V100-equivalent; 0 for smoke runs, which use no GPU).

    With the paper's total GPU-hours for the row, that number scaled by epochs / the paper's epochs.
    Otherwise a simple model: hours per epoch of the architecture (official README: Deformable DETR
    6.5 with 4 levels, 3.2 single-scale; DETR 4.0, 14.0 with DC5; Faster R-CNN 3.5), times a backbone
    factor (ResNet-101 1.45, ResNeXt-101 2.4), x1.15 for DCN, x1.05 for two-stage, x1.05 FPN /
    x1.1 BiFPN, times epochs; an evaluation-only run counts 0.2 (x3 with test-time augmentation).
    """
    if cfg.data.dataset != "coco" or cfg.launcher.gpus_per_node == 0:
        return 0.0
    m = cfg.model
    if cfg.eval.eval_only:
        return 0.2 * (3 if cfg.eval.tta else 1)
    if paper_gpu_hours is not None and paper_epochs:
        return float(paper_gpu_hours) * cfg.train.epochs / float(paper_epochs)
    per_epoch = _HOURS_PER_EPOCH[m.arch]
    if m.arch == "deformable_detr" and m.num_feature_levels == 1:
        per_epoch = 3.2 * (1.35 if m.dilation else 1.0)
    if m.arch == "detr" and m.dilation:
        per_epoch = 14.0
    per_epoch *= _BACKBONE_FACTOR.get(m.backbone, 1.0)
    per_epoch *= (1.15 if m.dcn else 1.0) * (1.05 if m.two_stage else 1.0)
    if m.arch == "deformable_detr":
        per_epoch *= {"none": 1.0, "fpn": 1.05, "bifpn": 1.1}[m.neck]
    return per_epoch * cfg.train.epochs


# ---------------------------------------------------------------------------------- validation helpers

def _hints(cls) -> dict:
    return get_type_hints(cls)


def _unknown(key, valid: Sequence[str], what: str = "key") -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(map(str, valid)) if len(valid) <= 12 else ", ".join(map(str, list(valid)[:12])) + ", ..."
    return f"unknown {what} {key!r}; {hint}expected one of: {listed}"


def _check_keys(path, row, prefix, mapping: Mapping, valid: Sequence[str]) -> None:
    for key in mapping:
        if key not in valid:
            raise ExperimentError(path, row, f"{prefix}{key}", _unknown(key, valid))


def _check_sections(path, row, overrides: Mapping) -> None:
    """Unknown sections or fields of a nested override mapping."""
    _check_keys(path, row, "", overrides, tuple(SECTION_CLASSES))
    for section, values in overrides.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ExperimentError(path, row, section, f"expected a mapping of {section} fields, "
                                  f"got {type(values).__name__}")
        _check_keys(path, row, f"{section}.", values, tuple(_hints(SECTION_CLASSES[section])))


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping"}


def _expect(path, row, key, value, tp):
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ExperimentError(path, row, key, f"got {value!r} ({type(value).__name__}), expected {_TYPE_NAMES[tp]}")
    return value


class _Mismatch(Exception):
    pass


def _coerce(path, row, key, value, tp):
    try:
        return _coerce_value(value, tp)
    except _Mismatch:
        raise ExperimentError(path, row, key, f"got {value!r} ({type(value).__name__}), "
                              f"expected {_describe(tp)}") from None


def _coerce_value(value, tp):
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce_value(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            if isinstance(value, dict) and len(args) == 2 and args[1] is Ellipsis:
                value = [list(item) for item in value.items()]   # mapping -> (key, value) pairs
            else:
                raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_value(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce_value(v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):     # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    return value


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin in (tuple, Tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    return _TYPE_NAMES.get(tp, str(tp))


def _merge(a: Mapping, b: Mapping) -> dict:
    """Nested merge: mappings merge key by key, anything else in ``b`` replaces ``a``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
