"""Which reference a reproduced number is held to, and whether it (or a difference between two rows) lies
within the noise (pure, no I/O).

A reproduction is held to the official code's number where the row has one (the released code trained by its
authors: what a faithful re-implementation should land on; for Deformable DETR about 0.7 AP above the paper),
and to the paper's otherwise. The noise of one of our numbers is the standard deviation over its seeds where
there are at least two, else the metric's stated band (:data:`harness.metrics.NOISE_BAND_AP` for the AP
columns; other columns get no verdict). Verdicts compare the numbers as printed (rounded to the metric's
decimals), so a reader can check them by eye.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

from harness.metrics import BY_NAME, RELEASED_BAND_AP

WITHIN, ABOVE, BELOW = "within", "above", "below"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def held_reference(paper: Mapping, official: Mapping, metric: str) -> Tuple[Optional[str], Optional[float]]:
    """("official", value) where the official code has the number, else ("paper", value), else (None, None)."""
    for name, numbers in (("official", official), ("paper", paper)):
        value = numbers.get(metric)
        if not _missing(value):
            return name, float(value)
    return None, None


def band(metric: str, std: float, n_runs: int, scale: str, evaluation_only: bool = False) -> Optional[float]:
    """The noise of one of our numbers: the seeds' standard deviation (>= 2 seeds), else the stated band of a
    single full-scale run; None where neither applies (no band for the column, or one smoke run: the COCO
    band says nothing about a synthetic dataset). A released checkpoint evaluated again (``evaluation_only``)
    has no training noise: :data:`harness.metrics.RELEASED_BAND_AP`."""
    if BY_NAME[metric].noise is None:
        return None
    if evaluation_only:
        return RELEASED_BAND_AP
    if n_runs >= 2 and not _missing(std):
        return float(std)
    return BY_NAME[metric].noise if scale == "full" else None


def reference_band(metric: str) -> Optional[float]:
    """The noise of a reference number (the paper's, the official code's, or a table's ablation row): one run."""
    return BY_NAME[metric].noise


def combined(*bands: Optional[float]) -> Optional[float]:
    """The noise of a difference of independent numbers: the root of the sum of squares (None if any is)."""
    if any(b is None for b in bands):
        return None
    return math.sqrt(sum(b * b for b in bands))


def verdict(metric: str, delta: float, noise: Optional[float]) -> Optional[str]:
    """WITHIN when |delta| <= noise as printed, else ABOVE or BELOW; None without a delta or a band."""
    if noise is None or _missing(delta):
        return None
    decimals = BY_NAME[metric].decimals
    if abs(round(delta, decimals)) <= round(noise, decimals):
        return WITHIN
    return ABOVE if delta > 0 else BELOW
