"""Results folder -> pandas DataFrame: one row per run of an experiment, and per row the mean and standard
deviation over seeds. The only reader of ``results/`` for reports; missing fields become NaN.

The DataFrame is also the results as data (``export`` writes it as CSV or Parquet): per run its state and
provenance, every metrics.json field, the row's table cells (``cell.<column>``), the resolved config fields that
differ between runs (dotted, ``model.enc_n_points``: an ``axes`` sweep groups by its swept key) and the
paper's and official code's numbers (``paper_AP``, ``official_AP``, ...).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Dict, List, Tuple, Union

import pandas as pd

from harness.grid import SCALES, Experiment, config_to_dict, expand, load_experiment
from harness.metrics import BY_NAME, EVALUATED_FIELDS, NUMERIC_FIELDS
from harness.store import CorruptFileError, ResultsError, ResultsStore

# Text fields of metrics.json (the numeric ones: harness.metrics).
TEXT_FIELDS = ("fps_device", "device", "commit", "date", "dataset", "attn_impl", "precision", "backbone_weights")
RUN_FIELDS = ("experiment", "label", "row_index", "scale", "seed", "run_id", "state", "error")
COLUMNS = RUN_FIELDS + NUMERIC_FIELDS + TEXT_FIELDS

def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def collect(results_root: Union[str, Path], experiment: Union[Experiment, str, Path]) -> pd.DataFrame:
    """One row per run (every non-cited row, both scales, every seed), whether it ran or not:
    ``state`` is new/queued/running/done/failed/corrupt and metrics are NaN where missing.
    Values come from metrics.json, completed by benchmark.json (complexity measured alone).

    ``experiment`` is a loaded :class:`Experiment` or the path of its YAML file. A ``results_root`` that does
    not exist is an error (a mistyped path would otherwise report every run as new)."""
    if not isinstance(experiment, Experiment):
        experiment = load_experiment(str(experiment), check_data=False)
    if not Path(results_root).is_dir():
        raise ResultsError(results_root, "no such results folder; expected the folder holding "
                           "runs/<run_id>/, e.g. results/")
    store = ResultsStore(results_root)
    full = dataclasses.replace(experiment, selected=None)     # reports cover every row
    specs = [spec for scale in SCALES for spec in expand(full, scale)]
    flat = [_flatten(config_to_dict(spec.config)) for spec in specs]
    differing = _differing_fields([(spec.scale, fields) for spec, fields in zip(specs, flat)])
    references = [f"{ref}_{m}" for ref in ("paper", "official") for m in experiment.metrics]
    extra_columns = [f"cell.{c}" for c in experiment.columns] + differing + references
    records = []
    for spec, fields in zip(specs, flat):
        row = experiment.rows[spec.row_index]
        record = dict.fromkeys(COLUMNS)
        record.update(experiment=spec.experiment, label=spec.label, row_index=spec.row_index,
                      scale=spec.scale, seed=spec.seed, run_id=spec.run_id)
        record.update(_read_run(store, spec))
        record.update({f"cell.{c}": row.cells.get(c) for c in experiment.columns})
        record.update({key: fields.get(key) for key in differing})
        for ref, numbers in (("paper", row.paper), ("official", row.official)):
            record.update({f"{ref}_{m}": _number(numbers.get(m)) for m in experiment.metrics})
        records.append(record)
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS) + ["has_metrics"] + extra_columns)
    df = df.astype({k: "float64" for k in list(NUMERIC_FIELDS) + references})
    df = df.astype({k: object for k in RUN_FIELDS + TEXT_FIELDS if k not in ("row_index", "seed")})
    return df


def _read_run(store: ResultsStore, spec) -> dict:
    """state, error, the numeric and text fields of one row's run, and whether it has any metrics.

    The state is the store's plan for the row (training, then its evaluation, then its measurement). The
    numbers come from, in increasing precedence: a measurement made without training (benchmark.json), the
    training's record (epochs, GPU-hours, provenance), the row's measurement record (parameters, FLOPs, FPS)
    and its evaluation record (the COCO numbers: rows sharing a training may evaluate it differently)."""
    entry = store.plan_one(spec)
    errors = [entry.reason] if entry.state in ("failed", "corrupt") and entry.reason else []

    def read(reader, key) -> dict:
        try:
            return reader(key)
        except CorruptFileError as e:
            errors.append(str(e))
            return None

    def fields(record, evaluated: bool):
        return None if record is None else {k: v for k, v in record.items() if (k in EVALUATED_FIELDS) == evaluated}

    parts = [fields(read(store.read_benchmark, spec.run_id), False)]
    evaluation = None
    if entry.state != "corrupt":              # an unusable record runs again: its numbers are not shown
        evaluation = read(store.read_metrics, spec.eval_key)
        parts += [fields(read(store.read_metrics, spec.run_id), False),
                  fields(read(store.read_metrics, spec.measure_key), False), fields(evaluation, True)]
    found = [part for part in parts if part is not None]
    metrics = {k: v for part in found for k, v in part.items()} if found else None
    source = (evaluation or {}).get("source")
    if source:                                # numbers measured elsewhere (the COCO evaluation server) say so
        metrics["device"] = "; ".join(filter(None, [metrics.get("device"), f"AP: {source}"]))
    record = {"state": entry.state, "error": "; ".join(dict.fromkeys(errors))}
    for key in NUMERIC_FIELDS:
        record[key] = _number((metrics or {}).get(key))
    for key in TEXT_FIELDS:
        value = (metrics or {}).get(key)
        record[key] = "" if value is None else str(value)
    record["has_metrics"] = metrics is not None
    return record


def _flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
    """{"model": {"enc_n_points": 4}} -> {"model.enc_n_points": 4}; lists become tuples (hashable: groupby)."""
    out: Dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


# the seed has its own column; the launcher says where a run went, not what it computed
_NOT_COMPARED = ("train.seed", "launcher.")


def _differing_fields(runs: List[Tuple[str, Dict[str, object]]]) -> List[str]:
    """Config fields whose value is not the same in every run of a scale (scales compared separately, so the
    smoke profile's own fields do not count), in config order."""
    keys: Dict[str, None] = {}
    for _, fields in runs:
        keys.update(dict.fromkeys(fields))
    return [key for key in keys if not key.startswith(_NOT_COMPARED) and any(
        len({repr(fields.get(key)) for s, fields in runs if s == scale}) > 1 for scale in SCALES)]


def export(df: pd.DataFrame, path: Union[str, Path]) -> Path:
    """Write ``df`` (from :func:`collect`) as CSV (``.csv``) or Parquet (``.parquet``, ``.pq``; needs pyarrow),
    by the file's suffix; returns the path written. Tuple values (list-valued config fields) are written as
    text in both formats, so that the two files hold the same table."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: unknown export format {suffix or '(no suffix)'!r}; expected .csv or .parquet")
    if suffix != ".csv" and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow); or export to a .csv file")
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(lambda v: str(list(v)) if isinstance(v, tuple) else v)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        out.to_csv(path, index=False)
    else:
        out.to_parquet(path, index=False)
    return path


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
