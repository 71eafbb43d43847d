"""A row's configuration from its layers, and where each value came from (pure but for reading the files a config
names).

:func:`resolve` merges base <- smoke profile's small tier <- row overrides <- smoke profile's laptop tier <-
command-line overrides into a typed, validated :class:`RunConfig`; :func:`provenance` names the layer each value
comes from (``--print-config``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from harness.config import RunConfig
from harness.grid.feasibility import check_files
from harness.grid.schema import SECTION_CLASSES, ExperimentError, coerce, hints, merge
from harness.grid.smoke import SmokeProfile
from harness.grid.validate import check_dataset, check_run_config, check_seeds
from model.config import ConfigError, ModelConfig, arch_defaults


def resolve(
    path: str,
    label: str,
    base: Mapping,
    overrides: Mapping,
    smoke: Optional[SmokeProfile],
    check_data: bool,
    cli_overrides: Mapping = (),
) -> Tuple[RunConfig, Tuple[int, ...]]:
    """base <- smoke profile's small tier <- row overrides <- smoke profile's laptop tier <- command-line
    overrides, typed and validated; ``model`` starts from the defaults of the resolved ``arch``
    (:meth:`ModelConfig.for_arch`). Returns the config and its seeds: ``train.seed`` may be a list (one run
    per seed), the config then holds the first."""
    merged = base if smoke is None else merge(base, smoke.small)
    merged = merge(merged, overrides)
    if smoke is not None:
        merged = merge(merged, smoke.laptop)
    merged = merge(merged, dict(cli_overrides))
    seeds = check_seeds(path, label, (merged.get("train") or {}).get("seed"))
    if seeds:
        merged = merge(merged, {"train": {"seed": seeds[0]}})
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        values = dict(merged.get(section) or {})
        if section == "model":
            arch = values.get("arch", ModelConfig.arch)
            if not isinstance(arch, str):
                raise ExperimentError(path, label, "model.arch", f"got {arch!r}, expected a string")
        typed = {k: coerce(path, label, f"{section}.{k}", v, hints(cls)[k]) for k, v in values.items()}
        try:
            sections[section] = ModelConfig.for_arch(**typed) if section == "model" else cls(**typed)
        except ConfigError as e:
            raise ExperimentError(path, label, f"{section}.{e.key}", e.message) from None
    if sections["data"].root is not None:
        sections["data"] = dataclasses.replace(
            sections["data"], root=os.path.expanduser(os.path.expandvars(sections["data"].root))
        )
    cfg = RunConfig(**sections)
    try:
        check_run_config(cfg)
    except ConfigError as e:
        raise ExperimentError(path, label, e.key, e.message) from None
    if check_data:
        check_dataset(path, label, cfg.data, training=not cfg.eval.eval_only)
        check_files(path, label, cfg)
    return cfg, seeds


# where a resolved value comes from, in the order :func:`resolve` merges them (the last that sets it wins)
DEFAULT, ARCH_DEFAULT, FROM_BASE, SMOKE_SMALL_TIER, FROM_ROW, SMOKE_LAPTOP_TIER, FROM_COMMAND_LINE = (
    "default",
    "arch default",
    "base",
    "smoke profile (small)",
    "row",
    "smoke profile (laptop)",
    "command line",
)


def provenance(
    base: Mapping,
    overrides: Mapping,
    smoke: Optional[SmokeProfile],
    cli_overrides: Mapping = (),
    path: str = "",
    label: str = "",
) -> Dict[str, Tuple[Any, str]]:
    """``{"section.field": (value, source)}`` for every field of a row's config: the value :func:`resolve`
    gives it (typed; ``train.seed`` the list where one was given) and the layer it came from, in
    :func:`resolve`'s order: the field's default or the arch's (:func:`~model.config.arch_defaults`) <- base
    <- smoke profile's small tier <- the row <- its laptop tier (and the experiment's ``smoke:``) <- command
    line. A mapping value merges key by key over the layers (source ``"base + row"``)."""
    layers = (
        [(FROM_BASE, base)]
        + ([(SMOKE_SMALL_TIER, smoke.small)] if smoke is not None else [])
        + [(FROM_ROW, overrides)]
        + ([(SMOKE_LAPTOP_TIER, smoke.laptop)] if smoke is not None else [])
        + [(FROM_COMMAND_LINE, dict(cli_overrides))]
    )
    given: Dict[str, Tuple[Any, str]] = {}
    for source, layer in layers:
        for section, values in (layer or {}).items():
            if not isinstance(values, dict):  # merge() lets a non-mapping replace the whole section
                given = {k: v for k, v in given.items() if not k.startswith(section + ".")}
                continue
            for name, value in values.items():
                key = f"{section}.{name}"
                before = given.get(key)
                if isinstance(value, dict) and before is not None and isinstance(before[0], dict):
                    value, source_here = merge(before[0], value), f"{before[1]} + {source}"
                else:
                    source_here = source
                given[key] = (value, source_here)
    arch = given.get("model.arch", (ModelConfig.arch, DEFAULT))[0]
    out: Dict[str, Tuple[Any, str]] = {}
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key in given:
                value, source = given[key]
                if key == "train.seed" and isinstance(value, list):
                    value = list(check_seeds(path, label, value))
                else:
                    value = coerce(path, label, key, value, hints(cls)[f.name])
            elif section == "model" and f.name != "arch" and f.name in arch_defaults(arch):
                value, source = arch_defaults(arch)[f.name], ARCH_DEFAULT
            else:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                source = DEFAULT
            if key == "data.root" and value is not None:
                value = os.path.expanduser(os.path.expandvars(value))
            out[key] = (value, source)
    return out
