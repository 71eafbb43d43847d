"""A run's status.json (its state, its jobs, when it changed, why it failed) and the pure rule that turns
what is on disk into a plan entry: run it, or leave it alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from harness.grid import RunSpec
from harness.store.claims import STALE_AFTER_S

# the states a record's status.json holds (DESIGN.md, Lifecycle); a plan adds new, stale, corrupt, claimed, ...
STATES = ("queued", "running", "interrupted", "done", "failed", "cancelled")


@dataclass(frozen=True)
class Status:
    state: str
    job_ids: Tuple[str, ...] = ()
    queued_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    updated_at: Optional[str] = None
    reason: Optional[str] = None  # why it failed, was interrupted or cancelled
    log_tail: Optional[str] = None  # the last lines of the job's log when it failed
    host: Optional[str] = None
    attempts: int = 0  # times it started running (requeues included)
    log_dir: Optional[str] = None  # where the submitting experiment's jobs write their logs

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["job_ids"] = list(self.job_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Status":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["job_ids"] = tuple(str(j) for j in values.get("job_ids") or ())
        if values.get("state") not in STATES:
            raise ValueError(f"state {values.get('state')!r} is not one of {', '.join(STATES)}")
        return cls(**values)


@dataclass(frozen=True)
class PlanEntry:
    spec: RunSpec
    # the state of the record ``key`` names: new | done | queued | running | interrupted | failed | cancelled |
    # stale (its job or process is gone) | corrupt | claimed | changed (ran under another configuration) | outdated
    # (of an earlier checkpoint) |
    # no checkpoint (an evaluation with nothing to evaluate)
    state: str
    action: str  # run | skip
    reason: str = ""
    job_ids: Tuple[str, ...] = ()
    kind: str = "train"  # train (then evaluate and measure) | evaluate | measure: what a job of this entry does

    @property
    def key(self) -> str:
        """The record this entry is about: the run, or the row's evaluation or measurement of it."""
        return self.spec.key(self.kind)


# ------------------------------------------------------------------------------------------ pure rules


def decide(
    status: Optional[Status],
    status_error: Optional[str] = None,
    metrics_error: Optional[str] = None,
    claim_stale: Optional[bool] = None,
    job_alive: Optional[bool] = None,
    status_age_s: Optional[float] = None,
    stale_after_s: float = STALE_AFTER_S,
) -> Tuple[str, str, str]:
    """(state, action, reason) of one run from what is on disk.

    ``claim_stale``: None without a claim file; ``job_alive``: whether the job the record names still exists
    (a local job's process, a SLURM job as the scheduler says), None when unknown.
    Done runs are skipped; failed, cancelled and interrupted ones run (resuming from their checkpoint) once their
    job has ended (a SLURM job that lost a node is requeued after its record says failed); a run
    whose files are corrupt is rerun, and so is a stale one (:func:`stale_reason`).
    """
    if status_error:
        return "corrupt", "run", status_error
    if status is None:
        if claim_stale is False:
            return "claimed", "skip", "another submission is submitting it"
        return "new", "run", ""
    if status.state == "done":
        if metrics_error:
            return "corrupt", "run", metrics_error
        return "done", "skip", ""
    if status.state == "failed":
        if job_alive:  # a job that lost a node is failed by its rank 0 a minute before SLURM requeues it
            return "failed", "skip", f"{status.reason or 'failed'}; {job_not_ended(status)}"
        return "failed", "run", status.reason or "failed"
    if status.state == "cancelled":
        return "cancelled", "run", "cancelled; resumes from its checkpoint"
    if status.state == "interrupted":
        if job_alive or claim_stale is False:
            return "interrupted", "skip", "its job is still stopping, or was requeued"
        return "interrupted", "run", f"{status.reason or 'interrupted'}; resumes from its checkpoint"
    stale = stale_reason(status, claim_stale, job_alive, status_age_s, stale_after_s)
    if stale:
        return "stale", "run", stale
    return status.state, "skip", ""


def job_not_ended(status: Status) -> str:
    """What a failed record whose job is still alive adds to its reason (the plan then leaves it to its job)."""
    job = status.job_ids[-1] if status.job_ids else "?"
    return f"its job {job} has not ended (SLURM may requeue it): resubmit once it has, or --cancel it"


def stale_reason(
    status: Status,
    claim_stale: Optional[bool],
    job_alive: Optional[bool],
    status_age_s: Optional[float] = None,
    stale_after_s: float = STALE_AFTER_S,
) -> Optional[str]:
    """Why a queued or running record is stale (the one rule, for plans and submissions alike), None if not:
    its job or process no longer exists; its holder's process is gone or stopped heartbeating (unless its
    executor says the job is still there: a requeued job waiting to start again); or it has said running for
    ``stale_after_s`` with no claim and no update."""
    job = status.job_ids[-1] if status.job_ids else "?"
    if job_alive is False:
        return f"{status.state}, but job {job} no longer exists"
    if claim_stale and job_alive is not True:  # a job its executor still has (requeued, pending) is not
        return f"{status.state}, but its holder (job {job}) is gone or stopped heartbeating"
    if status.state == "running" and claim_stale is None and status_age_s is not None and status_age_s > stale_after_s:
        return f"running, but no claim and no update for {status_age_s / 60:.0f} min"
    return None
