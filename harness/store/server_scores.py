"""Numbers measured elsewhere, into a row's evaluation record: the COCO evaluation server's scores for a
test-dev row (whose ground truth is not public, so no job can compute them).

Everything is checked before anything is written: the row is evaluated on a test-dev split, its training is
done and its evaluation (the detections uploaded to the server) is done, and every score is a finite number in
the range of its unit. A refusal raises :class:`ResultsError` naming the scores file, the row, the field with
its value and what was expected; the store is not touched. An accepted import replaces the evaluation record
atomically, keeping the record's other fields (which checkpoint and commit wrote the detections).

The unit is never guessed from the values: it is ``unit`` (``--scores-unit``), else the file's ``"unit"`` key
(``"fraction"`` or ``"percent"``), else, for COCOeval's ``stats`` list only, ``fraction`` (COCOeval's unit).
A mapping of names without a unit is refused. COCOeval's -1 ("no value": no objects of that size) becomes
None (JSON null) for APs, APm and APl; the record holds percent, as the harness's own evaluations do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

from harness.grid import RunSpec
from harness.store.files import ResultsError
from harness.store.store import ResultsStore

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval's first six stats, in its order
SIZE_WISE = ("APs", "APm", "APl")  # COCOeval's -1 (no objects of that size) allowed
UNITS = {"fraction": 1.0, "percent": 100.0}  # unit -> the top of its range
SPELLINGS = {
    "ap": "AP",
    "ap50": "AP50",
    "ap75": "AP75",
    "aps": "APs",
    "apm": "APm",
    "apl": "APl",
    "ap_small": "APs",
    "ap_medium": "APm",
    "ap_large": "APl",
    "ap_50": "AP50",
    "ap_75": "AP75",
}
NO_VALUE = -1  # COCOeval's "no value"


def _row(row: Optional[str]) -> str:
    return f"row {row!r}: " if row is not None else ""


def _refuse(path, row: Optional[str], field: str, value, expected: str) -> ResultsError:
    return ResultsError(path, f"{_row(row)}{field} = {value!r}; expected {expected}")


def server_scores(
    path, unit: Optional[str] = None, row: Optional[str] = None
) -> Tuple[Dict[str, Optional[float]], str]:
    """(scores, the unit they were read in): AP, AP50, AP75, APs, APm, APl in percent (None: COCOeval's -1, no
    objects of that size) from the server's scores file: a JSON mapping of those names (the server's or
    COCOeval's spellings: ``AP_small``, ``APs``...) or COCOeval's ``stats`` list (bare, or as
    ``{"stats": [...]}``). ``unit`` (``fraction`` or ``percent``) overrides the file's ``"unit"`` key; without
    either, only the ``stats`` list is taken as fractions (COCOeval's unit); a mapping of names is refused."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ResultsError(path, f"{_row(row)}cannot read the scores ({err}); expected JSON") from None
    file_unit = data.get("unit") if isinstance(data, dict) else None
    if file_unit is not None and (not isinstance(file_unit, str) or file_unit not in UNITS):
        raise _refuse(path, row, "unit", file_unit, f"one of {', '.join(map(repr, UNITS))}")
    if unit is not None and unit not in UNITS:
        raise _refuse(path, row, "--scores-unit", unit, f"one of {', '.join(UNITS)}")
    if unit is not None and file_unit is not None and unit != file_unit:
        raise _refuse(path, row, "unit", file_unit, f"the unit given with --scores-unit ({unit}), or no 'unit' key")
    if isinstance(data, dict) and "stats" in data:
        data = data["stats"]
        if not isinstance(data, list):
            raise _refuse(path, row, "stats", data, "COCOeval's stats list")
    if isinstance(data, list):
        fields = {n: f"stats[{i}] ({n})" for i, n in enumerate(NAMES)}
        values = dict(zip(NAMES, data))
        unit = unit or file_unit or "fraction"  # COCOeval's stats are fractions
    elif isinstance(data, dict):
        fields, values = {}, {}
        for key, value in data.items():
            name = SPELLINGS.get(key.lower())
            if name is None:
                continue
            if name in fields:
                raise _refuse(path, row, key, value, f"one value for {name} (also given as {fields[name]!r})")
            fields[name], values[name] = key, value
        unit = unit or file_unit
        if unit is None:
            raise _refuse(
                path,
                row,
                "unit",
                None,
                "the unit of the scores: --scores-unit fraction|percent or a "
                "'unit' key in the file (a mapping of names does not say; COCOeval's stats list is "
                "fractions)",
            )
    else:
        raise ResultsError(
            path,
            f"{_row(row)}the scores are a JSON {type(data).__name__}; expected a mapping "
            f"with {', '.join(NAMES)} (or COCOeval's stats list)",
        )
    missing = [n for n in NAMES if n not in values]
    if missing:
        raise ResultsError(
            path,
            f"{_row(row)}no number for {', '.join(missing)}; expected a JSON mapping with "
            f"{', '.join(NAMES)} (or COCOeval's stats list)",
        )
    top = UNITS[unit]
    scores: Dict[str, Optional[float]] = {}
    for name in NAMES:
        value, field = values[name], fields[name]
        expected = f"a number in [0, {top:g}] ({unit})" + (
            f", or {NO_VALUE} (no objects of that size)" if name in SIZE_WISE else ""
        )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
        ):  # an int may not fit a float
            raise _refuse(path, row, field, value, expected)
        if value == NO_VALUE and name in SIZE_WISE:
            scores[name] = None
            continue
        if not 0 <= value <= top:
            hint = (
                "; the scores are read as fractions: give --scores-unit percent if they are percent"
                if unit == "fraction" and 1 < value <= 100
                else ""
            )
            raise _refuse(path, row, field, value, expected + hint)
        scores[name] = round(float(value) * 100 / top, 4)
    return scores, unit


