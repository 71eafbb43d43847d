"""Render an experiment's results as the paper's table, in Markdown and LaTeX (booktabs).

Pure: the output depends only on the experiment and the collected DataFrame, so regenerating gives the
same files. Every paper row is printed with the paper's numbers; under it one line per scale that has
results ("ours (full)", "ours (smoke)") with each value and its difference to the paper, and the
provenance of those numbers. A row without results gets an empty line saying so; nothing is made up.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import pandas as pd

from harness.grid import SCALES, Experiment
from harness.metrics import BY_NAME
from harness.report.collect import aggregate, collect, reproduced, run_states
from harness.report.figures import write_figures
from harness.store import atomic_write_text

COLUMN_TITLES = {"method": "Method", "epochs": "Epochs", "ms_inputs": "MS inputs",
                 "ms_attention": "MS attention", "K": "K", "fpn": "FPNs", "backbone": "Backbone",
                 "tta": "TTA"}
PROVENANCE = ("scale", "dataset", "epochs trained", "device", "commit", "date")


@dataclass(frozen=True)
class Style:
    check: str
    pm: str
    escape: Callable[[str], str]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def tex_text(text: str) -> str:
    """Escaped prose with "quoted" words as LaTeX quotes."""
    return re.sub(r'"([^"]*)"', r"``\1''", tex_escape(text))


MD = Style(check="✓", pm="±", escape=_md_escape)
TEX = Style(check=r"$\surd$", pm=r"$\pm$", escape=tex_escape)


# ------------------------------------------------------------------------------------------ formatting

def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _paper_cell(metric: str, value) -> str:
    if _is_nan(value):
        return ""
    if BY_NAME[metric].paper_as_given:
        return f"{value:g}"
    return f"{float(value):.1f}"


def _ours_cell(metric: str, mean: float, std: float, paper, style: Style) -> str:
    if _is_nan(mean):
        return ""
    decimals = BY_NAME[metric].decimals
    text = f"{mean:.{decimals}f}"
    if not _is_nan(std):
        text += f"{style.pm}{std:.{decimals}f}"
    if not _is_nan(paper):
        delta = mean - float(paper)
        text += f" ({delta:+.{decimals}f})"
    return text


def _descriptive_cell(value, style: Style) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return style.check if value else ""
    return style.escape(str(value))


# ------------------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Line:
    cells: List[str]
    first_of_group: bool


def _lead_columns(experiment: Experiment) -> List[str]:
    return list(experiment.columns) or ["label"]


def build_table(experiment: Experiment, df: pd.DataFrame, style: Style):
    """(header, lines): the descriptive columns, a source column, the metrics, the provenance."""
    lead = _lead_columns(experiment)
    agg = aggregate(df)
    lines: List[Line] = []
    for row in experiment.rows:
        lead_cells = [_descriptive_cell(row.label if c == "label" else row.cells.get(c), style) for c in lead]
        source = "paper (cited)" if row.cited else "paper"
        paper_cells = [_paper_cell(m, row.paper.get(m)) for m in experiment.metrics]
        lines.append(Line(lead_cells + [source] + paper_cells + [""] * len(PROVENANCE), True))
        if row.cited:
            continue
        shown = False
        for scale in SCALES:
            sub = agg[(agg["label"] == row.label) & (agg["scale"] == scale)]
            if not len(sub):
                continue
            shown = True
            r = sub.iloc[0]
            metric_cells = []
            for m in experiment.metrics:
                mean, std = reproduced(agg, row.label, scale, m)
                metric_cells.append(_ours_cell(m, mean, std, row.paper.get(m), style))
            device = r["device"]
            if r["fps_device"] and r["fps_device"] != r["device"]:
                device = f"{device}; FPS: {r['fps_device']}" if device else f"FPS: {r['fps_device']}"
            if "reference" in r["attn_impl"]:      # never hide that a line ran the slow fallback
                device = f"{device}; attention: pure-PyTorch reference" if device else "attention: pure-PyTorch reference"
            commits = ", ".join(c[:7] for c in str(r["commit"]).split(", ") if c)
            dates = ", ".join(sorted({d[:10] for d in str(r["date"]).split(", ") if d}))
            source_text = f"ours ({scale})" + (f", {r['n_runs']} seeds" if r["n_runs"] > 1 else "")
            provenance = [scale, r["dataset"], r["epochs_range"], device, commits, dates]
            lines.append(Line([""] * len(lead) + [source_text] + metric_cells +
                              [style.escape(str(p)) for p in provenance], False))
        if not shown:
            lines.append(Line([""] * len(lead) + [f"ours: {_state_text(df, row.label)}"] +
                              [""] * len(experiment.metrics) + [""] * len(PROVENANCE), False))
    return lead, lines


def _state_text(df: pd.DataFrame, label: str) -> str:
    for scale in SCALES:
        states = [s for s in run_states(df, label, scale) if s != "new"]
        if states:
            return f"{scale} {'/'.join(states)}"
    return "not run"


# ------------------------------------------------------------------------------------------- renderers

def render_markdown(experiment: Experiment, df: pd.DataFrame) -> str:
    lead, lines = build_table(experiment, df, MD)
    header = [COLUMN_TITLES.get(c, c) if c != "label" else "Row" for c in lead] + ["source"] + \
        [BY_NAME[m].title_md for m in experiment.metrics] + list(PROVENANCE)
    out = [f"# Table {experiment.table} (`{experiment.name}`)", "", experiment.caption.strip(), ""]
    if experiment.description.strip():
        out += [experiment.description.strip(), ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(":--" if i < len(lead) + 1 else "--:" if i < len(lead) + 1 + len(experiment.metrics)
                             else ":--" for i in range(len(header))) + "|")
    for line in lines:
        out.append("| " + " | ".join(line.cells) + " |")
    for paragraph in _legend(experiment):
        out += ["", paragraph]
    out.append("")
    return "\n".join(out)


def _legend(experiment: Experiment) -> List[str]:
    return [
        "Lines `ours`: our value (difference to the paper's value); `a±b` is the mean and standard "
        "deviation over seeds. An empty cell was not measured; no number is filled in.",
        "Provenance: `full` is the paper's setting (COCO 2017); `smoke` is laptop scale on a synthetic "
        "COCO-format dataset and is not comparable with the paper's numbers. `epochs trained` counts the "
        "epochs actually run; `device` is where the run trained (and where FPS was measured, if "
        "different); `commit` and `date` identify the code and the day of the run. FLOPs are fvcore "
        "counts on the inputs each run records (`gflops_input`): a run measured without training counts "
        "one 3x800x1199 image, where the paper averages COCO val images (smaller after resizing), so "
        "compare ratios between rows.",
        f"Generated by `harness.report` from `results/{experiment.name}/`; regenerate with "
        f"`python run_experiment.py {_short_path(experiment.path)} --report`.",
    ]


def _short_path(path: str) -> str:
    """``experiments/table2.yaml`` however the file was named when loaded (keeps output stable)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def render_latex(experiment: Experiment, df: pd.DataFrame) -> str:
    """A booktabs table (needs only ``\\usepackage{booktabs}``), ready to ``\\input``."""
    lead, lines = build_table(experiment, df, TEX)
    n_metrics, n_prov = len(experiment.metrics), len(PROVENANCE)
    spec = "l" * (len(lead) + 1) + "r" * n_metrics + "l" * n_prov
    first_metric = len(lead) + 2                      # 1-based column of the first metric
    first_prov = first_metric + n_metrics
    header = [tex_escape(COLUMN_TITLES.get(c, c) if c != "label" else "Row") for c in lead] + ["Source"] + \
        [BY_NAME[m].title_tex for m in experiment.metrics] + [tex_escape(p.capitalize()) for p in PROVENANCE]
    groups = [""] * (first_metric - 1) + [
        f"\\multicolumn{{{n_metrics}}}{{c}}{{paper / ours (difference)}}",
        f"\\multicolumn{{{n_prov}}}{{c}}{{provenance of ours}}"]
    out = [f"% Table {tex_escape(experiment.table)} ({experiment.name}), generated by harness.report from "
           f"results/{experiment.name}/; do not edit. Needs \\usepackage{{booktabs}}.",
           "\\begin{table}[t]", "\\centering", "\\scriptsize", "\\setlength{\\tabcolsep}{3pt}",
           f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
           " & ".join(groups) + " \\\\",
           f"\\cmidrule(lr){{{first_metric}-{first_prov - 1}}}\\cmidrule(lr){{{first_prov}-{first_prov + n_prov - 1}}}",
           " & ".join(header) + " \\\\", "\\midrule"]
    for i, line in enumerate(lines):
        if line.first_of_group and i > 0:
            out.append("\\addlinespace")
        out.append(" & ".join(line.cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}",
            f"\\caption{{{tex_text(experiment.caption.strip())} Lines ``ours'': our value (difference to "
            f"the paper). Smoke scale: a synthetic dataset at laptop scale, not comparable with the paper.}}",
            f"\\label{{tab:{experiment.name}}}", "\\end{table}", ""]
    return "\n".join(out)


def write_report(experiment: Experiment, results_root, reports_dir, figures: bool = True) -> List[Path]:
    """Write ``<reports_dir>/<name>.md`` and ``.tex`` (and the figures); returns the paths written."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    df = collect(results_root, experiment)
    written = []
    for suffix, text in ((".md", render_markdown(experiment, df)), (".tex", render_latex(experiment, df))):
        path = reports_dir / f"{experiment.name}{suffix}"
        _write_if_changed(path, text)
        written.append(path)
    if figures:
        written += write_figures(experiment, results_root, reports_dir / "figures", df=df)
    return written


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)
