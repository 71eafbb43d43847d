"""The look of the report figures, shared by :mod:`.figures` and :mod:`.convergence` (pure matplotlib).

A paper's column width (3.25 in; two panels take the text width, 6.75 in), serif fonts (STIX, as Times), 8 pt,
TrueType fonts embedded in the PDF (no Type 3), a palette that survives colour blindness, PNG at 200 dpi beside
the vector PDF, fixed metadata (no dates: the same bytes for the same matplotlib version). Titles come from the
experiment's own name and caption (:func:`.groups.title`). Point labels are placed beside their points without
overlapping each other or another point (:func:`place_labels`), instead of long legends.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
import matplotlib.colors
import matplotlib.transforms
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.grid import Experiment
from harness.report.groups import title

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper
TEXT_WIDTH = 6.75  # inches: both columns
RC = {
    "svg.hashsalt": "deformable-detr-reports",
    "pdf.compression": 6,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "font.family": "serif",
    "font.serif": ["STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.5,
    "grid.linewidth": 0.3,
    "grid.alpha": 0.6,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "hatch.linewidth": 0.5,
}
METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}
DPI = 200
# Okabe and Ito's colour-blind-safe palette, one colour per row of the experiment (their yellow, too light on
# white for thin lines and small text, last and darkened).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#B59A00")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
SCALE_TITLES = {"full": "full scale (COCO)", "smoke": "smoke scale (synthetic data)"}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")  # makes room for legends outside the axes
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, figures_dir: Path, stem: str) -> List[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = figures_dir / f"{stem}.{ext}"
        fig.savefig(path, format=ext, metadata=METADATA[ext], dpi=DPI)
        paths.append(path)
    return paths


def chars(fig: Figure, fontsize: float = 8) -> int:
    """About how many characters of a serif font of ``fontsize`` points fit across the figure."""
    return int(fig.get_size_inches()[0] * 72 / (fontsize * 0.46))


def suptitle(fig: Figure, experiment: Experiment, what: str, name: Optional[str] = None) -> None:
    """``<name>: <the caption's first sentence>``, then what the figure shows; wrapped to the figure's width."""
    width = chars(fig)
    text = textwrap.fill(title(experiment, name), width)
    if name and name != experiment.name:
        text += "\n(with command-line overrides)"
    fig.suptitle(f"{text}\n{textwrap.fill(what, width)}", fontsize=8)


def colours(experiment: Experiment) -> Dict[str, str]:
    return {row.label: PALETTE[i % len(PALETTE)] for i, row in enumerate(experiment.rows)}


def short(label: str, width: int = 24) -> str:
    return textwrap.fill(label, width)


def ink(colour: str) -> str:
    """A row's colour darkened for small text (labels stay readable on white)."""
    r, g, b = matplotlib.colors.to_rgb(colour)
    return matplotlib.colors.to_hex((r * 0.8, g * 0.8, b * 0.8))


@dataclasses.dataclass
class Point:
    source: str  # paper | official code | ours
    label: str
    x: float
    y: float
    x_std: float = math.nan
    y_std: float = math.nan


def number(value) -> Optional[float]:
    """A finite number of a record or the experiment, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


_PLACES = [
    (4, 0, "left", "center"),
    (-4, 0, "right", "center"),
    (0, 5, "center", "bottom"),
    (0, -5, "center", "top"),
    (4, 5, "left", "bottom"),
    (4, -5, "left", "top"),
    (-4, 5, "right", "bottom"),
    (-4, -5, "right", "top"),
] + [
    (dx, dy, "left" if dx > 0 else "right", "center")
    for dist in (10, 16, 22, 30, 38)
    for dx, dy in (
        (8, dist),
        (8, -dist),
        (-8, dist),
        (-8, -dist),
        (dist + 8, dist / 2),
        (dist + 8, -dist / 2),
        (-dist - 8, dist / 2),
        (-dist - 8, -dist / 2),
    )
]


def place_labels(ax, items: Sequence[Tuple[str, float, float, str]], fontsize: float = 5.5) -> List:
    """Label each (text, x, y, colour) beside its point without overlapping another label or point (a greedy
    search over :data:`_PLACES`; a label moved off its point gets a thin leader line). Returns the texts."""
    fig = ax.figure
    fig.canvas.draw()  # settle the layout: positions are final
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    scale = fig.dpi / 72
    points = [to_display((x, y)) for _, x, y, _ in items]
    radius = 3.5 * scale
    obstacles = [
        matplotlib.transforms.Bbox([[px - radius, py - radius], [px + radius, py + radius]]) for px, py in points
    ]
    frame = ax.get_window_extent(renderer)

    def annotate(text, x, y, colour, dx, dy, ha, va, **arrow):  # a label (off the layout), offset in points
        artist = ax.annotate(
            text,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=fontsize,
            ha=ha,
            va=va,
            color=colour,
            annotation_clip=False,
            **arrow,
        )
        artist.set_in_layout(False)
        return artist

    placed, texts = [], []
    for text, x, y, colour in items:
        best = None
        for dx, dy, ha, va in _PLACES:
            artist = annotate(text, x, y, colour, dx, dy, ha, va)
            box = artist.get_window_extent(renderer).expanded(1.04, 1.1)
            overlaps = sum(box.overlaps(o) for o in obstacles + placed)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            score = overlaps * 10 + (0 if inside else 5)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, artist, box, (dx, dy))
            else:
                artist.remove()
            if score == 0:
                break
        _, artist, box, (dx, dy) = best
        if abs(dy) > 6 or abs(dx) > 6:  # moved off its point: a leader line back to it
            ha, va = artist.get_ha(), artist.get_va()
            artist.remove()
            leader = dict(arrowstyle="-", linewidth=0.4, color="0.45", shrinkA=0, shrinkB=2)
            artist = annotate(text, x, y, colour, dx, dy, ha, va, arrowprops=leader)
        placed.append(box)
        texts.append(artist)
    return texts


def label_points(ax, points: Sequence[Point], colours: Dict[str, str]) -> None:
    """Each row's name once, beside its point (ours where the panel has it, else the paper's): labels instead
    of a legend."""
    chosen: Dict[str, Point] = {}
    for p in points:
        if p.label not in chosen or p.source == "ours":
            chosen[p.label] = p
    place_labels(ax, [(short(p.label, 36), p.x, p.y, ink(colours.get(p.label, "black"))) for p in chosen.values()])
