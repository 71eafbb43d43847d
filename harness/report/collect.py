"""Results folder -> pandas DataFrame: one row per run of an experiment, and per row the mean and standard
deviation over seeds: the reports' reader of the records in ``results/`` (the convergence figures read each
run's ``log.jsonl`` themselves, :mod:`.convergence`); missing fields become NaN.

Each number is read from the record that produced it (DESIGN.md, Records): AP and the other COCO numbers (and
the detections per image) from the row's evaluation record, parameters, FLOPs and FPS from its measurement
record, epochs and the training's facts from the training record; ``gpu_hours`` is the sum of the three
records' GPU-hours (training + the row's evaluation + its measurement). Each record's provenance has its own
columns (``train_commit``, ``eval_date``, ``measure_device``, ...); ``commit``, ``date`` and ``device`` gather
them for the tables.

The DataFrame is also the results as data (``export`` writes it as CSV or Parquet): per run its state and
provenance, every record's numbers, the row's table cells (``cell.<column>``), the resolved config fields that
differ between runs (dotted, ``model.enc_n_points``: an ``axes`` sweep groups by its swept key) and the
paper's and official code's numbers (``paper_AP``, ``official_AP``, ...).

A COCO number the evaluation could not compute is no number: COCOeval's -1 (no ground-truth object of that size
in the evaluated split; -100 once in percent) and a null in the record are read as NaN, and ``undefined`` lists
those fields (``APl``), so that a table shows "–" there rather than an empty cell or a made-up 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import pandas as pd

from harness.grid import SCALES, Experiment, config_to_dict, expand, load_experiment
from harness.metrics import BY_NAME, EVALUATED_FIELDS, MEASURED_FIELDS, NUMERIC_FIELDS
from harness.store import CorruptFileError, ResultsError, ResultsStore

# The three records of a row and the prefix of their provenance columns.
RECORDS = (("training", "train"), ("evaluation", "eval"), ("measurement", "measure"))
# Text fields, each from one record (the numeric ones: harness.metrics, read as :func:`_record_of` says).
TEXT_FIELDS = (
    "fps_device",
    "device",
    "commit",
    "date",
    "dataset",
    "attn_impl",
    "fps_attn_impl",
    "precision",
    "backbone_weights",
    "eval_split",
    "checkpoint_sha256",
    "undefined",
) + tuple(f"{prefix}_{field}" for _, prefix in RECORDS for field in ("commit", "date", "device"))
# Each record's own GPU-hours (``gpu_hours`` is their sum).
RECORD_NUMERIC_FIELDS = tuple(f"{prefix}_gpu_hours" for _, prefix in RECORDS)
RUN_FIELDS = ("experiment", "label", "row_index", "scale", "seed", "run_id", "state", "error")
COLUMNS = RUN_FIELDS + NUMERIC_FIELDS + RECORD_NUMERIC_FIELDS + TEXT_FIELDS


def _record_of(field: str) -> str:
    """The record a numeric field is read from: the evaluation's numbers and setting, the measurement's
    numbers, else the training's."""
    if field in EVALUATED_FIELDS or field == "num_detections":
        return "evaluation"
    if field in MEASURED_FIELDS:
        return "measurement"
    return "training"


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def collect(results_root: Union[str, Path], experiment: Union[Experiment, str, Path]) -> pd.DataFrame:
    """One row per run (every non-cited row, both scales, every seed), whether it ran or not:
    ``state`` is the store's plan for the row and numbers are NaN where missing. Each number comes from the
    record that produced it (the module's docstring); a measurement made without training
    (``python -m harness.measure``) shows before the row has run.

    ``experiment`` is a loaded :class:`Experiment` or the path of its YAML file. A ``results_root`` that does
    not exist is an error (a mistyped path would otherwise report every run as new)."""
    if not isinstance(experiment, Experiment):
        experiment = load_experiment(str(experiment), check_data=False)
    if not Path(results_root).is_dir():
        raise ResultsError(
            results_root, "no such results folder; expected the folder holding runs/<run_id>/, e.g. results/"
        )
    store = ResultsStore(results_root)
    full = dataclasses.replace(experiment, selected=None)  # reports cover every row
    specs = [spec for scale in SCALES for spec in expand(full, scale)]
    flat = [_flatten(config_to_dict(spec.config)) for spec in specs]
    differing = _differing_fields([(spec.scale, fields) for spec, fields in zip(specs, flat)])
    references = [f"{ref}_{m}" for ref in ("paper", "official") for m in experiment.metrics]
    extra_columns = [f"cell.{c}" for c in experiment.columns] + differing + references
    records = []
    for spec, fields in zip(specs, flat):
        row = experiment.rows[spec.row_index]
        record = dict.fromkeys(COLUMNS)
        record.update(
            experiment=spec.experiment,
            label=spec.label,
            row_index=spec.row_index,
            scale=spec.scale,
            seed=spec.seed,
            run_id=spec.run_id,
        )
        record.update(_read_run(store, spec))
        record.update({f"cell.{c}": row.cells.get(c) for c in experiment.columns})
        record.update({key: fields.get(key) for key in differing})
        for ref, numbers in (("paper", row.paper), ("official", row.official)):
            record.update({f"{ref}_{m}": _number(numbers.get(m)) for m in experiment.metrics})
        records.append(record)
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS) + ["has_metrics"] + extra_columns)
    df = df.astype({k: "float64" for k in list(NUMERIC_FIELDS) + list(RECORD_NUMERIC_FIELDS) + references})
    df = df.astype({k: object for k in RUN_FIELDS + TEXT_FIELDS if k not in ("row_index", "seed")})
    return df


