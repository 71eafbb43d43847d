"""Figures of an experiment as a paper sets them (vector PDF beside a PNG under ``reports/figures/``), from the
results store only.

- ``<name>_convergence``: AP, training loss and learning rate per epoch, the paper's final AP beside them
  (:mod:`.convergence`);
- ``<name>_ap_vs_gflops`` and ``<name>_ap_vs_fps``: the paper's (hollow circles), the official code's (hollow
  diamonds) and our points (filled; bars: the std over seeds), each labelled with its row. FPS is plotted per
  device class: the paper's V100 beside ours only when ours ran on that class, every other class on its own
  panel (:mod:`.devices`).
- ``<name>_ablation_deltas``: AP of every row minus AP of the experiment's ``reference_row`` (Table 2), the
  paper's and ours at each scale on one shared axis, with the noise of each difference (hatched: within it).

Style, titles and point labels: :mod:`.figure_style` (a paper's column width, serif fonts embedded in the PDF).
Titles come from the experiment's own name and caption, never from the ``table:`` of a file it was copied from; a
report with command-line overrides names its figures ``<name>+<tag>_*`` (:mod:`.variant`) and says so.

Files are written with fixed metadata (no dates), so regenerating gives the same bytes for the same matplotlib
version. A figure with nothing to draw is not written.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from harness.grid import SCALES, Experiment
from harness.metrics import REFERENCE_DEVICE_CLASS
from harness.report import noise
from harness.report.ablation import ablation_rows, columns_with_values
from harness.report.collect import aggregate, collect, reproduced
from harness.report.convergence import convergence, convergence_curves, reference_points  # noqa: F401
from harness.report.devices import classes
from harness.report.figure_style import (
    COLUMN_WIDTH,
    RC,
    SCALE_TITLES,
    TEXT_WIDTH,
    Point,
    colours,
    label_points,
    new_figure,
    number,
    save,
    short,
    suptitle,
)
from harness.store import ResultsStore

__all__ = ["ablation_deltas", "ap_versus", "convergence", "convergence_curves", "reference_points", "write_figures"]


# ------------------------------------------------------------------------------------------ AP against cost


def _panels(experiment: Experiment, agg: pd.DataFrame, column: str) -> Dict[Tuple[str, str], List[Point]]:
    """(scale, device class) -> points; the device class only for FPS ("" otherwise). The references' panel
    is (full, the references' class) for FPS, (full, "") else."""
    device_bound = column == "fps"
    ref_key = ("full", REFERENCE_DEVICE_CLASS if device_bound else "")
    panels: Dict[Tuple[str, str], List[Point]] = {}
    for row in experiment.rows:
        for source, numbers in (("paper", row.paper), ("official code", row.official)):
            x, y = number(numbers.get(column)), number(numbers.get("AP"))
            if x is not None and y is not None:
                panels.setdefault(ref_key, []).append(Point(source, row.label, x, y))
        for scale in SCALES:
            x, x_std = reproduced(agg, row.label, scale, column)
            y, y_std = reproduced(agg, row.label, scale, "AP")
            if math.isnan(x) or math.isnan(y):
                continue
            device = ""
            if device_bound:
                sub = agg[(agg["label"] == row.label) & (agg["scale"] == scale)]
                device = " / ".join(classes(str(sub["fps_device"].iloc[0]))) or "unknown device"
            panels.setdefault((scale, device), []).append(Point("ours", row.label, x, y, x_std, y_std))
    order = (
        [ref_key]
        + sorted(k for k in panels if k != ref_key and k[0] == "full")
        + sorted(k for k in panels if k[0] == "smoke")
    )
    return {k: panels[k] for k in order if k in panels}


# Where a point's label may go, tried in order: (dx, dy) in points from the point, horizontal and vertical
# alignment; the first that overlaps no other label, no point and stays inside the axes wins.
def ap_versus(
    experiment: Experiment, agg: pd.DataFrame, column: str, xlabel: str, name: Optional[str] = None
) -> Optional[Figure]:
    """AP against ``column`` (flops or fps), one panel per scale (and, for FPS, per device class)."""
    panels = _panels(experiment, agg, column)
    if not panels:
        return None
    palette = colours(experiment)
    fig = new_figure(COLUMN_WIDTH if len(panels) == 1 else TEXT_WIDTH, 2.9 * math.ceil(len(panels) / 2))
    styles = {"paper": ("o", "none"), "official code": ("D", "none"), "ours": ("o", None)}
    axes = []
    for i, ((scale, device), points) in enumerate(panels.items()):
        ax = fig.add_subplot(math.ceil(len(panels) / 2), min(len(panels), 2), i + 1)
        axes.append((ax, points))
        for p in points:
            colour = palette.get(p.label, "grey")
            if p.source == "ours" and not (math.isnan(p.x_std) and math.isnan(p.y_std)):
                ax.errorbar(
                    [p.x],
                    [p.y],
                    xerr=None if math.isnan(p.x_std) else [p.x_std],
                    yerr=None if math.isnan(p.y_std) else [p.y_std],
                    fmt="none",
                    ecolor=colour,
                    elinewidth=0.7,
                    capsize=1.5,
                )
            marker, face = styles[p.source]
            ax.scatter(
                [p.x],
                [p.y],
                marker=marker,
                s=20,
                facecolors=face or colour,
                edgecolors=colour,
                linewidths=0.9,
                zorder=3,
            )
        ours_here = [p for p in points if p.source == "ours"]
        for p in ours_here:  # ours joined to the paper's point of the same row
            ref = next((q for q in points if q.label == p.label and q.source == "paper"), None)
            if ref is not None:
                ax.plot(
                    [ref.x, p.x],
                    [ref.y, p.y],
                    color=palette.get(p.label, "grey"),
                    linewidth=0.4,
                    linestyle=":",
                    zorder=1,
                )
        where = SCALE_TITLES[scale]
        if column == "fps":
            where += f", {device}" if device else ""
            refs = any(p.source != "ours" for p in points)
            where = (
                f"{device}: paper, official code" + (" and ours" if ours_here else "")
                if refs
                else f"ours on {device}, {scale} scale"
            )
            if refs:
                where += " (batch 1)"
        ax.set_title(textwrap.fill(where, 55), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AP (%)")
        ax.grid(True)
        ax.margins(x=0.12, y=0.12)
    kinds = [k for k in ("paper", "official code", "ours") if any(p.source == k for _, points in axes for p in points)]
    legend = {"paper": "paper", "official code": "official code", "ours": "ours (bars: std over seeds)"}
    fig.legend(
        [
            Line2D(
                [],
                [],
                color="grey",
                marker=styles[k][0],
                markerfacecolor="none" if k != "ours" else "grey",
                linestyle="none",
            )
            for k in kinds
        ],
        [legend[k] for k in kinds],
        loc="outside lower center",
        ncol=len(kinds),
        fontsize=6.5,
    )
    what = {"flops": "AP against GFLOPs", "fps": "AP against FPS, per device class"}[column]
    suptitle(fig, experiment, what, name)
    for ax, points in axes:
        label_points(ax, points, palette)
    return fig


# ------------------------------------------------------------------------------------------ ablation deltas


def ablation_deltas(experiment: Experiment, agg: pd.DataFrame, name: Optional[str] = None) -> Optional[Figure]:
    """AP of each row minus the reference row's: the paper's and ours at each scale as grouped bars on one
    shared axis. Error bars are the noise of each difference; a hatched bar lies within it (:mod:`.ablation`)."""
    rows = [r for r in ablation_rows(experiment, agg) if any(not math.isnan(d.value) for d in r.deltas.values())]
    series = columns_with_values(rows)
    if not rows or not series:
        return None
    names = {"paper": "paper", "full": "ours, full scale", "smoke": "ours, smoke scale (synthetic)"}
    colours = {"paper": "#0072B2", "full": "#D55E00", "smoke": "#009E73"}
    fig = new_figure(COLUMN_WIDTH, 1.3 + 0.2 * len(rows) * max(len(series), 1.5))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / len(series)
    for j, key in enumerate(series):
        ys = [k + (j - (len(series) - 1) / 2) * height for k in range(len(rows))]
        for y, r in zip(ys, rows):
            d = r.deltas[key]
            if math.isnan(d.value):
                continue
            within = d.verdict == noise.WITHIN
            ax.barh(
                [y],
                [d.value],
                height=height * 0.9,
                color="white" if within else colours[key],
                edgecolor=colours[key],
                hatch="//////" if within else None,
                linewidth=0.6,
                xerr=None if d.band is None else [d.band],
                error_kw={"elinewidth": 0.6, "capsize": 1.5},
            )
    handles = [Patch(facecolor=colours[k], edgecolor=colours[k], label=names[k]) for k in series]
    if any(r.deltas[k].verdict == noise.WITHIN for r in rows for k in series):
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//////", label="within noise"))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([short(r.row.label, 22) for r in rows], fontsize=6.5)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("AP difference to the reference row (points)")
    ax.grid(True, axis="x")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=6.5)
    suptitle(
        fig,
        experiment,
        f"Ablations: AP minus AP of the reference row, {experiment.reference_row} "
        "(error bars: noise of the difference)",
        name,
    )
    return fig


# ------------------------------------------------------------------------------------------ files


def write_figures(
    experiment: Experiment, results_root, figures_dir, df: Optional[pd.DataFrame] = None, name: Optional[str] = None
) -> List[Path]:
    """Write every figure that has something to draw; returns the paths written. ``name``: the files' stem
    and the title's name, for a report of the experiment with command-line overrides
    (``table2+epochs3-1a2b3c``: :mod:`.variant`); default the experiment's name."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    if df is None:
        df = collect(results_root, experiment)
    agg = aggregate(df)
    store = ResultsStore(results_root)
    written: List[Path] = []
    with matplotlib.rc_context(RC):
        figures = {
            "convergence": convergence(experiment, df, store, name),
            "ap_vs_gflops": ap_versus(experiment, agg, "flops", "GFLOPs", name),
            "ap_vs_fps": ap_versus(experiment, agg, "fps", "FPS (images/s, batch 1)", name),
            "ablation_deltas": ablation_deltas(experiment, agg, name),
        }
        for figure, fig in figures.items():
            if fig is not None:
                written += save(fig, figures_dir, f"{name or experiment.name}_{figure}")
    return written
