"""Figures of an experiment (PNG + PDF under ``reports/figures/``), from the results store only.

- ``<name>_ap_per_epoch``: AP after each epoch of every run (log.jsonl), the paper's convergence figure;
- ``<name>_ap_vs_gflops`` and ``<name>_ap_vs_fps``: the paper's points and ours;
- ``<name>_ablation_deltas``: AP of every row minus AP of the experiment's ``reference_row`` (Table 2).

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
import pandas as pd

from harness.grid import SCALES, Experiment
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
    fig = Figure(figsize=(width, height))
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
        records = store.read_log(experiment.name, run["run_id"])
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
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, scale, epochs, aps in curves:
        ax.plot(epochs, aps, marker=SCALE_MARKERS[scale], markersize=3, linewidth=1,
                linestyle="-" if scale == "full" else "--", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("AP (%)")
    ax.set_title(f"Table {experiment.table}: AP per epoch")
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def ap_versus(experiment: Experiment, agg: pd.DataFrame, column: str, xlabel: str) -> Optional[Figure]:
    """AP against ``column`` (flops or fps). Left: the paper's rows (hollow) and our full-scale runs
    (filled); right, only if there are any: smoke-scale runs, which are not comparable with the paper."""
    panels: Dict[str, list] = {"full": [], "smoke": []}
    for row in experiment.rows:
        x, y = row.paper.get(column), row.paper.get("AP")
        if x is not None and y is not None:
            panels["full"].append((True, row.label, float(x), float(y)))
        for scale in SCALES:
            x, _ = reproduced(agg, row.label, scale, column)
            y, _ = reproduced(agg, row.label, scale, "AP")
            if not (math.isnan(x) or math.isnan(y)):
                panels[scale].append((False, row.label, x, y))
    shown = [scale for scale in SCALES if panels[scale]]
    if not shown:
        return None
    fig = _new_figure(6.0 if len(shown) == 1 else 9.0, 3.6)
    colours = {row.label: f"C{i % 10}" for i, row in enumerate(experiment.rows)}
    for i, scale in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        for paper, label, x, y in panels[scale]:
            ax.scatter([x], [y], marker="o" if scale == "full" else "s", s=24,
                       facecolors="none" if paper else colours[label], edgecolors=colours[label],
                       label=f"{label} ({'paper' if paper else 'ours'})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AP (%)")
        ax.set_title("paper (hollow) and ours, full scale" if scale == "full"
                     else "ours, smoke scale (synthetic data)")
        ax.grid(True, linewidth=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"Table {experiment.table}: AP vs {xlabel}")
    fig.tight_layout()
    return fig


def ablation_deltas(experiment: Experiment, agg: pd.DataFrame) -> Optional[Figure]:
    """AP of each row minus the reference row's: the paper's bars and, where both ran, ours."""
    if experiment.reference_row is None:
        return None
    ref = experiment.row(experiment.reference_row)
    others = [r for r in experiment.rows if r.label != ref.label and not r.cited]
    if not others:
        return None
    series = {"paper": [(r.paper.get("AP") - ref.paper["AP"]) if r.paper.get("AP") is not None
                        and ref.paper.get("AP") is not None else math.nan for r in others]}
    for scale in SCALES:
        ref_ap, _ = reproduced(agg, ref.label, scale, "AP")
        values = [reproduced(agg, r.label, scale, "AP")[0] - ref_ap for r in others]
        if not all(math.isnan(v) for v in values):
            series[f"ours ({scale})"] = values
    fig = _new_figure(6.0, 0.5 + 0.45 * len(others) * max(1, len(series) / 1.5))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ys = [k + (i - (len(series) - 1) / 2) * height for k in range(len(others))]
        ax.barh(ys, [0 if math.isnan(v) else v for v in values], height=height, label=name)
    ax.set_yticks(range(len(others)))
    ax.set_yticklabels([r.label for r in others])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel(f"AP difference to '{ref.label}' (points)")
    ax.set_title(f"Table {experiment.table}: ablation deltas")
    ax.grid(True, axis="x", linewidth=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def write_figures(experiment: Experiment, results_root, figures_dir, df: Optional[pd.DataFrame] = None
                  ) -> List[Path]:
    """Write every figure that has something to draw; returns the paths written."""
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
        for name, fig in figures.items():
            if fig is not None:
                written += _save(fig, figures_dir, f"{experiment.name}_{name}")
    return written
