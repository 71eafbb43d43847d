"""The experiment's table in LaTeX as a paper sets it, ready to ``\\input`` (pure; booktabs, graphicx, amssymb).

Two files per experiment:

- ``<name>_compact.tex``, the one to paste: the paper's, the official code's and our lines under each row; each
  number of ours followed, in a smaller font and a column of its own, by its difference to the reference it is
  held to (the official code's number where the row has one, else the paper's) and the noise marker;
- ``<name>.tex``, the full record: the same lines with both differences and the provenance of ours as columns.

Both are ``table*`` floats set as papers set them: caption above (the experiment's own caption and one short
sentence), booktabs rules, ``\\checkmark`` for a switch that is on, true minus signs, a value column right-aligned
beside its small difference column, and the long notes (references, noise, devices, provenance) as a footnote
under the table. The tabular is scaled down to the text width only when it is wider. Every string that comes
from a user (caption, labels, cells) or a run is escaped; common symbols (✓, ±, ≈, arrows, dashes, accented
Latin letters, ...) become their LaTeX spelling, and any other non-ASCII character is an error that names the
character and where it is, rather than a file that does not compile.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import pandas as pd

from harness.grid import Experiment
from harness.metrics import BY_NAME, NOISE_BAND_AP, REFERENCE_DEVICE, RELEASED_BAND_AP
from harness.report import noise
from harness.report.groups import (
    COLUMN_TITLES,
    LABEL,
    PROVENANCE,
    Cell,
    Group,
    Style,
    build_groups,
    cell_value,
    devices_shown,
    has_official,
    markers_shown,
    paper_source,
    released_shown,
    scales_shown,
    undefined_shown,
)
from harness.report.tex_escape import check_experiment_strings, tex_escape, tex_text
from harness.report.variant import Variant


def _tex_signed(value: float, decimals: int) -> str:
    """A difference with a true minus sign (math mode): ``$-0.3$``, ``$+0.4$``."""
    return f"${value:+.{decimals}f}$"


TEX = Style(
    check=r"\checkmark",
    pm=r"$\pm$",
    dash="--",
    escape=tex_escape,
    signed=_tex_signed,
    markers={noise.WITHIN: r"$\approx$", noise.ABOVE: r"$\uparrow$", noise.BELOW: r"$\downarrow$"},
)
TEX_COLUMN_TITLES = {**COLUMN_TITLES, "K": "$K$"}
SOURCES = {"paper": "Paper", "official": "Official code"}
PACKAGES = "booktabs,graphicx,amssymb"


def _title(column: str) -> str:
    return TEX_COLUMN_TITLES.get(column) or tex_escape(column)


def _label(name: str, suffix: str = "") -> str:
    return "tab:" + re.sub(r"[^A-Za-z0-9:.-]", "-", name) + suffix


def _note_marks(groups: Sequence[Group]) -> Dict[str, str]:
    """A footnote letter per device a machine-dependent number of ours was measured on, in table order."""
    return {name: "abcdefghijklmnopqrstuvwxyz"[i % 26] for i, (name, _) in enumerate(devices_shown(groups))}


def _extra(cell: Cell, compact: bool, marks: Dict[str, str]) -> str:
    """What follows a number in its small column: the difference(s), the noise marker, the device's note."""
    parts = []
    if compact and cell.held:
        parts.append(f"{{\\scriptsize {cell.held}}}")
    elif not compact and cell.deltas:
        parts.append("{\\scriptsize (" + "\\,/\\,".join(cell.deltas) + ")}")
    if cell.marker:
        parts.append(cell.marker)
    text = "\\,".join(parts)
    letters = ",".join(dict.fromkeys(marks[d] for d in cell.devices if d in marks))
    if letters:
        text += f"\\textsuperscript{{{letters}}}"
    return text


