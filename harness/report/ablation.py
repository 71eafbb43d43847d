"""Ablation deltas: each row's AP minus the experiment's ``reference_row``'s, the paper's and ours per scale,
each with the noise of the difference and whether it exceeds it (pure; the Markdown report and the figure).

The noise of a difference is the root of the sum of squares of the two numbers' noises (:mod:`.noise`): two
single full-scale runs give sqrt(2) x 0.3 = 0.42 AP. A smoke-scale difference has a band only where both rows
ran with seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import pandas as pd

from harness.grid import SCALES, Experiment, Row
from harness.report import noise
from harness.report.collect import reproduced


@dataclass(frozen=True)
class Delta:
    value: float  # NaN where either side is missing
    band: Optional[float]  # the noise of the difference; None: unknown
    verdict: Optional[str]  # noise.WITHIN / ABOVE / BELOW; None without a band


@dataclass(frozen=True)
class AblationRow:
    row: Row
    deltas: Dict[str, Delta]  # "paper", "full", "smoke"


def _runs(agg: pd.DataFrame, label: str, scale: str) -> int:
    sub = agg[(agg["label"] == label) & (agg["scale"] == scale)]
    return int(sub["n_runs"].iloc[0]) if len(sub) else 0


def ablation_rows(experiment: Experiment, agg: pd.DataFrame, metric: str = "AP") -> List[AblationRow]:
    """One entry per row other than the reference (cited rows left out); [] without a ``reference_row``."""
    if experiment.reference_row is None:
        return []
    ref = experiment.row(experiment.reference_row)
    out = []
    for row in experiment.rows:
        if row.label == ref.label or row.cited:
            continue
        deltas: Dict[str, Delta] = {}
        a, b = row.paper.get(metric), ref.paper.get(metric)
        value = math.nan if a is None or b is None else float(a) - float(b)
        band = noise.combined(noise.reference_band(metric), noise.reference_band(metric))
        deltas["paper"] = Delta(value, band, noise.verdict(metric, value, band))
        for scale in SCALES:
            mine, mine_std = reproduced(agg, row.label, scale, metric)
            base, base_std = reproduced(agg, ref.label, scale, metric)
            value = mine - base
            band = noise.combined(
                noise.band(metric, mine_std, _runs(agg, row.label, scale), scale),
                noise.band(metric, base_std, _runs(agg, ref.label, scale), scale),
            )
            deltas[scale] = Delta(value, band, noise.verdict(metric, value, band))
        out.append(AblationRow(row, deltas))
    return out


def columns_with_values(rows: List[AblationRow]) -> List[str]:
    """ "paper" and the scales at which at least one delta is known."""
    return [k for k in ("paper",) + SCALES if any(not math.isnan(r.deltas[k].value) for r in rows)]
