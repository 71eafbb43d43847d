"""A run's status.json (its state, its jobs, when it changed, why it failed) and the pure rule that turns
what is on disk into a plan entry: run it, or leave it alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from harness.grid import RunSpec
from harness.store.claims import STALE_AFTER_S

STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass(frozen=True)
class Status:
    state: str
    job_ids: Tuple[str, ...] = ()
    queued_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    updated_at: Optional[str] = None
    reason: Optional[str] = None          # why it failed
    log_tail: Optional[str] = None        # the last lines of the job's log when it failed
    host: Optional[str] = None
    attempts: int = 0                     # times it started running (requeues included)
    log_dir: Optional[str] = None         # where the submitting experiment's jobs write their logs

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
    # the state of the record ``key`` names: new | done | queued | running | failed | cancelled | stale | lost |
    # corrupt | claimed | changed (ran under another configuration) | outdated (of an earlier checkpoint) |
    # no checkpoint (an evaluation with nothing to evaluate)
    state: str
    action: str         # run | skip
    reason: str = ""
    job_ids: Tuple[str, ...] = ()
    kind: str = "train"  # train (then evaluate and measure) | evaluate | measure: what a job of this entry does

    @property
    def key(self) -> str:
        """The record this entry is about: the run, or the row's evaluation or measurement of it."""
        return self.spec.key(self.kind)


# ------------------------------------------------------------------------------------------ pure rules

def decide(status: Optional[Status], status_error: Optional[str] = None, metrics_error: Optional[str] = None,
           claim_stale: Optional[bool] = None, job_alive: Optional[bool] = None,
           status_age_s: Optional[float] = None, stale_after_s: float = STALE_AFTER_S) -> Tuple[str, str, str]:
    """(state, action, reason) of one run from what is on disk.

    ``claim_stale``: None without a claim file; ``job_alive``: None when the scheduler was not asked.
    Done runs are skipped, failed ones rerun; a run whose files are corrupt, whose job is gone, or whose
    holder stopped heartbeating is rerun too.
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
        return "failed", "run", status.reason or "failed"
    if status.state == "cancelled":
        return "cancelled", "run", "cancelled; resumes from its checkpoint"
    # queued or running
    if job_alive is False:
        return "lost", "run", f"job {', '.join(status.job_ids) or '?'} is no longer known to the scheduler"
    if status.state == "running":
        if claim_stale:
            return "stale", "run", "the running job stopped heartbeating"
        if claim_stale is None and status_age_s is not None and status_age_s > stale_after_s:
            return "stale", "run", f"running, but no claim and no update for {status_age_s / 60:.0f} min"
    return status.state, "skip", ""