def _check_row(store: ResultsStore, spec: RunSpec, path) -> None:
    """The row is a test-dev row whose training and evaluation (the detections to upload) are done."""
    split = spec.config.data.val_split
    if not split.startswith("test-dev"):
        raise _refuse(
            path,
            spec.label,
            "data.val_split",
            split,
            "a test-dev split (e.g. 'test-dev2017'): the "
            f"evaluation server scores test-dev detections; {split} rows are evaluated by the harness",
        )
    training = store.read_status(spec.run_id)
    state = training.state if training else "not started"
    if state != "done":
        raise _refuse(
            path,
            spec.label,
            f"state of its training {spec.run_id}",
            state,
            "done: the training is not done, and the server's scores are for its detections, which must be "
            "uploaded first (the zip written into the row's evaluation folder when the training ends); "
            "import the scores the server returns for them",
        )
    evaluation = store.read_status(spec.eval_key)
    state = evaluation.state if evaluation else "not started"
    if state != "done":
        raise _refuse(
            path,
            spec.label,
            f"state of its evaluation {spec.eval_key}",
            state,
            "done: the row's detections are written by its evaluation and must be uploaded first (the zip "
            f"in {store.record_dir(spec.eval_key)}); import the scores the server returns for them",
        )


def import_server_scores(store: ResultsStore, spec: RunSpec, path, unit: Optional[str] = None) -> dict:
    """Write the scores as the row's evaluation record (provenance: the evaluation server), once the row and
    every score are checked; the record's other fields (how its detections were made) are kept."""
    _check_row(store, spec, path)
    scores, unit = server_scores(path, unit, spec.label)
    previous = store.read_metrics(spec.eval_key) or {}
    record = {
        **{k: v for k, v in previous.items() if k not in NAMES},
        **scores,
        "run_id": spec.run_id,
        "eval_id": spec.eval_id,
        "split": spec.config.data.val_split,
        "tta": spec.config.eval.tta,
        "num_detections": spec.config.eval.num_detections,
        "source": "evaluation server",
        "scores_file": str(Path(path).resolve()),
        "scores_unit": unit,
    }
    store.prepare(spec, spec.eval_key)
    store.complete(spec.eval_key, record)
    return record
