"""Experiment files: load, validate, and expand rows into fully resolved runs (pure, no torch).

An experiment YAML has a ``base`` configuration (sections ``model``, ``data``, ``train``, ``eval``,
``benchmark``, ``launcher``), ``rows`` that each state only what differs from the base, the paper's
numbers beside every row, optional ``axes`` that expand into a cartesian grid of extra rows, and an
optional ``smoke`` profile that shrinks any row to laptop scale (added to :data:`SMOKE_LAPTOP`).

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
        cells: {ms_inputs: true, K: 1, fpn: w/o}   # cells the config describes (K, epochs...) are derived
        overrides: {model: {ms_attention: false, enc_n_points: 1, dec_n_points: 1},
                    train: {seed: [1, 2, 3]}}   # optional list: one run per seed (mean and std in the report)
        paper: {AP: 41.4, AP50: 60.9}
        official: {AP: 42.0}        # optional: the official code's README for the same model
        cited: true                 # optional: the paper's numbers only, never run
    axes: {model.enc_n_points: [1, 2, 4]}   # optional: one extra row per combination
    smoke: {train: {epochs: 1}}     # optional: added to SMOKE_LAPTOP (wins over the rows)

A row's config is ``base`` <- ``overrides`` with ``model`` starting from ``ModelConfig.for_arch(arch)``; at
smoke scale :data:`SMOKE_SMALL` comes before the overrides and :data:`SMOKE_LAPTOP` after them; command-line
overrides come last (:func:`provenance` names the layer each value comes from). Its ids
come from the roles its fields declare (:mod:`harness.grid.identity`): rows that agree on everything that
changes the weights share one training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from harness.config import RunConfig
from harness.grid.cells import derive_cells
from harness.grid.feasibility import check_unique_name, find_experiment
from harness.grid.overrides import parse_overrides
from harness.grid.resolve import provenance, resolve
from harness.grid.schema import (
    BASE,
    COMMAND_LINE,
    PLACES,
    SMOKE,
    ExperimentError,
    axes_rows,
    check_keys,
    check_sections,
    combinations,
    expect,
    merge,
    read_yaml,
    reference_numbers,
    select_rows,
    unknown,
    yaml_line,
)
from harness.grid.smoke import SMOKE_DEFAULTS, SMOKE_LAPTOP, SMOKE_SMALL, SmokeProfile
from harness.metrics import PAPER_METRICS

__all__ = [
    "Experiment",
    "Row",
    "SmokeProfile",
    "load_experiment",
    "resolve",
    "provenance",
    "row_provenance",
    "find_experiment",
    "check_unique_name",
    "SMOKE_SMALL",
    "SMOKE_LAPTOP",
    "SMOKE_DEFAULTS",
    "SCALES",
]

TOP_KEYS = (
    "name",
    "table",
    "caption",
    "description",
    "columns",
    "metrics",
    "reference_row",
    "base",
    "rows",
    "axes",
    "smoke",
)
ROW_KEYS = ("label", "cells", "overrides", "paper", "official", "cited", "notes")
# Paper metrics an experiment may compare, in the units of paper_tables.yaml.
SCALES = ("full", "smoke")


@dataclass(frozen=True)
class Row:
    label: str
    cells: Mapping[str, Any]  # descriptive columns as printed in the paper
    paper: Mapping[str, Optional[float]]  # the paper's numbers for this row
    overrides: Mapping[str, Any]  # nested, only what differs from the base
    cited: bool = False  # paper numbers only, never run
    seeds: Tuple[int, ...] = ()
    notes: str = ""
    configs: Mapping[str, RunConfig] = dataclasses.field(default_factory=dict)  # scale -> resolved
    official: Mapping[str, Optional[float]] = dataclasses.field(default_factory=dict)  # official code's README
    # (dotted key, row value, smoke value): the row's settings the smoke profile's laptop tier replaces
    smoke_changes: Tuple[Tuple[str, Any, Any], ...] = ()
    command_line: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # nested: the overrides it got


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
    selected: Optional[Tuple[str, ...]] = None  # labels chosen with rows=...; None: all
    reference_row: Optional[str] = None  # the row ablation deltas are measured against
    description: str = ""
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # as written (rows resolve over it)
    smoke_profile: Optional["SmokeProfile"] = None

    @property
    def scale(self) -> str:
        return "smoke" if self.smoke else "full"

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)


def load_experiment(
    path: str,
    smoke: bool = False,
    rows: Optional[Sequence[Union[str, int]]] = None,
    check_data: bool = True,
    overrides: Sequence[str] = (),
) -> Experiment:
    """Load and validate an experiment file.

    ``smoke`` picks the scale :func:`expand` produces (both scales are always resolved and validated);
    ``rows`` selects rows for :func:`expand`, by label or by 0-based index; ``check_data`` checks that the
    selected rows' dataset files exist at full scale (turn off for reports and status, which need no data);
    ``overrides`` (``SECTION.FIELD=VALUE``, as on the command line) apply last, to the selected rows (all
    rows without a selection), and are part of their run ids. A comma list (``model.enc_n_points=1,2,4``)
    sweeps: each selected row is followed by one row per value (per combination of several), labelled like
    ``axes`` rows (``<label>, enc_n_points=2``), without the paper's numbers; those rows are the selection.
    """
    path = str(path)
    data = read_yaml(path)
    cli_overrides, sweeps = parse_overrides(path, overrides)
    check_keys(path, None, "", data, TOP_KEYS)
    for key in ("name", "rows"):
        if key not in data:
            raise ExperimentError(
                path, None, key, "missing; expected " + ("the experiment's name" if key == "name" else "a list of rows")
            )
    name = expect(path, None, "name", data["name"], str)
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ExperimentError(path, None, "name", f"got {name!r}, expected a folder-safe name")
    metrics = tuple(expect(path, None, "metrics", data.get("metrics", list(PAPER_METRICS[:6])), list))
    for i, m in enumerate(metrics):
        if m not in PAPER_METRICS:
            raise ExperimentError(path, None, f"metrics[{i}]", unknown(m, PAPER_METRICS))
    columns = tuple(str(c) for c in expect(path, None, "columns", data.get("columns", []), list))
    base = expect(path, BASE, "base", data.get("base") or {}, dict)
    check_sections(path, BASE, base)
    smoke_profile = SmokeProfile(
        SMOKE_SMALL, merge(SMOKE_LAPTOP, expect(path, SMOKE, "smoke", data.get("smoke") or {}, dict))
    )
    check_sections(path, SMOKE, smoke_profile.laptop)

    raw_rows = list(expect(path, None, "rows", data["rows"], list)) + axes_rows(path, data.get("axes"))
    if not raw_rows:
        raise ExperimentError(path, None, "rows", "empty; expected at least one row")
    labels = [
        str(raw.get("label", f"rows[{i}]")) if isinstance(raw, dict) else f"rows[{i}]" for i, raw in enumerate(raw_rows)
    ]
    selected = select_rows(path, rows, labels) if rows else None
    entries, selected = _sweep(raw_rows, labels, selected, cli_overrides, sweeps)
    parsed: List[Row] = []
    for i, raw, row_cli, applies in entries:  # the data only of the rows selected
        check = check_data and not smoke and applies
        try:
            parsed.append(_parse_row(path, i, raw, base, smoke_profile, columns, metrics, check, row_cli))
        except ExperimentError as err:
            raise _blame(path, err, base, smoke_profile, row_cli, check, i) from None
    labels = [row.label for row in parsed]
    for (i, *_), label in zip(entries, labels):
        if labels.count(label) > 1:
            raise ExperimentError(
                path, label, "label", "given to two rows; expected unique labels", yaml_line(path, ["rows", i, "label"])
            )
    reference = data.get("reference_row")
    if reference is not None and reference not in labels:
        raise ExperimentError(path, None, "reference_row", unknown(reference, labels, "row"))
    return Experiment(
        name=name,
        path=path,
        table=str(data.get("table", name)),
        caption=str(data.get("caption", "")),
        columns=columns,
        metrics=metrics,
        rows=tuple(parsed),
        smoke=smoke,
        selected=selected,
        reference_row=reference,
        description=str(data.get("description", "")),
        base=base,
        smoke_profile=smoke_profile,
    )


def _sweep(raw_rows, labels, selected, cli_overrides, sweeps):
    """([(index in the file, raw row, its command-line overrides, selected)], the selection): a selected row gets
    the command line's overrides; with sweeps it stays as written and its swept copies follow it, selected."""
    entries, chosen = [], []
    for i, raw in enumerate(raw_rows):
        applies = selected is None or labels[i] in selected
        if not (applies and sweeps and isinstance(raw, dict) and "label" in raw and not raw.get("cited")):
            entries.append((i, raw, cli_overrides if applies else {}, applies))
            chosen += [labels[i]] if applies and selected is not None else []
            continue
        entries.append((i, raw, {}, False))
        for suffix, combo in combinations(sweeps):
            label = f"{raw['label']}, {suffix}"
            copy = {k: v for k, v in raw.items() if k not in ("paper", "official")}
            entries.append((i, dict(copy, label=label), merge(cli_overrides, combo), True))
            chosen.append(label)
    return entries, (tuple(chosen) if sweeps or selected is not None else None)


