"""The experiment's table in LaTeX (booktabs + graphicx), ready to ``\\input`` (pure).

Two files per experiment:

- ``<name>.tex``, the full record: every line of the Markdown report with the provenance of ours as columns;
- ``<name>_compact.tex``, for a paper: the paper's, the official code's and our lines side by side under each
  row, without the provenance columns (it follows the table as a note).

Both are ``table*`` floats whose tabular is scaled down to the text width only when it is wider. Every string
that comes from a user (caption, labels, cells) or a run is escaped; common symbols (✓, ±, ≈, arrows, dashes,
accented Latin letters, ...) become their LaTeX spelling, and any other non-ASCII character is an error that
names the character and where it is, rather than a file that does not compile.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Dict, List, Optional, Sequence

import pandas as pd

from harness.grid import Experiment, ExperimentError
from harness.metrics import BY_NAME, NOISE_BAND_AP
from harness.report import noise
from harness.report.groups import (LABEL, PROVENANCE, Group, Style, build_groups, has_official, markers_shown,
                                   scales_shown)
from harness.report.variant import Variant


class LatexError(ValueError):
    """A character that has no LaTeX spelling here."""


_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "|": r"$|$", "<": r"$<$", ">": r"$>$"}
# Symbols users put in cells and captions, spelled with LaTeX's own commands (no package beyond the kernel).
_SYMBOLS = {"✓": r"$\surd$", "✔": r"$\surd$", "☑": r"$\surd$", "✗": r"$\times$", "✘": r"$\times$",
            "×": r"$\times$", "±": r"$\pm$", "≈": r"$\approx$", "≤": r"$\leq$", "≥": r"$\geq$", "≠": r"$\neq$",
            "→": r"$\rightarrow$", "←": r"$\leftarrow$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
            "–": "--", "—": "---", "−": "-", "‘": "`", "’": "'", "“": "``", "”": "''", "…": r"\ldots{}",
            "•": r"\textbullet{}", "·": r"$\cdot$", "°": r"$^\circ$", "µ": r"$\mu$", "μ": r"$\mu$",
            "Δ": r"$\Delta$", "α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$", "λ": r"$\lambda$",
            "σ": r"$\sigma$", "²": r"$^2$", "³": r"$^3$", "√": r"$\surd$", "®": r"\textregistered{}",
            "™": r"\texttrademark{}", "©": r"\copyright{}", "£": r"\pounds{}", "§": r"\S{}", "¶": r"\P{}",
            "\u00a0": "~", "ß": r"\ss{}", "æ": r"\ae{}", "Æ": r"\AE{}", "ø": r"\o{}", "Ø": r"\O{}",
            "œ": r"\oe{}", "Œ": r"\OE{}", "ł": r"\l{}", "Ł": r"\L{}", "ı": r"\i{}"}
# Combining accents (after NFD decomposition) -> LaTeX accent commands: é -> \'{e}.
_ACCENTS = {"\u0301": "'", "\u0300": "`", "\u0302": "^", "\u0308": '"', "\u0303": "~", "\u0327": "c",
            "\u030c": "v", "\u030a": "r", "\u0304": "=", "\u0306": "u", "\u0307": ".", "\u030b": "H",
            "\u0328": "k"}


def tex_escape(text: str) -> str:
    """``text`` as LaTeX that typesets it; :class:`LatexError` for a character without a spelling here."""
    out: List[str] = []
    for char in unicodedata.normalize("NFC", text):
        if char in _SPECIAL:
            out.append(_SPECIAL[char])
        elif char in _SYMBOLS:
            out.append(_SYMBOLS[char])
        elif char == "\n" or char == "\t":
            out.append(" ")
        elif char.isascii():
            out.append(char)
        else:
            out.append(_accented(char))
    return "".join(out)


def _accented(char: str) -> str:
    base, *marks = unicodedata.normalize("NFD", char)
    if base.isascii() and base.isalpha() and marks and all(m in _ACCENTS for m in marks):
        spelled = base
        for mark in marks:
            spelled = f"\\{_ACCENTS[mark]}{{{spelled}}}"
        return spelled
    name = unicodedata.name(char, "unnamed")
    raise LatexError(f"cannot write {char!r} (U+{ord(char):04X} {name}) in LaTeX; use ASCII, accented Latin "
                     f"letters or one of {' '.join(sorted(set(_SYMBOLS) - {chr(0xa0)}))}")


def tex_text(text: str) -> str:
    """Escaped prose with "quoted" words as LaTeX quotes."""
    return re.sub(r'"([^"]*)"', r"``\1''", tex_escape(text))


def check_experiment_strings(experiment: Experiment) -> None:
    """Every user string of the experiment has a LaTeX spelling; else an :class:`ExperimentError` naming the
    file, the row and the key (before a report is written)."""
    fields = [(None, "table", experiment.table), (None, "caption", experiment.caption)]
    for row in experiment.rows:
        fields.append((row.label, "label", row.label))
        fields += [(row.label, f"cells.{k}", str(v)) for k, v in row.cells.items() if v is not None]
    for row, key, text in fields:
        try:
            tex_escape(text)
        except LatexError as err:
            raise ExperimentError(experiment.path, row, key, str(err)) from None


TEX = Style(check=r"$\surd$", pm=r"$\pm$", dash="--", escape=tex_escape,
            markers={noise.WITHIN: r"$\approx$", noise.ABOVE: r"$\uparrow$", noise.BELOW: r"$\downarrow$"})
COLUMN_TITLES = {"method": "Method", "epochs": "Epochs", "ms_inputs": "MS inputs", "ms_attention": "MS attention",
                 "K": "$K$", "fpn": "FPNs", "backbone": "Backbone", "tta": "TTA", LABEL: "Row"}


def _title(column: str) -> str:
    return COLUMN_TITLES.get(column) or tex_escape(column)


def _label(name: str, suffix: str = "") -> str:
    return "tab:" + re.sub(r"[^A-Za-z0-9:.-]", "-", name) + suffix


def _tabular(lead: Sequence[str], groups: Sequence[Group], metrics: Sequence[str], provenance: bool) -> List[str]:
    n_lead, n_metrics, n_prov = len(lead), len(metrics), len(PROVENANCE) if provenance else 0
    spec = "l" * (n_lead + 1) + "r" * n_metrics + "l" * n_prov
    first_metric = n_lead + 2                          # 1-based column of the first metric
    refs = "paper / official code / ours" if any(has_official(g.row) for g in groups) else "paper / ours"
    spans = [f"\\multicolumn{{{n_metrics}}}{{c}}{{{refs}}}"]
    rules = f"\\cmidrule(lr){{{first_metric}-{first_metric + n_metrics - 1}}}"
    if provenance:
        spans.append(f"\\multicolumn{{{n_prov}}}{{c}}{{provenance of ours}}")
        rules += f"\\cmidrule(lr){{{first_metric + n_metrics}-{first_metric + n_metrics + n_prov - 1}}}"
    header = [_title(c) for c in lead] + ["Source"] + [BY_NAME[m].title_tex for m in metrics] + \
        [tex_escape(p.capitalize()) for p in PROVENANCE[:n_prov]]
    out = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join([""] * (first_metric - 1) + spans) + " \\\\",
           rules, " & ".join(header) + " \\\\", "\\midrule"]
    for k, group in enumerate(groups):
        if k:
            out.append("\\addlinespace")
        for i, line in enumerate(group.lines):
            cells = (group.lead if i == 0 else [""] * n_lead) + [tex_escape(line.source)] + line.metrics
            if provenance:
                cells += line.provenance or [""] * n_prov
            out.append(" & ".join(cells) + " \\\\")
    return out + ["\\bottomrule", "\\end{tabular}"]


def _float(body: List[str], caption: str, label: str, notes: List[str]) -> List[str]:
    """A ``table*`` whose tabular shrinks to the text width only when it is wider (graphicx's \\resizebox
    sees the natural \\width in its arguments)."""
    out = ["\\begin{table*}[t]", "\\centering", "\\small", "\\setlength{\\tabcolsep}{4pt}",
           "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%"]
    out += body
    out.append("}")
    if notes:
        out += ["\\par\\smallskip", "{\\footnotesize\\raggedright " + " ".join(notes) + "\\par}"]
    return out + [f"\\caption{{{caption}}}", f"\\label{{{label}}}", "\\end{table*}", ""]


def _caption(experiment: Experiment, groups: Sequence[Group], what: str, variant: Optional[Variant] = None) -> str:
    official = any(has_official(g.row) for g in groups)
    scales = scales_shown(groups)
    parts = [tex_text(experiment.caption.strip()), what]
    if variant:
        parts.append("Not the experiment as written: command-line overrides " +
                     "; ".join(variant.description(lambda text: f"\\texttt{{{tex_escape(text)}}}")) + ".")
    if scales:
        parts.append("Ours: mean$\\pm$std over seeds where there are several, and in parentheses the "
                     "difference to the paper" + (" / to the official code" if official else "") + ".")
        if official:
            parts.append("A reproduction is held to the official code's numbers where given, to the paper's "
                         "otherwise.")
    if markers_shown(groups, TEX):
        parts.append(f"$\\approx$: within the noise of that reference (the seeds' std, or $\\pm${NOISE_BAND_AP} "
                     "AP for one run); $\\uparrow$/$\\downarrow$: above/below it.")
    if "smoke" in scales:
        parts.append("Smoke lines: laptop scale on a synthetic dataset, a check that the pipeline runs, not "
                     "comparable with the paper.")
    return " ".join(p for p in parts if p)


def _header_comment(experiment: Experiment, what: str, variant: Optional[Variant] = None) -> str:
    lines = [f"% Table {experiment.table} ({experiment.name}), {what}, generated by harness.report from "
             f"results/{experiment.name}/; do not edit. Needs \\usepackage{{booktabs,graphicx}}."]
    if variant:
        lines.append(f"% Variant {variant.name}: not the experiment as written; the canonical table is "
                     f"{experiment.name}.tex. Command-line overrides:")
        lines += [f"%   {line}" for line in variant.description()]
    return "\n".join(line.replace("\n", " ") for line in lines)


def render_latex(experiment: Experiment, df: pd.DataFrame, variant: Optional[Variant] = None) -> str:
    """The full table: every line of the report, the provenance of ours as columns; a ``variant`` names its
    overrides in the header comment and the caption."""
    check_experiment_strings(experiment)
    lead, groups = build_groups(experiment, df, TEX, lambda cells: [tex_escape(str(c)) for c in cells])
    official = any(has_official(g.row) for g in groups)
    what = ("Lines: the paper's numbers" + (", the official code's (its README, same model)" if official else "")
            + " and ours, with the provenance of each of our lines.")
    body = _tabular(lead, groups, experiment.metrics, provenance=True)
    name = variant.name if variant else experiment.name
    return "\n".join([_header_comment(experiment, "full record", variant)] +
                     _float(body, _caption(experiment, groups, what, variant), _label(name), []))


def render_latex_compact(experiment: Experiment, df: pd.DataFrame, variant: Optional[Variant] = None) -> str:
    """For a paper: the same lines without the provenance columns; the provenance of ours as a note."""
    check_experiment_strings(experiment)
    lead, groups = build_groups(experiment, df, TEX, lambda cells: [tex_escape(str(c)) for c in cells])
    body = _tabular(lead, groups, experiment.metrics, provenance=False)
    official = any(has_official(g.row) for g in groups)
    what = "Paper" + (", official code (its README, same model)" if official else "") + " and ours."
    name = variant.name if variant else experiment.name
    return "\n".join([_header_comment(experiment, "compact", variant)] +
                     _float(body, _caption(experiment, groups, what, variant), _label(name, "-compact"),
                            _provenance_notes(groups)))


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
