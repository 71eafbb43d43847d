"""Render an experiment's results as the paper's table: Markdown here, LaTeX in :mod:`.latex`; ``write_report``.

Pure: the output depends only on the experiment and the collected DataFrame, so regenerating gives the same
files. Every row of the experiment is printed with the paper's and the official code's numbers where it has
them, and under them one line per scale that has results ("ours (full)", "ours (smoke)") with each value, its
differences to both references, a noise marker and the provenance of the numbers (:mod:`.groups`). With a
``reference_row``, a second table gives each row's AP difference to it and whether that exceeds the noise.
Nothing is made up: a cell without a measured number stays empty.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import pandas as pd

from harness.grid import Experiment
from harness.metrics import BY_NAME, NOISE_BAND_AP, REFERENCE_DEVICE, RELEASED_BAND_AP
from harness.report import noise
from harness.report.ablation import ablation_rows, columns_with_values
from harness.report.collect import aggregate, collect
from harness.report.figures import write_figures
from harness.report.groups import (
    COLUMN_TITLES,
    PROVENANCE,
    Cell,
    Style,
    build_groups,
    devices_shown,
    has_official,
    markers_shown,
    paper_source,
    released_shown,
    title,
    undefined_shown,
)
from harness.report.latex import render_latex, render_latex_compact
from harness.report.tex_escape import LatexError
from harness.report.variant import Variant, as_written, report_variant
from harness.store import atomic_write_text

MARKERS_MD = {noise.WITHIN: "≈", noise.ABOVE: "↑", noise.BELOW: "↓"}


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


MD = Style(check="✓", pm="±", dash="–", markers=MARKERS_MD, escape=_md_escape)


def md_cell(cell: Cell) -> str:
    """``44.2±0.3 [H100] (+0.4 / -0.3) ≈``: the value, the device class of a machine-dependent number, the
    differences to the references and the noise marker."""
    text = cell.value
    if cell.value and cell.device:
        text += f" [{cell.device}]"
    if cell.deltas:
        text += f" ({' / '.join(cell.deltas)})"
    if cell.marker:
        text += f" {cell.marker}"
    return text


__all__ = [
    "MD",
    "render_latex",
    "render_latex_compact",
    "render_markdown",
    "write_report",
    "command_path",
    "write_invocation_report",
]


# ------------------------------------------------------------------------------------------- Markdown


def render_markdown(
    experiment: Experiment, df: pd.DataFrame, command: Optional[str] = None, variant: Optional[Variant] = None
) -> str:
    """The report in Markdown; ``command`` is the experiment file as the regenerate hint names it
    (default: :func:`command_path`); a ``variant`` (:mod:`.variant`) heads it with its overrides."""
    lead, groups = build_groups(experiment, df, MD, lambda cells: [_md_escape(str(c)) for c in cells])
    header = (
        [_md_escape(COLUMN_TITLES.get(c, c)) for c in lead]
        + ["source"]
        + [BY_NAME[m].title_md for m in experiment.metrics]
        + list(PROVENANCE)
    )
    n_lead, n_metrics = len(lead), len(experiment.metrics)
    out = [f"# {_md_escape(title(experiment, variant.name if variant else None))}", ""]
    if variant:
        out += [_variant_markdown(experiment, variant), ""]
    out += [experiment.caption.strip(), ""]
    if experiment.description.strip():
        out += [experiment.description.strip(), ""]
    out.append("| " + " | ".join(header) + " |")
    out.append(
        "|"
        + "|".join(":--" if i <= n_lead else "--:" if i <= n_lead + n_metrics else ":--" for i in range(len(header)))
        + "|"
    )
    for group in groups:
        for i, line in enumerate(group.lines):
            lead_cells = group.lead if i == 0 else [""] * n_lead
            provenance = line.provenance or [""] * len(PROVENANCE)
            out.append(
                "| " + " | ".join(lead_cells + [line.source] + [md_cell(c) for c in line.metrics] + provenance) + " |"
            )
    *guide, generated = _legend(experiment, groups, command, variant)
    for paragraph in guide + weights_note(df):
        out += ["", paragraph]
    out += _ablation_markdown(experiment, df)
    out += ["", generated, ""]
    return "\n".join(out)


def _delta_text(delta, markers) -> str:
    if math.isnan(delta.value):
        return ""
    text = f"{delta.value:+.1f}"
    if delta.verdict is not None:
        text += f" {markers[delta.verdict]} (±{delta.band:.2f})"
    return text


def _ablation_markdown(experiment: Experiment, df: pd.DataFrame) -> List[str]:
    rows = [
        r for r in ablation_rows(experiment, aggregate(df)) if any(not math.isnan(d.value) for d in r.deltas.values())
    ]  # no line without a number
    columns = columns_with_values(rows)
    if not rows or not columns:
        return []
    titles = {"paper": "paper", "full": "ours (full)", "smoke": "ours (smoke)"}
    out = [
        "",
        f"## Ablation deltas: AP minus AP of `{experiment.reference_row}`",
        "",
        "| Row | " + " | ".join(titles[c] for c in columns) + " |",
        "|:--|" + "|".join("--:" for _ in columns) + "|",
    ]
    for r in rows:
        out.append(
            f"| {_md_escape(r.row.label)} | " + " | ".join(_delta_text(r.deltas[c], MARKERS_MD) for c in columns) + " |"
        )
    out += [
        "",
        f"A difference is ≈ within noise when it is no larger than the noise of a difference of two "
        f"numbers, shown beside it: ±{noise.combined(NOISE_BAND_AP, NOISE_BAND_AP):.2f} AP for two single "
        f"runs (√2 × {NOISE_BAND_AP} AP), the seeds' spreads where a row has >= 2 seeds; ↑ / ↓ exceed it. "
        "Smoke-scale differences without seeds have no stated band and no marker.",
    ]
    return out


def _variant_markdown(experiment: Experiment, variant: Variant) -> str:
    def code(text):
        return f"`{_md_escape(text)}`"

    out = "**Not the experiment as written:** command-line overrides, " + "; ".join(variant.description(code)) + "."
    if not variant.every_row:
        out += f" Every other row is as `{command_path(experiment.path)}` has it."
    return out + (
        " Overrides of fields that enter no id (`launcher.*`, ...) change no number and are not listed. "
        f"The canonical report is [`{experiment.name}.md`]({experiment.name}.md)."
    )


def _regenerate(experiment: Experiment, command: Optional[str], variant: Optional[Variant]) -> str:
    path = shlex.quote(command or command_path(experiment.path))
    if variant is None:
        return f"regenerate with `python run_experiment.py {path} --report`"
    groups = variant.groups()
    if len(groups) == 1 and not variant.swept:
        overrides, labels = groups[0]
        rows = "" if variant.every_row else " --rows " + " ".join(shlex.quote(label) for label in labels)
        return f"regenerate with `python run_experiment.py {path} {shlex.join(overrides)}{rows} --report`"
    return f"regenerate with `python run_experiment.py {path}`, the same overrides and `--rows`, and `--report`"


def _legend(experiment: Experiment, groups, command: Optional[str], variant: Optional[Variant] = None) -> List[str]:
    official = any(has_official(g.row) for g in groups)
    source = paper_source(experiment)
    guide = (
        "Each row: "
        + (f"`paper` holds the numbers of {source}" if source else "`paper`: the paper's numbers")
        + (
            "; `official code` the same model trained with the released code, as its README reports (where "
            "the README has the row)"
            if official
            else ""
        )
        + "; `ours (scale)` our numbers: the mean±standard deviation over seeds (with >= 2 seeds), then, at "
        "full scale, in parentheses the difference to the paper"
        + (
            " / to the official code (for a row with official numbers; – where that reference has no number)"
            if official
            else ""
        )
        + ". A smoke line has no differences: it is another model size on another dataset, not comparable with "
        "the paper's numbers (its differences to the other rows are below, where the experiment has a "
        "reference row). A cell without a measured number stays empty; a row that has no numbers of ours says "
        "its state (`not run`, `full failed`) in its source cell."
    )
    held = (
        "Which reference: a reproduction is held to the official code's numbers where the row has them "
        "(the released code lands about 0.7 AP above the paper for Deformable DETR: 44.5 against 43.8 AP), "
        "and to the paper's otherwise."
        if official
        else "Which reference: a reproduction is held to the paper's numbers (no row here has official code numbers)."
    )
    paragraphs = [guide, held]
    if undefined_shown(groups, MD):
        paragraphs.append(
            "– in a cell of ours: the evaluation has no such number (COCOeval's -1: the evaluated "
            "split has no object of that size), not a zero."
        )
    if devices_shown(groups):
        paragraphs.append(
            f"Devices: FPS and GPU hours depend on the machine. Ours carry the class of the device they were "
            f"measured on (`[V100]`, `[H100]`, `[CPU]`; FPS on the measurement's device, GPU hours on the "
            f"training's) and are set against the paper's and the official code's ({REFERENCE_DEVICE}) only "
            f"when measured on that class; others have no difference."
        )
    if markers_shown(groups, MD):
        paragraphs.append(
            f"Noise: ≈ marks an AP number of ours at full scale that lies within the noise of the reference it "
            f"is held to: |ours - reference| no larger than the standard deviation over its seeds (>= 2 seeds) "
            f"or ±{NOISE_BAND_AP} AP, COCO's run-to-run noise for a single run (`harness.metrics.NOISE_BAND_AP`); "
            "↑ / ↓: above / below beyond it. Smoke lines are not compared."
            + (
                f" A released checkpoint evaluated here (an evaluation-only row) is held to ±{RELEASED_BAND_AP} AP "
                "(`harness.metrics.RELEASED_BAND_AP`): the same weights, so a larger difference means the data, "
                "the model or the post-processing differ from its publisher's."
                if released_shown(groups)
                else ""
            )
        )
    paragraphs += [
        "Provenance: `full` is the paper's setting (COCO 2017); `smoke` is laptop scale on a synthetic "
        "COCO-format dataset and is not comparable with the paper's numbers. `epochs trained` counts the "
        "epochs actually run; `device` is where the run trained (and where FPS was measured, if "
        "different); `commit` and `date` identify the code and the days of the records the line's numbers "
        "come from (training, evaluation, measurement). FLOPs are fvcore "
        "counts on the inputs each measurement records (`gflops_input`): a row measured without training counts "
        "one 3x800x1199 image, where the paper averages COCO val images (smaller after resizing), so "
        "compare ratios between rows. GPU hours of ours sum every attempt (requeues and resumes) of a row's "
        "training, its evaluation and its measurement.",
        f"Generated by `harness.report` from the runs of `results/runs/` its rows name; "
        f"{_regenerate(experiment, command, variant)}.",
    ]
    return paragraphs


def weights_note(df: pd.DataFrame) -> List[str]:
    """``Backbone weights: ...``: the ImageNet weights each run of ours started from (what the runs recorded;
    empty when none did), since stronger or weaker weights move AP by more than the noise."""
    if "backbone_weights" not in df or not df["backbone_weights"].astype(bool).any():
        return []
    by_weights: dict = {}
    for _, run in df[df["backbone_weights"].astype(bool)].iterrows():
        by_weights.setdefault(run["backbone_weights"], []).append(f"{run['label']} ({run['scale']})")
    parts = [f"{weights}: {', '.join(dict.fromkeys(rows))}" for weights, rows in sorted(by_weights.items())]
    return ["Backbone weights the runs started from: " + "; ".join(parts) + "."]


def command_path(path: str) -> str:
    """The experiment file as a command typed here would name it: relative to the current directory when it
    lies below it (``experiments/table2.yaml`` from the repository root), else as given."""
    if os.path.isabs(path):
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative
    return os.path.normpath(path)


# ------------------------------------------------------------------------------------------- files


def write_report(
    experiment: Experiment, results_root, reports_dir, figures: bool = True, variant: Optional[Variant] = None
) -> List[Path]:
    """Write ``<reports_dir>/<name>.md``, ``<name>.tex`` (the full table), ``<name>_compact.tex`` (the paper-ready
    one) and the figures; returns the paths written (every file, changed or not). With a ``variant`` (the
    experiment loaded with command-line overrides: :func:`~harness.report.variant.report_variant`) the files
    are ``<variant.name>.*`` and ``figures/<variant.name>_*``, headed by the overrides; the canonical
    ``<name>.*`` come only from the experiment as written (the caller's choice: :mod:`.variant`)."""
    reports_dir = Path(reports_dir)
    name = variant.name if variant else experiment.name
    df = collect(results_root, experiment)
    texts = {
        ".md": render_markdown(experiment, df, variant=variant),
        ".tex": render_latex(experiment, df, variant),
        "_compact.tex": render_latex_compact(experiment, df, variant),
    }  # all rendered before anything is written
    reports_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in texts.items():
        path = reports_dir / f"{name}{suffix}"
        _write_if_changed(path, text)
        written.append(path)
    if figures:
        written += write_figures(
            experiment, results_root, reports_dir / "figures", df=df, name=variant.name if variant else None
        )
    return written


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def write_invocation_report(experiment: Experiment, results_root, reports_dir, submitted: bool = False) -> int:
    """``--report`` (and the report that ends a submission that waited) for ``experiment`` as the command line
    loaded it: the variant's ``<name>+<tag>.*`` where it has overrides that change a number; else the canonical
    ``<name>.*`` rendered from the experiment as written, every row; a submission of some rows writes no report
    (the canonical one would be rewritten by a submission that did not ask for it). Prints what it does and
    what it wrote; returns the exit code."""
    written = as_written(experiment)
    variant = report_variant(experiment, written)
    canonical = f"{command_path(str(reports_dir))}/{experiment.name}.*"
    if variant is not None:
        print(f"overrides: reporting as {variant.name}; {canonical} stay those of the experiment as written")
    elif submitted and experiment.selected is not None:
        print(
            f"{canonical} not rewritten: this submission was of some rows, and the canonical report covers "
            f"every row (python run_experiment.py {command_path(experiment.path)} --report)"
        )
        return 0
    elif experiment.selected is not None:
        print("--rows: a report covers every row; writing the canonical report of the whole experiment")
    if variant is None and any(row.command_line for row in experiment.rows):
        print("the overrides given enter no id (they change no number): the canonical report")
    try:
        paths = write_report(experiment if variant else written, results_root, reports_dir, variant=variant)
    except LatexError as err:  # a string of a run's record that LaTeX cannot take: named, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
