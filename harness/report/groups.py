"""An experiment's table as row groups of formatted lines, shared by the Markdown and LaTeX renderers (pure).

Per row of the experiment, in order: the paper's line (if the row has paper numbers), the official code's line
(if it has official numbers), and one line per scale at which we have numbers ("ours (full)", "ours (smoke)").
A line with no number is not printed; a row with no line of ours says its state ("not run", "full failed") in
the source cell of its last line, or on a line of its own when it has no other. Each number is a :class:`Cell`:
ours is ``mean±std`` (the std only over >= 2 seeds) with its differences to the paper and, for a row with official
numbers, to the official code, the one it is held to, and a noise marker (AP columns, :mod:`.noise`). Differences
are only between like and like: a smoke line has none (another model size on another dataset:
:data:`harness.metrics.COMPARED_SCALES`), and a number that depends on the machine (FPS, GPU hours) carries its
device class and has differences only where it was measured on the references' class (:mod:`.devices`). A COCO
number the evaluation could not compute (COCOeval's -1: no object of that size in the split) reads as the
style's dash.

The descriptive cells come from the row's ``cells``; a column the row leaves out is filled from the row's
override of the same key (``axes`` rows: the swept value). Whenever the cells do not tell every row apart, a
"Row" column with the labels comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from harness.grid import SCALES, Experiment, Row, collapsed_at_smoke
from harness.metrics import BY_NAME, COMPARED_SCALES, REFERENCE_DEVICE_CLASS
from harness.report import noise
from harness.report.collect import aggregate, reproduced, run_states
from harness.report.devices import classes, comparable, device_class, split_devices

PROVENANCE = ("scale", "dataset", "epochs trained", "device", "commit", "date")
LABEL = "label"  # the lead column holding row labels
# the titles of the descriptive columns an experiment's ``columns`` name (others print as written)
COLUMN_TITLES = {
    "method": "Method",
    "epochs": "Epochs",
    "ms_inputs": "MS inputs",
    "ms_attention": "MS attention",
    "K": "K",
    "fpn": "FPNs",
    "backbone": "Backbone",
    "tta": "TTA",
    "publisher": "Publisher",
    LABEL: "Row",
}


def _plain_signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}"


@dataclass(frozen=True)
class Style:
    check: str  # a true boolean cell
    pm: str
    dash: str  # a missing difference; a COCO number the evaluation could not compute
    markers: Dict[str, str]  # noise verdict -> symbol
    escape: Callable[[str], str]
    signed: Callable[[float, int], str] = _plain_signed  # a difference: value, decimals -> "+0.4" / "-0.3"


@dataclass(frozen=True)
class Cell:
    """One number of a line, in a style's spelling; empty (``value == ""``) where nothing was measured."""

    value: str = ""  # "44.2±0.3", "43.8", or the style's dash (COCOeval had no value)
    deltas: Tuple[str, ...] = ()  # to the paper and (a row with official numbers) the official code
    held: str = ""  # the difference to the reference the number is held to (compact tables)
    marker: str = ""  # noise verdict symbol
    device: str = ""  # the device class of a machine-dependent number of ours ("CPU", "V100")
    devices: Tuple[str, ...] = ()  # the device names it was measured on (notes)


@dataclass(frozen=True)
class Line:
    kind: str  # paper | official | ours | state
    source: str
    metrics: List[Cell]
    provenance: List[str] = field(default_factory=list)  # ours lines only
    scale: str = ""


@dataclass(frozen=True)
class Group:
    row: Row
    lead: List[str]
    lines: List[Line]


# ------------------------------------------------------------------------------------------ cells


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def reference_cell(metric: str, value) -> Cell:
    """The paper's or the official code's number, as the paper prints it."""
    if missing(value):
        return Cell()
    if BY_NAME[metric].paper_as_given:
        return Cell(f"{value:g}")
    return Cell(f"{float(value):.1f}")