def _read_run(store: ResultsStore, spec) -> dict:
    """state, error, the numeric and text fields of one row, and whether it has any record with numbers.

    The state is the store's plan for the row (training, then its evaluation, then its measurement). Each
    number is read from its own record: the training record (``spec.run_id``), the row's evaluation record
    (``spec.eval_key``) and its measurement record (``spec.measure_key``). An unusable record (corrupt: it
    runs again) or one made under another configuration than today's resolution of the row (changed) shows
    nothing, nor do the evaluation and measurement of such a training; an evaluation made from
    another checkpoint than the training's (the training was redone) is not shown either."""
    entry = store.plan_one(spec)
    errors = [entry.reason] if entry.state in ("failed", "corrupt", "changed") and entry.reason else []
    unusable = set()
    if entry.state in ("corrupt", "changed"):  # changed: its numbers are another configuration's
        unusable.add(entry.key)
        if entry.key == spec.run_id:
            unusable.update((spec.eval_key, spec.measure_key))

    def read(key) -> Optional[dict]:
        if key in unusable:
            return None
        try:
            found = store.read_metrics(key)
        except CorruptFileError as e:
            errors.append(str(e))
            return None
        return found if isinstance(found, dict) else None

    found = {"training": read(spec.run_id), "evaluation": read(spec.eval_key), "measurement": read(spec.measure_key)}
    trained = (found["training"] or {}).get("checkpoint_sha256")
    evaluated = (found["evaluation"] or {}).get("checkpoint_sha256")
    if trained and evaluated and trained != evaluated:
        found["evaluation"] = None  # of an earlier checkpoint: outdated
    records = {kind: part or {} for kind, part in found.items()}
    training, evaluation, measurement = records["training"], records["evaluation"], records["measurement"]

    record = {"state": entry.state, "error": "; ".join(dict.fromkeys(errors))}
    for key in NUMERIC_FIELDS:
        if key == "gpu_hours":
            continue
        record[key] = _number(records[_record_of(key)].get(key))
    undefined = [key for key in EVALUATED_FIELDS if _undefined(evaluation, key)]
    for key in undefined:
        record[key] = math.nan
    hours = [_number(part.get("gpu_hours")) for part in records.values()]
    hours = [h for h in hours if not math.isnan(h)]
    record["gpu_hours"] = float(sum(hours)) if hours else math.nan
    text = {
        "fps_device": measurement.get("fps_device"),
        "precision": measurement.get("precision"),
        "fps_attn_impl": measurement.get("fps_attn_impl"),
        "attn_impl": training.get("attn_impl"),
        "backbone_weights": training.get("backbone_weights"),
        "eval_split": evaluation.get("split"),
        "checkpoint_sha256": training.get("checkpoint_sha256"),
        "undefined": ", ".join(undefined),
    }
    for kind, prefix in RECORDS:
        record[f"{prefix}_gpu_hours"] = _number(records[kind].get("gpu_hours"))
        for field in ("commit", "date", "device"):
            text[f"{prefix}_{field}"] = records[kind].get(field)
    # the tables' provenance: where the row trained (else where it was evaluated or measured), every commit
    # and date of its records
    device = next((text[f"{p}_device"] for _, p in RECORDS if text[f"{p}_device"]), None)
    source = evaluation.get("source")
    if source:  # numbers measured elsewhere (the COCO evaluation server) say so
        device = "; ".join(filter(None, [device, f"AP: {source}"]))
    text["device"] = device
    for field in ("commit", "date"):
        text[field] = ", ".join(dict.fromkeys(str(text[f"{p}_{field}"]) for _, p in RECORDS if text[f"{p}_{field}"]))
    has_metrics = any(part is not None for part in found.values())
    text["dataset"] = spec.config.data.dataset if has_metrics else None
    for key in TEXT_FIELDS:
        value = text.get(key)
        record[key] = "" if value is None else str(value)
    record["has_metrics"] = has_metrics
    return record


def _undefined(evaluation: dict, key: str) -> bool:
    """COCOeval had no value for ``key``: the record holds null, or its -1 (-100 in percent; AP is never
    negative)."""
    if key not in evaluation:
        return False
    value = evaluation[key]
    return value is None or (not math.isnan(_number(value)) and _number(value) < 0)


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
    return [
        key
        for key in keys
        if not key.startswith(_NOT_COMPARED)
        and any(len({repr(fields.get(key)) for s, fields in runs if s == scale}) > 1 for scale in SCALES)
    ]


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
        record = {
            "label": label,
            "scale": scale,
            "row_index": int(group["row_index"].iloc[0]),
            "n_runs": int(len(group)),
            "seeds": ",".join(str(s) for s in sorted(group["seed"])),
        }
        for key in NUMERIC_FIELDS:
            values = group[key].dropna()
            record[key] = float(values.mean()) if len(values) else math.nan
            record[f"{key}_seed_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        for key in TEXT_FIELDS:
            if key in ("commit", "date", "undefined"):  # each run's lists its records' distinct values
                record[key] = ", ".join(sorted({p for v in group[key] if v for p in v.split(", ")}))
            else:
                record[key] = ", ".join(sorted({v for v in group[key] if v}))
        epochs = group["epochs_trained"].dropna()
        record["epochs_range"] = _range_text(epochs)
        out.append(record)
    columns = (
        ["label", "scale", "row_index", "n_runs", "seeds"]
        + [c for key in NUMERIC_FIELDS for c in (key, f"{key}_seed_std")]
        + list(TEXT_FIELDS)
        + ["epochs_range"]
    )
    result = pd.DataFrame.from_records(out, columns=columns)
    return result.sort_values(["row_index", "scale"], kind="stable").reset_index(drop=True)


def _range_text(values: pd.Series) -> str:
    if not len(values):
        return ""
    lo, hi = values.min(), values.max()

    def fmt(v):
        return f"{v:g}"

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
