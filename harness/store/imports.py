"""Numbers measured elsewhere, into a row's evaluation record: the COCO evaluation server's scores for a
test-dev row (whose ground truth is not public, so no job can compute them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from harness.grid import RunSpec
from harness.store.files import ResultsError
from harness.store.store import ResultsStore

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")     # COCOeval's first six stats, in its order


def server_scores(path) -> Dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl from the server's scores file: a JSON mapping of those names (the
    server's or COCOeval's spellings: ``AP_small``, ``APs``...), or COCOeval's ``stats`` list; fractions (as
    the server reports them) become percent."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ResultsError(path, f"cannot read the scores ({err}); expected JSON") from None
    if isinstance(data, dict) and isinstance(data.get("stats"), list):
        data = data["stats"]
    if isinstance(data, list):
        values = dict(zip(NAMES, data))
    elif isinstance(data, dict):
        spellings = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "aps": "APs", "apm": "APm", "apl": "APl",
                     "ap_small": "APs", "ap_medium": "APm", "ap_large": "APl", "ap_50": "AP50", "ap_75": "AP75"}
        values = {spellings[k.lower()]: v for k, v in data.items() if k.lower() in spellings}
    else:
        values = {}
    missing = [n for n in NAMES if not isinstance(values.get(n), (int, float))]
    if missing:
        raise ResultsError(path, f"no number for {', '.join(missing)}; expected a JSON mapping with "
                           f"{', '.join(NAMES)} (or COCOeval's stats list)")
    fractions = all(0 <= values[n] <= 1 for n in NAMES)
    return {n: round(float(values[n]) * (100 if fractions else 1), 4) for n in NAMES}


def import_server_scores(store: ResultsStore, spec: RunSpec, path) -> dict:
    """Write the scores as the row's evaluation record (provenance: the evaluation server)."""
    record = {**server_scores(path), "run_id": spec.run_id, "eval_id": spec.eval_id,
              "split": spec.config.data.val_split, "tta": spec.config.eval.tta, "source": "evaluation server",
              "scores_file": str(Path(path).resolve())}
    store.prepare(spec, spec.eval_key)
    store.complete(spec.eval_key, record)
    return record