def ours_cell(
    metric: str,
    mean: float,
    std: float,
    n_runs: int,
    scale: str,
    row: Row,
    style: Style,
    devices: str = "",
    undefined: bool = False,
) -> Cell:
    """Our number of ``metric`` on a line: ``devices`` the aggregated names of the machines a machine-dependent
    number was measured on; ``undefined`` that the evaluation had no value for it (COCOeval's -1)."""
    if missing(mean):
        return Cell(style.dash) if undefined else Cell()
    decimals = BY_NAME[metric].decimals
    text = f"{mean:.{decimals}f}"
    if n_runs >= 2 and not missing(std):
        text += f"{style.pm}{std:.{decimals}f}"
    device_bound = BY_NAME[metric].device_field is not None
    found = classes(devices) if device_bound else []
    device = " / ".join(found)
    compared = scale in COMPARED_SCALES and comparable(metric, devices)
    cell = Cell(text, device=device, devices=tuple(split_devices(devices)) if device_bound else ())
    if not compared:  # a smoke line, or measured on another device class than the references'
        return cell
    references = [row.paper.get(metric)] + ([row.official.get(metric)] if has_official(row) else [])
    deltas: Tuple[str, ...] = ()
    if any(not missing(r) for r in references):
        deltas = tuple(style.dash if missing(r) else style.signed(mean - float(r), decimals) for r in references)
    _, held = noise.held_reference(row.paper, row.official, metric)
    held_text = style.signed(mean - held, decimals) if held is not None else ""
    verdict = noise.verdict(
        metric,
        mean - held if held is not None else math.nan,
        noise.band(metric, std, n_runs, scale, evaluation_only(row, scale)),
    )
    marker = style.markers[verdict] if verdict is not None else ""
    return Cell(text, deltas, held_text, marker, device, cell.devices)


def evaluation_only(row: Row, scale: str) -> bool:
    """The row evaluates a given checkpoint at ``scale`` (a released one): no training of ours behind it."""
    cfg = row.configs.get(scale)
    return cfg is not None and cfg.eval.eval_only


def has_official(row: Row) -> bool:
    return any(not missing(v) for v in row.official.values())


def _has_paper(row: Row) -> bool:
    return any(not missing(v) for v in row.paper.values())


# ------------------------------------------------------------------------------------------ lead columns


