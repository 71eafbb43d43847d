"""The convergence figure of an experiment (``<name>_convergence``), the paper's comparison of Deformable DETR
with DETR-DC5 over epochs, from the results store only.

AP against epoch (1-based: epoch 1 is the end of the first epoch) from each run's log.jsonl, the mean over seeds
as a line and their standard deviation as a band; the paper's (and the official code's) final AP of each row at
the epochs it trained, where the paper gives it on the split the training evaluates itself on (not test-dev);
below, the training loss and (dashed, right axis) the learning rate. Rows that are one training (or whose curves
are identical) are drawn once, labelled ``A = B`` (``A ≡ B``), with hollow markers; each curve has its own marker,
so curves that cross or overlap stay apart. One column per scale: smoke curves are not set against the paper's
points. A log-scaled epoch axis where the schedules span more than 20x (Table 1: 50 to 500 epochs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harness.grid import SCALES, Experiment, expand
from harness.report.figure_style import (
    COLUMN_WIDTH,
    MARKERS,
    SCALE_TITLES,
    TEXT_WIDTH,
    Point,
    colours,
    label_points,
    new_figure,
    number,
    short,
    suptitle,
)
from harness.store import ResultsStore


@dataclasses.dataclass
class Curve:
    labels: List[str]  # the rows it belongs to (several: one training, or identical curves)
    scale: str
    runs: Tuple[str, ...]  # run ids (one per seed)
    epochs: List[int]  # 1-based, where AP was evaluated
    ap: List[float]  # mean over seeds
    ap_std: List[float]  # NaN where fewer than two seeds have the epoch
    loss_epochs: List[int]
    loss: List[float]
    lr_epochs: List[int]
    lr: List[float]
    identical: bool = False  # labels merged because the curves are identical (not one training)

    @property
    def name(self) -> str:
        return (" \N{IDENTICAL TO} " if self.identical else " = ").join(self.labels)


def _read_log(store: ResultsStore, run_id: str) -> Dict[str, Dict[int, float]]:
    """epoch (1-based) -> AP, train_loss, lr of one run's log.jsonl; a resumed run may log an epoch again: the
    last line wins. COCOeval's -1 is no AP."""
    out: Dict[str, Dict[int, float]] = {"AP": {}, "loss": {}, "lr": {}}
    for record in store.read_log(run_id):
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            continue
        for key, fields in (("AP", ("AP",)), ("loss", ("train_loss",)), ("lr", ("lr_default", "lr"))):
            value = next((number(record.get(f)) for f in fields if number(record.get(f)) is not None), None)
            if value is not None and not (key == "AP" and value < 0):
                out[key][epoch + 1] = value
    return out


def _mean_std(per_run: List[Dict[int, float]]) -> Tuple[List[int], List[float], List[float]]:
    epochs = sorted({e for run in per_run for e in run})
    means, stds = [], []
    for e in epochs:
        values = [run[e] for run in per_run if e in run]
        means.append(float(np.mean(values)))
        stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
    return epochs, means, stds


def convergence_curves(experiment: Experiment, df: pd.DataFrame, store: ResultsStore) -> List[Curve]:
    """One curve per row and scale that logged AP, rows of one training merged, then identical curves merged."""
    curves: List[Curve] = []
    by_runs: Dict[Tuple[str, Tuple[str, ...]], Curve] = {}
    for (label, scale), group in df.groupby(["label", "scale"], sort=False):
        runs = tuple(sorted(dict.fromkeys(group["run_id"])))
        key = (scale, runs)
        if key in by_runs:
            by_runs[key].labels.append(label)
            continue
        logs = [_read_log(store, run) for run in runs]
        if not any(log["AP"] for log in logs):
            continue
        epochs, ap, ap_std = _mean_std([log["AP"] for log in logs])
        loss_epochs, loss, _ = _mean_std([log["loss"] for log in logs])
        lr_epochs, lr, _ = _mean_std([log["lr"] for log in logs])
        curve = Curve([label], scale, runs, epochs, ap, ap_std, loss_epochs, loss, lr_epochs, lr)
        by_runs[key] = curve
        curves.append(curve)
    merged: List[Curve] = []
    for curve in curves:
        twin = next(
            (
                c
                for c in merged
                if c.scale == curve.scale
                and c.epochs == curve.epochs
                and np.allclose(c.ap, curve.ap, rtol=0, atol=1e-9)
                and np.allclose(c.loss, curve.loss, rtol=0, atol=1e-9)
                if len(c.loss) == len(curve.loss)
            ),
            None,
        )
        if twin is None:
            merged.append(curve)
        else:
            twin.labels += curve.labels
            twin.identical = True
    order = {row.label: i for i, row in enumerate(experiment.rows)}
    return sorted(merged, key=lambda c: (SCALES.index(c.scale), order.get(c.labels[0], len(order))))


def reference_points(experiment: Experiment) -> List[Tuple[str, str, float, float]]:
    """(row label, "paper" | "official code", epochs, AP): each row's final AP at the epochs its full-scale
    recipe trains (the row's ``epochs`` cell where it has one), where the row evaluates on a split the
    training logs (not test-dev: the curves are val AP)."""
    specs = {spec.label: spec for spec in expand(dataclasses.replace(experiment, selected=None), "full")}
    out = []
    for row in experiment.rows:
        spec = specs.get(row.label)
        if spec is None or spec.config.data.val_split.startswith("test"):
            continue
        epochs = row.cells.get("epochs")
        epochs = (
            epochs if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) else spec.config.train.epochs
        )
        for source, numbers in (("paper", row.paper), ("official code", row.official)):
            ap = number(numbers.get("AP"))
            if ap is not None:
                out.append((row.label, source, float(epochs), ap))
    return out


