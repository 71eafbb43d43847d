"""``--status --all``: every record an experiment has produced in the store, override variants included.

One pass over the store's config.yaml files (the training's, and each of its evaluations' and measurements'),
keeping those whose ``experiment:`` is this experiment's name; grouped by the row label they were prepared
for, each with its id, scale, seed, the command-line overrides it was submitted with (``overrides:`` in its
config.yaml, :meth:`~harness.store.ResultsStore.prepare`), its state as its status.json records it, and
whether it is the row's canonical record: the one today's expansion of the experiment as written (no
overrides) names. A record a row shares with another row (one training for two rows) lists under the row
that prepared it first.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from harness.grid import EVALUATIONS, SCALES, Experiment, expand
from harness.grid.specs import MEASUREMENTS
from harness.report.variant import as_written
from harness.store import CorruptFileError, ResultsStore
from harness.text import text_table

CONFIG = "config.yaml"
KIND = {"": "training", EVALUATIONS: "evaluation", MEASUREMENTS: "measurement"}


def record_keys(store: ResultsStore) -> List[str]:
    """The key of every record that has a config.yaml: ``<run_id>``, ``<run_id>/evaluations/<id>``,
    ``<run_id>/measurements/<id>`` (directory listings only)."""
    keys = []
    for run in store.run_ids():
        folder = store.record_dir(run)
        if (folder / CONFIG).is_file():
            keys.append(run)
        for sub in (EVALUATIONS, MEASUREMENTS):
            try:
                names = sorted(os.listdir(folder / sub))
            except OSError:
                continue
            keys += [f"{run}/{sub}/{name}" for name in names if (folder / sub / name / CONFIG).is_file()]
    return keys


def canonical_keys(experiment: Experiment) -> Dict[str, Dict[str, str]]:
    """key -> {label: kind} of the records today's expansion of the experiment as written names (both scales)."""
    written = as_written(experiment)
    out: Dict[str, Dict[str, str]] = {}
    for scale in SCALES:
        for spec in expand(written, scale):
            for kind, key in (
                ("training", spec.run_id),
                ("evaluation", spec.eval_key),
                ("measurement", spec.measure_key),
            ):
                out.setdefault(key, {})[spec.label] = kind
    return out


def _state(store: ResultsStore, key: str) -> str:
    try:
        status = store.read_status(key)
    except CorruptFileError:
        return "corrupt status.json"
    return "prepared (never queued)" if status is None else status.state


def _overrides(doc: dict) -> str:
    overrides = doc.get("overrides")
    if overrides is None:
        return "(not recorded)"  # a record prepared before config.yaml recorded them
    return " ".join(str(o) for o in overrides) if overrides else "-"


def all_runs_text(experiment: Experiment, store: ResultsStore) -> str:
    """The table ``--status --all`` prints (``--rows`` keeps those rows' labels only)."""
    canonical = canonical_keys(experiment)
    found: Dict[str, List[Tuple[str, dict]]] = {}
    unreadable = []
    for key in record_keys(store):
        try:
            doc = store.read_config(key)
        except CorruptFileError:
            unreadable.append(key)
            continue
        if doc is not None and doc.get("experiment") == experiment.name:
            found.setdefault(str(doc.get("label")), []).append((key, doc))
    order = [row.label for row in experiment.rows]
    labels = [label for label in order if label in found] + sorted(set(found) - set(order))
    if experiment.selected is not None:
        labels = [label for label in labels if label in experiment.selected]
    header = ["row", "record", "id", "scale", "seed", "overrides", "state", "configuration"]
    table = []
    for label in labels:
        records = sorted(
            found[label],
            key=lambda item: (
                SCALES.index(item[1].get("scale", "full")) if item[1].get("scale") in SCALES else 2,
                item[0],
            ),
        )
        for i, (key, doc) in enumerate(records):
            kind = KIND.get(key.split("/")[1] if "/" in key else "", "record")
            table.append(
                [
                    label if i == 0 else "",
                    kind,
                    key,
                    str(doc.get("scale", "?")),
                    str(doc.get("seed", "?")),
                    _overrides(doc),
                    _state(store, key),
                    _configuration(canonical.get(key), label),
                ]
            )
    n = sum(len(found[label]) for label in labels)
    lines = [
        f"{experiment.name}: every record in {store.root} whose config.yaml names it "
        f"(experiment: {experiment.name}): {n} record(s) of {len(labels)} row(s)",
        "",
    ]
    if table:
        lines += text_table(header, table, indent="  ")
    else:
        lines.append("  no record yet")
    lines += [
        "",
        "configuration: canonical = the record the experiment as written names for the row (the "
        "canonical report, reports/<name>.*, shows it); variant = another configuration (command-line "
        "overrides, or a record the file no longer names); state: as the record's status.json says "
        "(--status without --all also asks the scheduler about live jobs).",
    ]
    if unreadable:
        lines += ["", f"unreadable config.yaml ({len(unreadable)}, not listed): " + ", ".join(unreadable)]
    return "\n".join(lines)


def _configuration(canonical_for: Optional[Dict[str, str]], label: str) -> str:
    if not canonical_for:
        return "variant"
    if label in canonical_for:
        return "canonical"
    return "canonical of " + ", ".join(repr(other) for other in canonical_for)
