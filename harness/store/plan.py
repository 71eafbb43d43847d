"""``--dry-run``: the plan of an experiment as text, with resources and estimated GPU-hours."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from harness.grid import Experiment, collapsed_at_smoke, estimate_gpu_hours, expand, world_size
from harness.store.status import PlanEntry
from harness.store.store import ResultsStore
from harness.text import text_table
from model.released import is_url

# ------------------------------------------------------------------------------------------- dry run


def _hours(hours: float) -> str:
    """GPU-hours or wall hours as read: tenths below 10 (an evaluation takes a fraction of one), whole above."""
    if 0 < hours < 0.05:
        return "<0.1"
    return f"{hours:.1f}" if 0 < hours < 10 else f"{hours:.0f}"


def dry_run_plan(
    experiment: Experiment,
    store: Optional[ResultsStore] = None,
    job_alive: Optional[Callable[[str], Optional[bool]]] = None,
    elsewhere: Optional[Dict[str, List[Tuple[str, str]]]] = None,
) -> str:
    """The plan as text: per run its row, seed, run id, state, action, resources and estimated GPU-hours
    (see :func:`harness.grid.cost.estimate_gpu_hours`), then the totals. Submits nothing.

    A run another experiment already started (its folder names that experiment) is reused, not paid again;
    ``elsewhere`` (run id -> [(experiment, row)]) names the other experiment files that need the same run,
    so whichever is submitted first trains it for both."""
    specs = expand(experiment)
    entries = store.plan(specs, job_alive) if store is not None else [PlanEntry(s, "new", "run") for s in specs]
    header = ("row", "seed", "run id", "state", "action", "resources", "est. GPU-h")
    table, total, to_spend, per_seed, seen, trainings = [], 0.0, 0.0, 0.0, set(), set()
    for entry in entries:
        spec = entry.spec
        cfg = spec.config
        row = experiment.row(spec.label)
        hours = estimate_gpu_hours(
            cfg,
            row.paper.get("gpu_hours"),
            row.cells.get("epochs"),
            evaluation_only=entry.kind != "train" and entry.state != "done",
        )
        duplicate = entry.key in seen
        seen.add(entry.key)
        if not duplicate:
            total += hours
            if entry.action == "run":
                to_spend += hours
        if spec.run_id not in trainings and not cfg.eval.eval_only:  # an extra seed: a new training of each run
            trainings.add(spec.run_id)
            per_seed += estimate_gpu_hours(cfg, row.paper.get("gpu_hours"), row.cells.get("epochs"))
        launcher = cfg.launcher
        if launcher.gpus_per_node and cfg.data.dataset == "coco":
            gpus = launcher.nodes * launcher.gpus_per_node
            wall_h = hours / gpus if gpus else math.nan
            resources = f"{launcher.nodes}x{launcher.gpus_per_node} GPU, {launcher.executor}"
            if launcher.partition:
                resources += f" ({launcher.partition})"
            parts = math.ceil(wall_h * 60 / launcher.timeout_min) if wall_h == wall_h and wall_h > 0 else 1
            resources += f", ~{_hours(wall_h)} h wall" + (f", {parts - 1} requeue(s)" if parts > 1 else "")
        else:
            resources = (
                f"{world_size(launcher)} CPU process(es)"
                + (f" on {launcher.nodes} nodes" if launcher.nodes > 1 else "")
                + f", {launcher.executor}"
            )
        action = (
            "shared"
            if duplicate
            else f"{entry.kind} only"
            if entry.action == "run" and entry.kind != "train"
            else entry.action
        )
        if entry.action == "run" and cfg.eval.eval_only and not duplicate:
            action = ("evaluate released checkpoint" if is_url(cfg.eval.checkpoint) else "evaluate checkpoint") + (
                " (TTA)" if cfg.eval.tta else ""
            )
        owner = (store.read_config(spec.run_id) or {}) if store is not None and entry.state != "new" else {}
        if entry.action == "skip" and owner.get("experiment") not in (None, experiment.name):
            action = f"reuses {owner['experiment']}: {owner.get('label')!r}"
        elif entry.action == "run" and (elsewhere or {}).get(spec.run_id):
            action += " (also for " + ", ".join(f"{e}: {r!r}" for e, r in elsewhere[spec.run_id]) + ")"
        explained = entry.action == "run" or entry.state in ("changed", "no checkpoint")
        state = entry.state + (f" ({entry.reason})" if entry.reason and explained else "")
        table.append(
            (
                spec.label,
                str(spec.seed),
                entry.key,
                state,
                action,
                resources,
                _hours(hours) if hours and not duplicate else "-",
            )
        )
    lines = [f"{experiment.name} ({experiment.scale} scale, {experiment.path}): {len(entries)} run(s)", ""]
    lines += text_table(header, table)
    cited = [r.label for r in experiment.rows if r.cited]
    lines.append("")
    if experiment.smoke:
        lines += smoke_notes(experiment)
    if cited:
        lines.append(f"cited rows (paper numbers only, not run): {', '.join(cited)}")
    lines.append(f"estimated GPU-hours (V100-equivalent): {_hours(total)} in total, {_hours(to_spend)} to spend now")
    if per_seed:
        lines.append(
            f"one more seed for every row (train.seed: [...] on the rows, for mean and spread): "
            f"+{per_seed:.0f} GPU-hours"
        )
    return "\n".join(lines) + "\n"


def smoke_notes(experiment: Experiment) -> List[str]:
    """The row settings the smoke profile replaces, and the rows that become one run at smoke scale."""
    lines = []
    for row in experiment.rows:
        if row.smoke_changes and (experiment.selected is None or row.label in experiment.selected):
            shown = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in row.smoke_changes)
            lines.append(f"smoke profile changes {row.label!r}: {shown}")
    for run, labels in collapsed_at_smoke(experiment).items():
        lines.append(
            f"one run at smoke scale ({run}) for rows that differ at full scale: "
            + ", ".join(map(repr, labels))
            + "; their smoke numbers are the same training's"
        )
    return lines + ([""] if lines else [])


# ------------------------------------------------------------------------------------------- --rerun

RERUNNABLE = (
    "done",
    "new",
    "changed",
    "outdated",
    "no checkpoint",
    "failed",
    "cancelled",
    "interrupted",
    "corrupt",
    "stale",
)  # never a queued or running one


def rerun_removals(store: ResultsStore, entries: Sequence[PlanEntry]) -> List[Tuple[PlanEntry, List[Path]]]:
    """Per entry to rerun, the paths ``--rerun`` deletes (:meth:`ResultsStore.rerun_paths`), each path once."""
    seen, out = set(), []
    for entry in entries:
        if entry.state not in RERUNNABLE or entry.state in ("interrupted", "failed") and entry.action != "run":
            continue  # a record whose job has not ended (stopping, or requeued) is left alone
        paths = [p for p in store.rerun_paths(entry.spec) if p not in seen]
        seen.update(paths)
        out.append((entry, paths))
    return out


def rerun_text(
    store: ResultsStore, removals, experiment: Experiment, elsewhere: Optional[Dict[str, List[Tuple[str, str]]]] = None
) -> str:
    """What ``--rerun`` deletes, and who else needs each training it redoes (their records stay and run again
    from the new checkpoint when their rows are submitted)."""
    lines = []
    rerun_labels = {entry.spec.label for entry, _ in removals}
    for entry, paths in removals:
        spec = entry.spec
        shown = ", ".join(str(p.relative_to(store.root)) + ("/" if p.is_dir() else "") for p in paths) or "nothing"
        lines.append(f"rerun {spec.label!r} ({spec.run_id}): delete {shown}")
        mine = [
            f"{experiment.name}: {s.label!r}"
            for s in expand(dataclasses.replace(experiment, selected=None))
            if s.run_id == spec.run_id and s.label not in rerun_labels
        ]
        others = mine + [f"{e}: {r!r}" for e, r in (elsewhere or {}).get(spec.run_id, [])]
        if others:
            lines.append(
                f"  its training is shared with {', '.join(dict.fromkeys(others))}: their evaluations "
                "stay, and run again from the new checkpoint when they are submitted"
            )
    return "\n".join(lines) + ("\n" if lines else "")