def _tabular(
    lead: Sequence[str],
    groups: Sequence[Group],
    metrics: Sequence[str],
    provenance: bool,
    compact: bool,
    align: Sequence[str],
) -> List[str]:
    """Per metric a right-aligned value column, and where any line has one a small column beside it
    (``r@{\\,}l``) for the differences and marks, so that values stay aligned and narrow."""
    marks = _note_marks(groups)
    lines = [(g, i, line) for g in groups for i, line in enumerate(g.lines)]
    extras = {
        (id(line), k): _extra(cell, compact, marks) for _, _, line in lines for k, cell in enumerate(line.metrics)
    }
    paired = [any(extras[(id(line), k)] for _, _, line in lines) for k in range(len(metrics))]
    n_lead, n_prov = len(lead), len(PROVENANCE) if provenance else 0
    spec = "".join(align) + "l" + "".join("r@{\\,}l" if pair else "r" for pair in paired) + "l" * n_prov
    header = (
        [_title(c) for c in lead]
        + ["Source"]
        + [
            f"\\multicolumn{{2}}{{c}}{{{BY_NAME[m].title_tex}}}" if pair else BY_NAME[m].title_tex
            for m, pair in zip(metrics, paired)
        ]
        + [tex_escape(p.capitalize()) for p in PROVENANCE[:n_prov]]
    )
    out = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    for k, group in enumerate(groups):
        if k:
            out.append("\\addlinespace")
        for i, line in enumerate(group.lines):
            cells = (group.lead if i == 0 else [""] * n_lead) + [_source(line.source)]
            for j, cell in enumerate(line.metrics):
                cells.append(cell.value)
                if paired[j]:
                    cells.append(extras[(id(line), j)])
            if provenance:
                cells += line.provenance or [""] * n_prov
            out.append(" & ".join(cells) + " \\\\")
    return out + ["\\bottomrule", "\\end{tabular}"]


def _alignment(experiment: Experiment, lead: Sequence[str]) -> List[str]:
    """``c`` for a lead column of switches and numbers (check marks, K, epochs), as the paper centres them;
    ``l`` for text."""
    out = []
    for column in lead:
        values = [cell_value(row, column) for row in experiment.rows] if column != LABEL else [""]
        short = all(v is None or isinstance(v, (bool, int, float)) for v in values)
        out.append("c" if short and any(v is not None for v in values) else "l")
    return out


def _source(source: str) -> str:
    return tex_escape(SOURCES.get(source, source[:1].upper() + source[1:]))


def _float(body: List[str], caption: str, label: str, notes: List[str], size: str) -> List[str]:
    """A ``table*`` with its caption above, the tabular shrunk to the text width only when it is wider
    (graphicx's \\resizebox sees the natural \\width in its arguments), and the notes under it."""
    out = [
        "\\begin{table*}[t]",
        "\\centering",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
        "\\smallskip",
        size,
        "\\setlength{\\tabcolsep}{4pt}",
        "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
    ]
    out += body
    out.append("}")
    if notes:
        out += ["\\par\\smallskip", "{\\footnotesize\\raggedright " + " ".join(notes) + "\\par}"]
    return out + ["\\end{table*}", ""]


def _caption(experiment: Experiment, groups: Sequence[Group], variant: Optional[Variant] = None) -> str:
    """The experiment's own caption, which lines the table has, and a variant's overrides; the rest is in the
    notes."""
    official = any(has_official(g.row) for g in groups)
    ours = bool(scales_shown(groups))
    paper = any(line.kind == "paper" for g in groups for line in g.lines)
    kinds = [k for k, shown in (("paper", paper), ("official code", official), ("ours", ours)) if shown]
    what = "" if len(kinds) < 2 else (", ".join(kinds[:-1]) + " and " + kinds[-1]).capitalize() + "."
    parts = [tex_text(experiment.caption.strip()), what]
    if variant:
        parts.append(
            "Not the experiment as written: command-line overrides "
            + "; ".join(variant.description(lambda text: f"\\texttt{{{tex_escape(text)}}}"))
            + "."
        )
    return " ".join(p for p in parts if p)


