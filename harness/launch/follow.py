"""Following runs from a terminal: each executor asked about its own jobs (SLURM in one batched query, local
jobs by their processes, in the store), ``--status``'s table, ``--logs``' tails and ``--cancel``.
Nothing here imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import List

from harness.grid import KINDS, expand, unique_runs
from harness.launch.executors import slurm_available
from harness.launch.local import cancel as cancel_jobs
from harness.launch.slurm import ALIVE_STATES, first_failure, log_paths, slurm_jobs
from harness.store import ResultsError
from harness.store.jobs import slurm_id
from harness.store.progress import progress
from harness.store.status import job_not_ended
from harness.text import text_table

LOG_LINES = 40


def job_states(store, specs) -> dict:
    """The SLURM state of every SLURM job the runs' status files name, asked in one batch (None: unknown);
    local jobs are not SLURM's to answer for (the store looks at their processes)."""
    return {job_id: job["state"] for job_id, job in job_infos(store, specs).items()}


def job_infos(store, specs) -> dict:
    """``{"state", "nodes"}`` of every SLURM job the runs' status files name, in one batched query."""
    if not slurm_available():
        return {}
    ids = []
    for key in dict.fromkeys(spec.key(kind) for spec in specs for kind in KINDS):
        try:
            status = store.read_status(key)
        except ResultsError:
            continue
        if (
            status is not None
            and status.state in ("queued", "running", "interrupted", "failed")
            and status.job_ids
            and slurm_id(status.job_ids[-1]) is not None
        ):
            ids.append(slurm_id(status.job_ids[-1]))
    return slurm_jobs(ids)


def job_alive(states: dict):
    """``job_alive(job_id)`` for the plan: True/False from the batch of SLURM states, None when not asked."""
    if not states:
        return None
    return lambda job_id: (
        None if states.get(slurm_id(job_id)) is None else states[slurm_id(job_id)].split()[0] in ALIVE_STATES
    )


def plan(store, specs):
    """The store's plan, with the scheduler asked once about every job the runs' records name."""
    return store.plan(specs, job_alive=job_alive(job_states(store, specs)))


def run_log_dir(store, spec, status) -> Path:
    """The submitit folder of a run's jobs: the experiment's that submitted it (a run two experiments share
    was submitted by one of them)."""
    return Path(status.log_dir or Path(store.root) / spec.experiment / ".submitit")


def run_log_paths(store, spec, status):
    """(stdout, stderr) of the newest job of a run."""
    return log_paths(run_log_dir(store, spec, status), status.job_ids[-1])


def failure_reason(store, entry) -> str:
    """Why a run failed: in a multi-task job, the rank that failed first (its node and error) when that was
    not rank 0 (whose own error is then mostly a peer gone mid-collective), led by the ranks that reported
    nothing (a lost node); else the record's reason."""
    reason = entry.reason or "failed"
    if not entry.job_ids:
        return reason
    try:
        status = store.read_status(entry.key)
    except ResultsError:
        return reason
    if status is None:
        return reason
    first = first_failure(run_log_dir(store, entry.spec, status), entry.job_ids[-1])
    if first and not first.startswith("rank 0 "):
        told = not status.reason or status.reason.splitlines()[0][:1000] in first  # rank 0's note is the record's
        described = first if told else f"{first} (rank 0: {status.reason})"
        return described + (f"; {job_not_ended(status)}" if entry.action == "skip" else "")
    return reason


def status_text(experiment, store) -> str:
    specs = unique_runs(expand(experiment))
    infos = job_infos(store, specs)  # one batched query: states for the plan, nodes for the table
    entries = store.plan(specs, job_alive=job_alive({j: info["state"] for j, info in infos.items()}))
    seeded = any(len(row.seeds) > 1 for row in experiment.rows)
    header = ["row"] + (["seed"] if seeded else []) + ["run id", "state", "job", "progress"]
    table, notes, reasons = [], [], {}
    for e in entries:
        spec = e.spec
        job = e.job_ids[-1] if e.job_ids else "-"
        nodes = (infos.get(slurm_id(job)) or {}).get("nodes") if e.job_ids and slurm_id(job) else None
        if nodes and e.state == "running":
            job += f" on {nodes}"
        training = e.kind == "train" and e.state in ("running", "interrupted", "done", "failed", "cancelled", "stale")
        records = store.read_log(spec.run_id) if training else []
        done = progress(records, spec.config.train.epochs)
        prefix = {"train": "", "evaluate": "evaluation ", "measure": "measurement "}[e.kind]
        state = prefix + e.state + (f" ({e.reason})" if e.reason and e.state not in ("failed",) else "")
        table.append(
            [spec.label]
            + ([str(spec.seed)] if seeded else [])
            + [e.key, state, job, done.text() if records or e.state == "running" else ""]
        )
        if e.state in ("running", "interrupted", "failed", "stale") and e.job_ids:
            notes.append(f"  {spec.label}: log {run_log_paths(store, spec, store.read_status(e.key))[0]}")
        if e.state == "failed":
            reasons.setdefault(failure_reason(store, e), []).append(spec.label)
    lines = [f"{experiment.name} ({experiment.scale} scale, {experiment.path}): {len(entries)} run(s)", ""]
    lines += text_table(header, table, indent="  ")
    if notes:
        lines += [""] + notes
    for reason, labels in reasons.items():  # one line per failure reason, whatever the number of rows
        lines += ["", f"failed ({len(labels)}): {reason}", "  rows: " + ", ".join(labels)]
    return "\n".join(lines)


def cancel(experiment, store) -> List[str]:
    """Stop the queued and running jobs of the selected rows (SLURM's in one ``scancel``, local ones through
    their process group: each executor its own jobs); mark the runs cancelled."""
    specs = unique_runs(expand(experiment))
    entries = [
        e
        for e in plan(store, specs)
        if e.job_ids
        and (e.state in ("queued", "running") or e.state in ("interrupted", "failed") and e.action == "skip")
    ]
    cancel_jobs([e.job_ids[-1] for e in entries])
    for e in entries:
        store.mark_cancelled(e.key)
    return [f"cancelled {e.spec.label!r} ({e.key}, job {e.job_ids[-1]})" for e in entries]
