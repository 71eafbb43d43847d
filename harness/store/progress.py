"""How far a run is, from its log.jsonl: epoch, last AP, time per epoch and the estimated time left (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Progress:
    epochs_done: int  # epochs finished (0 before the first one ends)
    epochs: int  # epochs to train
    last_ap: Optional[float]  # AP of the latest evaluation
    seconds_per_epoch: Optional[float]
    eta_s: Optional[float]  # time left at the mean pace so far

    def text(self) -> str:
        """``12/50  AP 31.2  25.3 min/epoch  ETA 16 h 2 min``"""
        parts = [f"{self.epochs_done}/{self.epochs}"]
        if self.last_ap is not None:
            parts.append(f"AP {self.last_ap:.1f}")
        if self.seconds_per_epoch is not None:
            parts.append(f"{self.seconds_per_epoch / 60:.1f} min/epoch")
        if self.eta_s is not None and self.epochs_done < self.epochs:
            parts.append(f"ETA {duration(self.eta_s)}")
        return "  ".join(parts)


def progress(records: Sequence[dict], epochs: int) -> Progress:
    """Progress of a training from its epoch records (``epoch``, ``epoch_time_s``, ``AP``)."""
    trained = [r for r in records if isinstance(r.get("epoch"), int)]
    done = max((r["epoch"] for r in trained), default=-1) + 1
    times = [float(r["epoch_time_s"]) for r in trained if isinstance(r.get("epoch_time_s"), (int, float))]
    per_epoch = sum(times) / len(times) if times else None
    aps = [r["AP"] for r in trained if isinstance(r.get("AP"), (int, float)) and not math.isnan(r["AP"])]
    eta = per_epoch * max(epochs - done, 0) if per_epoch is not None else None
    return Progress(done, epochs, aps[-1] if aps else None, per_epoch, eta)


def duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"
