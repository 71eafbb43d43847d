"""Results folder -> pandas DataFrame: one row per run of an experiment, and per row the mean and standard
deviation over seeds. The only reader of ``results/`` for reports; missing fields become NaN."""
from __future__ import annotations

import dataclasses
import math
from typing import List

import pandas as pd

from harness.grid import SCALES, Experiment, expand
from harness.metrics import BY_NAME, NUMERIC_FIELDS
from harness.store import CorruptFileError, ResultsStore

# Text fields of metrics.json (the numeric ones: harness.metrics).
TEXT_FIELDS = ("fps_device", "device", "commit", "date", "dataset", "attn_impl", "precision")
RUN_FIELDS = ("experiment", "label", "row_index", "scale", "seed", "run_id", "state", "error")
COLUMNS = RUN_FIELDS + NUMERIC_FIELDS + TEXT_FIELDS

def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def collect(results_root, experiment: Experiment) -> pd.DataFrame:
    """One row per run (every non-cited row, both scales, every seed), whether it ran or not:
    ``state`` is new/queued/running/done/failed/corrupt and metrics are NaN where missing.
    Values come from metrics.json, completed by benchmark.json (complexity measured alone)."""
    store = ResultsStore(results_root)
    full = dataclasses.replace(experiment, selected=None)     # reports cover every row
    records: List[dict] = []
    for scale in SCALES:
        for spec in expand(full, scale):
            record = dict.fromkeys(COLUMNS)
            record.update(experiment=spec.experiment, label=spec.label, row_index=spec.row_index,
                          scale=scale, seed=spec.seed, run_id=spec.run_id, state="new", error="")
            try:
                status = store.read_status(spec.experiment, spec.run_id)
                if status is not None:
                    record["state"] = status.state
                    if status.state == "failed":
                        record["error"] = status.reason or ""
            except CorruptFileError as e:
                record.update(state="corrupt", error=str(e))
            metrics = None
            try:
                metrics = store.read_metrics(spec.experiment, spec.run_id)
            except CorruptFileError as e:
                record.update(state="corrupt", error=str(e))
            try:       # complexity/speed measured alone fills what the run has not measured (yet)
                benchmark = store.read_benchmark(spec.experiment, spec.run_id)
                if benchmark is not None:
                    metrics = {**benchmark, **(metrics or {})}
            except CorruptFileError as e:
                record["error"] = "; ".join(filter(None, [record["error"], str(e)]))
            for key in NUMERIC_FIELDS:
                record[key] = _number((metrics or {}).get(key))
            for key in TEXT_FIELDS:
                value = (metrics or {}).get(key)
                record[key] = "" if value is None else str(value)
            record["has_metrics"] = metrics is not None
            records.append(record)
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS) + ["has_metrics"])
    df = df.astype({k: "float64" for k in NUMERIC_FIELDS})
    df = df.astype({k: object for k in RUN_FIELDS + TEXT_FIELDS if k not in ("row_index", "seed")})
    return df


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, scale) over the runs that have metrics: ``<field>`` the mean and
    ``<field>_seed_std`` the sample standard deviation over seeds (NaN for one seed), ``n_runs``,
    and the provenance fields joined (distinct values, sorted)."""
    have = df[df["has_metrics"].astype(bool)]
    out = []
    for (label, scale), group in have.groupby(["label", "scale"], sort=False):
        record = {"label": label, "scale": scale, "row_index": int(group["row_index"].iloc[0]),
                  "n_runs": int(len(group)), "seeds": ",".join(str(s) for s in sorted(group["seed"]))}
        for key in NUMERIC_FIELDS:
            values = group[key].dropna()
            record[key] = float(values.mean()) if len(values) else math.nan
            record[f"{key}_seed_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        for key in TEXT_FIELDS:
            record[key] = ", ".join(sorted({v for v in group[key] if v}))
        epochs = group["epochs_trained"].dropna()
        record["epochs_range"] = _range_text(epochs)
        out.append(record)
    columns = ["label", "scale", "row_index", "n_runs", "seeds"] + [
        c for key in NUMERIC_FIELDS for c in (key, f"{key}_seed_std")] + list(TEXT_FIELDS) + ["epochs_range"]
    result = pd.DataFrame.from_records(out, columns=columns)
    return result.sort_values(["row_index", "scale"], kind="stable").reset_index(drop=True)


def _range_text(values: pd.Series) -> str:
    if not len(values):
        return ""
    lo, hi = values.min(), values.max()
    fmt = lambda v: f"{v:g}"
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def reproduced(agg: pd.DataFrame, label: str, scale: str, paper_column: str):
    """(mean, std) of a paper column for a row at a scale, in the paper's unit; NaNs if absent."""
    metric = BY_NAME[paper_column]
    field, factor = metric.field, metric.factor
    rows = agg[(agg["label"] == label) & (agg["scale"] == scale)]
    if not len(rows):
        return math.nan, math.nan
    return float(rows[field].iloc[0]) * factor, float(rows[f"{field}_seed_std"].iloc[0]) * factor


def run_states(df: pd.DataFrame, label: str, scale: str) -> List[str]:
    return sorted(set(df[(df["label"] == label) & (df["scale"] == scale)]["state"]))