def _notes(experiment: Experiment, groups: Sequence[Group], compact: bool) -> List[str]:
    """The table's footnote: where the numbers come from and how to read ours."""
    official = any(has_official(g.row) for g in groups)
    scales = scales_shown(groups)
    source = paper_source(experiment)
    notes = []
    refs = []
    if source:
        refs.append(f"Paper: {tex_escape(source)}")
    if official:
        refs.append("official code: the released code's results as its README reports them (same model)")
    if refs:
        notes.append("; ".join(refs) + ".")
    seeds = any(", " in line.source and "seeds" in line.source for g in groups for line in g.lines)
    spread = "mean$\\pm$std over seeds; " if seeds else ""
    if "full" in scales:
        if compact:
            notes.append(
                f"Ours: {spread}small numbers: the difference to "
                + (
                    "the official code's number where the row has one, else to the paper's."
                    if official
                    else "the paper's number."
                )
            )
        else:
            notes.append(
                f"Ours: {spread}in parentheses the difference to "
                "the paper"
                + (
                    " / to the official code (a reproduction is held to the official code's "
                    "numbers where given, to the paper's otherwise)"
                    if official
                    else ""
                )
                + "."
            )
    elif seeds:
        notes.append("Ours: mean$\\pm$std over seeds.")
    if markers_shown(groups):
        notes.append(
            f"$\\approx$: within the noise of that reference (the seeds' std, or $\\pm${NOISE_BAND_AP} "
            "AP for one run"
            + (
                f"; $\\pm${RELEASED_BAND_AP} AP for a released checkpoint evaluated here"
                if released_shown(groups)
                else ""
            )
            + "); $\\uparrow$/$\\downarrow$: above/below it."
        )
    if undefined_shown(groups, TEX):
        notes.append("--: no such number (COCOeval's $-1$: the evaluated split has no object of that size).")
    if "smoke" in scales:
        notes.append(
            "Smoke lines: laptop scale on a synthetic dataset, a check that the pipeline runs; not "
            "comparable with the paper, so without differences."
        )
    marks = _note_marks(groups)
    for name, same_class in devices_shown(groups):
        notes.append(
            f"\\textsuperscript{{{marks[name]}}}Measured on {tex_escape(name)}"
            + ("." if same_class else f"; not set against the paper's ({REFERENCE_DEVICE}).")
        )
    return notes


def _header_comment(experiment: Experiment, what: str, variant: Optional[Variant] = None) -> str:
    lines = [
        f"% {experiment.name}: {what}, generated by harness.report from the records of results/runs/; do not "
        f"edit. Needs \\usepackage{{{PACKAGES}}}."
    ]
    if variant:
        lines.append(
            f"% Variant {variant.name}: not the experiment as written; the canonical table is "
            f"{experiment.name}.tex. Command-line overrides:"
        )
        lines += [f"%   {line}" for line in variant.description()]
    return "\n".join(line.replace("\n", " ") for line in lines)


def render_latex(experiment: Experiment, df: pd.DataFrame, variant: Optional[Variant] = None) -> str:
    """The full record: every line of the report with both differences and the provenance of ours as columns; a
    ``variant`` names its overrides in the header comment and the caption."""
    check_experiment_strings(experiment)
    lead, groups = build_groups(experiment, df, TEX, lambda cells: [tex_escape(str(c)) for c in cells])
    body = _tabular(
        lead, groups, experiment.metrics, provenance=True, compact=False, align=_alignment(experiment, lead)
    )
    name = variant.name if variant else experiment.name
    return "\n".join(
        [_header_comment(experiment, "full record", variant)]
        + _float(
            body,
            _caption(experiment, groups, variant),
            _label(name),
            _notes(experiment, groups, compact=False),
            "\\footnotesize",
        )
    )


def render_latex_compact(experiment: Experiment, df: pd.DataFrame, variant: Optional[Variant] = None) -> str:
    """For a paper: the same lines with the difference to the reference each number is held to; the provenance
    of ours in the notes."""
    check_experiment_strings(experiment)
    lead, groups = build_groups(experiment, df, TEX, lambda cells: [tex_escape(str(c)) for c in cells])
    body = _tabular(
        lead, groups, experiment.metrics, provenance=False, compact=True, align=_alignment(experiment, lead)
    )
    name = variant.name if variant else experiment.name
    return "\n".join(
        [_header_comment(experiment, "compact table for a paper", variant)]
        + _float(
            body,
            _caption(experiment, groups, variant),
            _label(name, "-compact"),
            _notes(experiment, groups, compact=True) + _provenance_notes(groups),
            "\\small",
        )
    )


def _provenance_notes(groups: Sequence[Group]) -> List[str]:
    """One sentence per scale: the distinct datasets, epochs, devices, commits and dates of our lines."""
    notes = []
    for scale in scales_shown(groups):
        values: Dict[str, Dict[str, None]] = {p: {} for p in PROVENANCE[1:]}
        for g in groups:
            for line in g.lines:
                if line.scale == scale:
                    for key, value in zip(PROVENANCE[1:], line.provenance[1:]):
                        if value:
                            values[key][value] = None
        described = "; ".join(f"{key} {' / '.join(v)}" for key, v in values.items() if v)
        notes.append(f"Ours ({scale}): {described}." if described else f"Ours ({scale}).")
    return notes
