"""Figures of an experiment (PNG + PDF under ``reports/figures/``), from the results store only.

- ``<name>_ap_per_epoch``: AP after each epoch of every run (log.jsonl), the paper's convergence figure,
  one panel per scale;
- ``<name>_ap_vs_gflops`` and ``<name>_ap_vs_fps``: the paper's and the official code's points and ours (error
  bars: the std over seeds);
- ``<name>_ablation_deltas``: AP of every row minus AP of the experiment's ``reference_row`` (Table 2), with
  the noise of each difference; paper and full scale on one axis, smoke scale on its own.

A report with command-line overrides names its figures ``<name>+<tag>_*`` (:mod:`.variant`).

Legends sit right of the axes, never over the data.

Files are written with fixed metadata (no dates), so regenerating gives the same bytes for the same
matplotlib version. A figure with nothing to draw is not written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
import pandas as pd

from harness.grid import SCALES, Experiment
from harness.report import noise
from harness.report.ablation import ablation_rows, columns_with_values
from harness.report.collect import aggregate, collect, reproduced
from harness.store import ResultsStore

RC = {"svg.hashsalt": "deformable-detr-reports", "pdf.compression": 6, "font.size": 8,
      "axes.titlesize": 9, "legend.fontsize": 6, "figure.dpi": 100}
METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}
SCALE_MARKERS = {"full": "o", "smoke": "s"}


def _new_figure(width=6.0, height=3.6) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")    # makes room for legends outside the axes
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, figures_dir: Path, stem: str) -> List[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = figures_dir / f"{stem}.{ext}"
        fig.savefig(path, format=ext, metadata=METADATA[ext], dpi=150)
        paths.append(path)
    return paths


def ap_per_epoch(experiment: Experiment, df: pd.DataFrame, store: ResultsStore) -> Optional[Figure]:
    curves = []
    for _, run in df.drop_duplicates(["run_id", "label"]).iterrows():
        records = store.read_log(run["run_id"])
        by_epoch: Dict[int, float] = {}
        for r in records:
            ap = r.get("AP")
            if isinstance(r.get("epoch"), int) and isinstance(ap, (int, float)) and not isinstance(ap, bool):
                by_epoch[r["epoch"]] = float(ap)          # a resumed run may log an epoch again: last wins
        if by_epoch:
            epochs = sorted(by_epoch)
            curves.append((f"{run['label']} [{run['scale']}, seed {run['seed']}]", run["scale"], epochs,
                           [by_epoch[e] for e in epochs]))
    if not curves:
        return None
    shown = [scale for scale in SCALES if any(c[1] == scale for c in curves)]   # one AP axis per scale
    fig = _new_figure(7.5, 3.2 * len(shown))
    for i, scale in enumerate(shown):
        ax = fig.add_subplot(len(shown), 1, i + 1)
        for name, curve_scale, epochs, aps in curves:
            if curve_scale == scale:
                ax.plot(epochs, aps, marker=SCALE_MARKERS[scale], markersize=3, linewidth=1,
                        linestyle="-" if scale == "full" else "--", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{scale} scale" + (" (synthetic data)" if scale == "smoke" else ""), fontsize=8)
        ax.grid(True, linewidth=0.3)
        _legend_outside(ax)
    fig.suptitle(f"Table {experiment.table}: AP per epoch")
    return fig


def _legend_outside(ax) -> None:
    """Right of the axes, so that it never hides a point or a bar (the layout makes room for it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def ap_versus(experiment: Experiment, agg: pd.DataFrame, column: str, xlabel: str) -> Optional[Figure]:
    """AP against ``column`` (flops or fps). Left: the paper's rows (hollow circles), the official code's
    (hollow diamonds) and our full-scale runs (filled, with the seeds' std as error bars); right, only if
    there are any: smoke-scale runs, which are not comparable with the paper."""
    panels: Dict[str, list] = {"full": [], "smoke": []}
    for row in experiment.rows:
        for source, numbers in (("paper", row.paper), ("official code", row.official)):
            x, y = numbers.get(column), numbers.get("AP")
            if x is not None and y is not None:
                panels["full"].append((source, row.label, float(x), float(y), math.nan, math.nan))
        for scale in SCALES:
            x, x_std = reproduced(agg, row.label, scale, column)
            y, y_std = reproduced(agg, row.label, scale, "AP")
            if not (math.isnan(x) or math.isnan(y)):
                panels[scale].append(("ours", row.label, x, y, x_std, y_std))
    shown = [scale for scale in SCALES if panels[scale]]
    if not shown:
        return None
    fig = _new_figure(7.5 if len(shown) == 1 else 11.0, 3.6)
    colours = {row.label: f"C{i % 10}" for i, row in enumerate(experiment.rows)}
    markers = {"paper": "o", "official code": "D", "ours": "o"}
    for i, scale in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for source, label, x, y, x_std, y_std in panels[scale]:
            colour = colours[label]
            if source == "ours" and not (math.isnan(x_std) and math.isnan(y_std)):
                ax.errorbar([x], [y], xerr=None if math.isnan(x_std) else [x_std],
                            yerr=None if math.isnan(y_std) else [y_std], fmt="none", ecolor=colour,
                            elinewidth=0.8, capsize=2)
            ax.scatter([x], [y], marker=markers[source] if scale == "full" else "s", s=24,
                       facecolors="none" if source != "ours" else colour, edgecolors=colour,
                       label=f"{label} ({source})")
        kinds = [k for k in ("paper", "official code", "ours") if any(p[0] == k for p in panels[scale])]
        styles = {"paper": "paper (hollow circles)", "official code": "official code (hollow diamonds)",
                  "ours": "ours (filled; bars: std over seeds)"}
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AP (%)")
        ax.set_title(", ".join(styles[k] if len(kinds) > 1 else k for k in kinds) + ", full scale"
                     if scale == "full" else "ours, smoke scale (synthetic data)", fontsize=7)
        ax.grid(True, linewidth=0.3)
        _legend_outside(ax)
    fig.suptitle(f"Table {experiment.table}: AP vs {xlabel}")
    return fig


def ablation_deltas(experiment: Experiment, agg: pd.DataFrame) -> Optional[Figure]:
    """AP of each row minus the reference row's. Left: the paper's and our full-scale differences (one
    scale of AP points); right, only if there are any: smoke-scale differences, on their own axis. Error
    bars are the noise of each difference; a hatched bar lies within it (:mod:`.ablation`)."""
    rows = [r for r in ablation_rows(experiment, agg) if any(not math.isnan(d.value) for d in r.deltas.values())]
    panels = [[k for k in ("paper", "full") if k in columns_with_values(rows)],
              [k for k in ("smoke",) if k in columns_with_values(rows)]]
    panels = [p for p in panels if p]
    if not rows or not panels:
        return None
    names = {"paper": "paper", "full": "ours (full)", "smoke": "ours (smoke)"}
    colours = {"paper": "C0", "full": "C1", "smoke": "C2"}
    fig = _new_figure(4.5 + 3.0 * len(panels), 1.2 + 0.35 * len(rows) * max(len(p) for p in panels))
    for i, series in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        height = 0.8 / len(series)
        for j, key in enumerate(series):
            ys = [k + (j - (len(series) - 1) / 2) * height for k in range(len(rows))]
            for y, r in zip(ys, rows):
                d = r.deltas[key]
                if math.isnan(d.value):
                    continue
                within = d.verdict == noise.WITHIN
                ax.barh([y], [d.value], height=height, color="white" if within else colours[key],
                        edgecolor=colours[key], hatch="////" if within else None, linewidth=0.8,
                        xerr=None if d.band is None else [d.band], error_kw={"elinewidth": 0.6, "capsize": 2})
        handles = [Patch(facecolor=colours[k], edgecolor=colours[k], label=names[k]) for k in series]
        if any(r.deltas[k].verdict == noise.WITHIN for r in rows for k in series):
            handles.append(Patch(facecolor="white", edgecolor="grey", hatch="////", label="within noise"))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r.row.label for r in rows] if i == 0 else [""] * len(rows))
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(f"AP difference to '{experiment.reference_row}' (points)")
        ax.set_title(("paper" + (" and ours, full scale" if "full" in series else "")) if "paper" in series
                     else "ours, full scale" if "full" in series else "ours, smoke scale (synthetic data)",
                     fontsize=8)
        ax.grid(True, axis="x", linewidth=0.3)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.suptitle(f"Table {experiment.table}: ablation deltas (error bars: noise of the difference)")
    return fig


def write_figures(experiment: Experiment, results_root, figures_dir, df: Optional[pd.DataFrame] = None,
                  name: Optional[str] = None) -> List[Path]:
    """Write every figure that has something to draw; returns the paths written. ``name``: the files' stem
    and a note in each title, for a report of the experiment with command-line overrides
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
            "ap_per_epoch": ap_per_epoch(experiment, df, store),
            "ap_vs_gflops": ap_versus(experiment, agg, "flops", "GFLOPs"),
            "ap_vs_fps": ap_versus(experiment, agg, "fps", "FPS"),
            "ablation_deltas": ablation_deltas(experiment, agg),
        }
        for figure, fig in figures.items():
            if fig is not None:
                if name and name != experiment.name:
                    fig.suptitle(f"{fig.get_suptitle()}\n{name}: with command-line overrides")
                written += _save(fig, figures_dir, f"{name or experiment.name}_{figure}")
    return written