def _flat_overrides(tree, prefix="") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(_flat_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cell_value(row: Row, column: str):
    """The row's cell, else its override whose dotted key or last part is the column's name."""
    if column in row.cells:
        return row.cells[column]
    for key, value in _flat_overrides(row.overrides).items():
        if key == column or key.rsplit(".", 1)[-1] == column:
            return value
    return None


def _cell_text(value, style: Style) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return style.check if value else ""
    return style.escape(str(value))


def lead_columns(experiment: Experiment) -> List[str]:
    """The experiment's columns, preceded by the labels whenever two rows read the same (or a row reads
    nothing at all) in them."""
    if not experiment.columns:
        return [LABEL]
    seen = set()
    for row in experiment.rows:
        key = tuple(_cell_text(cell_value(row, c), _PLAIN) for c in experiment.columns)
        if key in seen or not any(key):
            return [LABEL] + list(experiment.columns)
        seen.add(key)
    return list(experiment.columns)


_PLAIN = Style(check="x", pm="+-", dash="-", markers={}, escape=str)


# ------------------------------------------------------------------------------------------ groups


def build_groups(
    experiment: Experiment,
    df: pd.DataFrame,
    style: Style,
    format_provenance: Callable[[Sequence[str]], List[str]] = list,
) -> Tuple[List[str], List[Group]]:
    """(lead column keys, one :class:`Group` per row of the experiment)."""
    lead = lead_columns(experiment)
    agg = aggregate(df)
    collapsed = list(collapsed_at_smoke(experiment).values())  # once per report: it expands the grid twice
    groups = []
    for row in experiment.rows:
        cells = [style.escape(row.label) if c == LABEL else _cell_text(cell_value(row, c), style) for c in lead]
        lines: List[Line] = []
        if _has_paper(row) or row.cited:
            lines.append(
                Line(
                    "paper",
                    "paper (cited)" if row.cited else "paper",
                    [reference_cell(m, row.paper.get(m)) for m in experiment.metrics],
                )
            )
        if has_official(row):
            lines.append(
                Line("official", "official code", [reference_cell(m, row.official.get(m)) for m in experiment.metrics])
            )
        if not row.cited:
            ours = [
                line
                for scale in SCALES
                for line in _ours_lines(experiment, agg, row, scale, style, format_provenance, collapsed)
            ]
            if ours:
                lines += ours
            else:
                state = _state_text(df, row.label)
                if lines:
                    last = lines[-1]
                    lines[-1] = Line(last.kind, f"{last.source}; ours: {state}", last.metrics)
                else:
                    lines.append(Line("state", f"ours: {state}", [Cell()] * len(experiment.metrics)))
        groups.append(Group(row, cells, lines))
    return lead, groups


def _ours_lines(experiment, agg, row, scale, style, format_provenance, collapsed=()) -> List[Line]:
    """The row's own line at ``scale``; ``collapsed``: the groups of labels that are one smoke-scale run."""
    sub = agg[(agg["label"] == row.label) & (agg["scale"] == scale)]
    if not len(sub):
        return []
    r = sub.iloc[0]
    n_runs = int(r["n_runs"])
    undefined = set(str(r["undefined"]).split(", ")) if r["undefined"] else set()
    cells = []
    for m in experiment.metrics:
        mean, std = reproduced(agg, row.label, scale, m)
        device_field = BY_NAME[m].device_field
        cells.append(
            ours_cell(
                m,
                mean,
                std,
                n_runs,
                scale,
                row,
                style,
                devices=str(r[device_field] or "") if device_field else "",
                undefined=BY_NAME[m].field in undefined,
            )
        )
    if not any(cell.value and cell.value != style.dash for cell in cells):  # none of this table's columns
        return []
    source = f"ours ({scale})" + (f", {n_runs} seeds" if n_runs > 1 else "")
    if scale == "smoke":  # the smoke profile made this row one training with others: say which
        twins = [label for labels in collapsed if row.label in labels for label in labels if label != row.label]
        if twins:
            source += "; one run with " + ", ".join(repr(t) for t in twins)
    return [Line("ours", source, cells, format_provenance(provenance(r, scale)), scale)]


def provenance(r, scale: str) -> List[str]:
    """scale, dataset, epochs trained, device, commit, date of an aggregated line."""
    device = r["device"]
    if r["fps_device"] and r["fps_device"] != r["device"]:
        device = f"{device}; FPS: {r['fps_device']}" if device else f"FPS: {r['fps_device']}"
    if "reference" in f"{r['attn_impl']} {r['fps_attn_impl']}":  # never hide that a line ran the slow fallback
        device = f"{device}; attention: pure-PyTorch reference" if device else "attention: pure-PyTorch reference"
    commits = ", ".join(c[:7] for c in str(r["commit"]).split(", ") if c)
    dates = ", ".join(sorted({d[:10] for d in str(r["date"]).split(", ") if d}))
    return [scale, r["dataset"], r["epochs_range"], device, commits, dates]


def _state_text(df: pd.DataFrame, label: str) -> str:
    for scale in SCALES:
        states = [s for s in run_states(df, label, scale) if s != "new"]
        if states:
            return f"{scale} {'/'.join(states)}"
    return "not run"


def scales_shown(groups: Sequence[Group]) -> List[str]:
    return [s for s in SCALES if any(line.scale == s for g in groups for line in g.lines)]


def ours_cells(groups: Sequence[Group]):
    """Every cell of our lines."""
    return [cell for g in groups for line in g.lines if line.kind == "ours" for cell in line.metrics]


def markers_shown(groups: Sequence[Group], style: Style = None) -> bool:
    return any(cell.marker for cell in ours_cells(groups))


def released_shown(groups: Sequence[Group]) -> bool:
    """A row of the table evaluates a given (released) checkpoint at a compared scale: its band is another."""
    return any(evaluation_only(g.row, scale) for g in groups for scale in COMPARED_SCALES)


def undefined_shown(groups: Sequence[Group], style: Style) -> bool:
    """A COCO number the evaluation could not compute is in the table (it reads as ``style.dash``)."""
    return any(cell.value == style.dash for cell in ours_cells(groups))


def devices_shown(groups: Sequence[Group]) -> List[Tuple[str, bool]]:
    """(device name, whether it is of the references' class) of every machine-dependent number of ours, in
    table order."""
    names = dict.fromkeys(name for cell in ours_cells(groups) for name in cell.devices)
    return [(name, device_class(name) == REFERENCE_DEVICE_CLASS) for name in names]


# ------------------------------------------------------------------------------------------ titles


def first_sentence(text: str) -> str:
    """The caption's first sentence, without its full stop: a title."""
    text = " ".join((text or "").split())
    for i, char in enumerate(text):
        if (
            char == "."
            and (i + 1 == len(text) or text[i + 1] == " ")
            and not text[max(0, i - 3) : i].endswith(("e.g", "i.e", "vs", "al", "Fig", "Tab"))
        ):
            return text[:i]
    return text


def title(experiment: Experiment, name: Optional[str] = None) -> str:
    """A report's or figure's title: the experiment's own name (a variant's, if given) and the first sentence
    of its own caption; never the paper table its file may have been copied from."""
    sentence = first_sentence(experiment.caption)
    return f"{name or experiment.name}: {sentence}" if sentence else (name or experiment.name)


def paper_source(experiment: Experiment) -> str:
    """Where the paper's numbers of the rows come from, ``""`` without any: "the paper's Table 2"."""
    if not any(_has_paper(row) for row in experiment.rows):
        return ""
    table = str(experiment.table or "").strip()
    if not table or table == experiment.name:
        return "the paper"
    return f"the paper's Table {table}"