def convergence(
    experiment: Experiment, df: pd.DataFrame, store: ResultsStore, name: Optional[str] = None
) -> Optional[Figure]:
    curves = convergence_curves(experiment, df, store)
    points = reference_points(experiment)
    columns = [s for s in SCALES if any(c.scale == s for c in curves)]
    if "full" not in columns and len({p[2] for p in points}) >= 2:  # the paper's own convergence comparison
        columns.insert(0, "full")
    if not columns:
        return None
    palette = colours(experiment)
    fig = new_figure(COLUMN_WIDTH if len(columns) == 1 else TEXT_WIDTH, 4.2)
    grid = fig.add_gridspec(2, len(columns), height_ratios=(2.2, 1.0))
    handles: Dict[str, Line2D] = {}
    labelled = []
    for j, scale in enumerate(columns):
        ax = fig.add_subplot(grid[0, j])
        below = fig.add_subplot(grid[1, j], sharex=ax)
        mine = [c for c in curves if c.scale == scale]
        shown_points = points if scale == "full" else []
        epochs = [e for c in mine for e in c.epochs + c.loss_epochs] + [p[2] for p in shown_points]
        for k, curve in enumerate(mine):
            colour = palette.get(curve.labels[0], "grey")
            shared = len(curve.labels) > 1
            (line,) = ax.plot(
                curve.epochs,
                curve.ap,
                color=colour,
                marker=MARKERS[k % len(MARKERS)],
                markersize=3,
                linewidth=1.0,
                markerfacecolor="white" if shared else colour,
            )
            std = np.array(curve.ap_std)
            if np.isfinite(std).any():
                mean = np.array(curve.ap)
                ax.fill_between(
                    curve.epochs,
                    mean - np.nan_to_num(std),
                    mean + np.nan_to_num(std),
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
            handles.setdefault(curve.name, line)
            if curve.loss:
                below.plot(curve.loss_epochs, curve.loss, color=colour, linewidth=1.0)
        for label, source, epoch, ap in shown_points:
            ax.scatter(
                [epoch],
                [ap],
                s=20,
                marker="o" if source == "paper" else "D",
                facecolors="none",
                edgecolors=palette.get(label, "grey"),
                linewidths=0.9,
                zorder=3,
            )
        if shown_points:
            labelled.append((ax, [Point(source, label, epoch, ap) for label, source, epoch, ap in shown_points]))
        lr_curves = [c for c in mine if c.lr]
        if lr_curves:
            twin = below.twinx()
            twin.spines["right"].set_visible(True)
            for curve in lr_curves:
                twin.plot(
                    curve.lr_epochs,
                    curve.lr,
                    color=palette.get(curve.labels[0], "grey"),
                    linewidth=0.8,
                    linestyle="--",
                    drawstyle="steps-pre",
                    alpha=0.8,
                )
            twin.set_yscale("log")
            twin.set_ylabel("learning rate (dashed)")
        if epochs and (max(epochs) >= 200 or max(epochs) / max(min(epochs), 1) > 20):
            ax.set_xscale("log")
            ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= max(epochs) * 1.2]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlim(0.8, max(epochs) * 1.6)
        elif epochs:
            ax.set_xlim(0.5, max(epochs) * 1.06)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("AP (%)")
        ax.set_title(SCALE_TITLES[scale] if len(columns) > 1 or scale == "smoke" else "", fontsize=7)
        ax.grid(True)
        ax.tick_params(labelbottom=False)
        below.set_xlabel("epoch")
        below.set_ylabel("training loss")
        below.grid(True)
        if not mine:
            below.text(
                0.5,
                0.5,
                "no training logged at this scale yet",
                transform=below.transAxes,
                ha="center",
                va="center",
                fontsize=7,
                color="grey",
            )
            below.set_yticks([])
    kinds = []
    if any(p[1] == "paper" for p in points) and "full" in columns:
        kinds.append(
            Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="none", label="paper (final AP)")
        )
    if any(p[1] == "official code" for p in points) and "full" in columns:
        kinds.append(
            Line2D(
                [],
                [],
                color="grey",
                marker="D",
                markerfacecolor="none",
                linestyle="none",
                label="official code (final AP)",
            )
        )
    if any(len(c.labels) > 1 for c in curves):
        kinds.append(Line2D([], [], color="grey", marker="o", markerfacecolor="white", label="one curve, rows A = B"))
    labels = [short(t, 44) for t in handles] + [k.get_label() for k in kinds]
    if labels:
        fig.legend(
            list(handles.values()) + kinds,
            labels,
            loc="outside lower center",
            ncol=2 if len(columns) > 1 else 1,
            fontsize=6.5,
            handlelength=1.8,
        )
    bands = any(np.isfinite(np.array(c.ap_std)).any() for c in curves)
    suptitle(
        fig,
        experiment,
        "Convergence: AP per epoch"
        + (" (band: std over seeds)" if bands else "")
        + "; training loss and learning rate below",
        name,
    )
    for ax, shown in labelled:
        label_points(ax, shown, palette)
    return fig