def _blame(path, err: ExperimentError, base, smoke_profile, cli_overrides, check_data, index) -> ExperimentError:
    """A row's error that the base (or the command line) alone already has is reported there, with its line,
    not on the first row; an error of a row without a label gets its line."""
    if err.row in PLACES or err.key is None:
        return err
    for where, section_overrides in ((BASE, {}), (COMMAND_LINE, cli_overrides)):
        if where == COMMAND_LINE and not cli_overrides:
            continue
        try:
            resolve(path, where, base, section_overrides, None, check_data, {})
        except ExperimentError as own:
            if own.key == err.key:
                line = yaml_line(path, ["base"] + own.key.split(".")) if where == BASE else None
                return ExperimentError(path, where, own.key, own.message, line)
    if err.row is not None and err.row.startswith("rows["):
        return ExperimentError(path, err.row, err.key, err.message, yaml_line(path, ["rows", index]))
    return err


def _parse_row(path, index, raw, base, smoke_profile, columns, metrics, check_data, cli_overrides) -> Row:
    if not isinstance(raw, dict):
        raise ExperimentError(
            path,
            f"rows[{index}]",
            None,
            f"expected a mapping, got {type(raw).__name__}",
            yaml_line(path, ["rows", index]),
        )
    where = str(raw.get("label", f"rows[{index}]"))
    check_keys(path, where, "", raw, ROW_KEYS)
    if "label" not in raw:
        raise ExperimentError(
            path, where, "label", "missing; expected a short name for the row", yaml_line(path, ["rows", index])
        )
    label = expect(path, where, "label", raw["label"], str)
    cells = expect(path, label, "cells", raw.get("cells") or {}, dict)
    check_keys(path, label, "cells.", cells, columns)
    paper, official = (reference_numbers(path, label, key, raw, metrics) for key in ("paper", "official"))
    cited = expect(path, label, "cited", raw.get("cited", False), bool)
    overrides = expect(path, label, "overrides", raw.get("overrides") or {}, dict)
    notes = str(raw.get("notes", ""))
    if cited:
        if overrides:
            raise ExperimentError(
                path, label, "overrides", "a cited row has the paper's numbers only; expected no overrides"
            )
        return Row(label, dict(cells), paper, {}, True, (), notes, {}, official)
    check_sections(path, label, overrides)
    full, seeds = resolve(path, label, base, overrides, None, check_data, cli_overrides)
    try:
        smoke, smoke_seeds = resolve(path, label, base, overrides, smoke_profile, False, cli_overrides)
    except ExperimentError as e:
        raise ExperimentError(path, label, e.key, f"with the smoke profile: {e.message}") from None
    if smoke_seeds != seeds or smoke.train.seed != full.train.seed:
        raise ExperimentError(
            path, SMOKE, "train.seed", "the smoke profile cannot change a row's seeds; expected no train.seed in smoke:"
        )

    def fail(key, message):
        raise ExperimentError(path, label, key, message, yaml_line(path, ["rows", index] + key.split(".")))

    # the written cells describe the row as written; a command-line override changes what is derived
    as_written = resolve(path, label, base, overrides, None, False)[0] if cli_overrides else full
    derive_cells(columns, cells, as_written, fail)
    cells = derive_cells(columns, cells, full, lambda key, message: None)
    configs = {"full": full, "smoke": smoke}
    command_line = {f"{section}.{key}" for section, values in dict(cli_overrides).items() for key in (values or {})}
    changes = tuple(c for c in smoke_profile.changes(overrides) if c[0] not in command_line)
    return Row(label, cells, paper, overrides, False, seeds, notes, configs, official, changes, dict(cli_overrides))


# ------------------------------------------------------------------------------------------- resolving


def row_provenance(experiment: Experiment, label: str, scale: Optional[str] = None) -> Dict[str, Tuple[Any, str]]:
    """:func:`provenance` of a (non-cited) row of a loaded experiment, at ``scale`` (default: the experiment's)."""
    row = experiment.row(label)
    smoke = experiment.smoke_profile if (scale or experiment.scale) == "smoke" else None
    return provenance(experiment.base, row.overrides, smoke, row.command_line, experiment.path, label)
