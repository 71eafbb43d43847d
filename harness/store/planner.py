"""The plan of a row: which of its records (training, evaluation, measurement) is done, and what to run.

A mixin of :class:`~harness.store.store.ResultsStore` (it reads through the store's own methods), kept apart
so that the rule stays readable: the training first; then the row's evaluation and measurement of it, each
only where the checkpoint they need is there; a record whose config.yaml no longer matches today's
resolution of its row is ``changed`` (not done), an evaluation of an earlier checkpoint ``outdated``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, List, Optional, Sequence, Tuple

from harness.grid import ExperimentError, RunSpec, config_from_dict, differences
from harness.provenance import parse_utc
from harness.store.files import CorruptFileError
from harness.store.jobs import LOCAL, executor_of, local_job_alive
from harness.store.status import PlanEntry, Status, decide
from model.config import EVALUATION, MEASUREMENT, WEIGHTS, ConfigError
from model.released import location

CHECKPOINT = "checkpoint.pth"  # the training's newest checkpoint (harness.run.checkpointing writes it)
CONFIG, METRICS = "config.yaml", "metrics.json"


ASK = object()  # judge the record's claim.lock as it is on disk


class Planning:
    def plan_one(
        self, spec: RunSpec, job_alive: Optional[Callable[[str], Optional[bool]]] = None, claim_stale=ASK
    ) -> PlanEntry:
        """``claim_stale``: the verdict on the records' claims (a submission that has just taken a claim judges
        the record as it was before); by default each claim.lock as it is.

        The training first: until it is done, the entry is the training's. Then the row's evaluation of it
        (``spec.eval_key``), then its measurement (``spec.measure_key``): done, queued or running as their own
        records say, else the one to run: only where the training's checkpoint is there to evaluate or
        measure."""
        training = self._plan_record(spec, spec.run_id, WEIGHTS, job_alive, claim_stale)
        if training.state != "done":
            return training
        trained = self._checkpoint_sha256(spec.run_id)
        for kind, missing, role in (
            ("evaluate", "its evaluation", EVALUATION),
            ("measure", "its measurement", MEASUREMENT),
        ):
            key = spec.key(kind)
            entry = dataclasses.replace(self._plan_record(spec, key, role, job_alive, claim_stale), kind=kind)
            if entry.state == "done" and trained is not None and self._checkpoint_sha256(key) not in (None, trained):
                entry = dataclasses.replace(
                    entry,
                    state="outdated",
                    action="run",
                    reason="made from an earlier checkpoint; the training was redone",
                )
            weights = (
                location(spec.config.eval.checkpoint)
                if spec.config.eval.eval_only
                else self.record_dir(spec.run_id) / CHECKPOINT
            )
            if entry.state in ("new", "outdated") and kind == "evaluate" and not weights.exists():
                return dataclasses.replace(
                    entry,
                    state="no checkpoint",
                    action="skip",
                    reason=(
                        f"its training is done but {weights} is not there to evaluate (checkpoints are never "
                        "committed); --rerun trains it again"
                    ),
                )
            if entry.state == "new":
                return dataclasses.replace(entry, reason=f"its training is done; {missing} is not")
            if entry.state != "done":
                return entry
        return training  # all done: the row is its run

    def _checkpoint_sha256(self, key: str) -> Optional[str]:
        """The checkpoint a done record was made from (training: the one it wrote), None where unknown."""
        try:
            return (self.read_metrics(key) or {}).get("checkpoint_sha256")
        except CorruptFileError:
            return None

    def config_differences(self, spec: RunSpec, key: str, role: str) -> List[Tuple[str, object, object]]:
        """The fields of ``role`` whose value in the record's config.yaml differs from today's resolution of
        the row (a changed default or recipe); :class:`CorruptFileError` for an unreadable config.yaml."""
        stored = self.read_config(key)
        if stored is None or not isinstance(stored.get("config"), dict):
            return []
        try:
            then = config_from_dict(stored["config"])
        except (ExperimentError, ConfigError, TypeError) as e:
            raise CorruptFileError(
                self.record_dir(key) / CONFIG, f"not a configuration this version reads ({e})"
            ) from None
        return differences(then, spec.config, role)

    def job_alive(self, status: Status, ask: Optional[Callable[[str], Optional[bool]]] = None) -> Optional[bool]:
        """Whether the newest job of a record still exists: a local job's process (pid and start time) when it
        ran on this host, a SLURM job as ``ask(job_id)`` says (True/False/None = unknown); each executor is
        asked about its own jobs only."""
        if not status.job_ids:
            return None
        job = status.job_ids[-1]
        if executor_of(job) == LOCAL:
            return local_job_alive(job) if status.host in (None, self.host) else None
        return ask(job) if ask is not None else None

    def _plan_record(self, spec: RunSpec, key: str, role: str, job_alive, claim_stale=ASK) -> PlanEntry:
        status, status_error, metrics_error, changed = None, None, None, []
        try:
            status = self.read_status(key)
            changed = self.config_differences(spec, key, role)
        except CorruptFileError as e:
            status_error = str(e)
        if status is not None and status.state == "done":
            try:
                if self.read_metrics(key) is None:
                    metrics_error = f"{self.record_dir(key) / METRICS}: missing"
            except CorruptFileError as e:
                metrics_error = str(e)
        alive = None
        if status is not None and status.state in ("queued", "running", "interrupted", "failed"):
            alive = self.job_alive(status, job_alive)
        age = None
        if status is not None:
            updated = parse_utc(status.updated_at)
            age = None if updated is None else self.clock() - updated
        claim_stale = self.claim_stale(key) if claim_stale is ASK else claim_stale
        state, action, reason = decide(status, status_error, metrics_error, claim_stale, alive, age, self.stale_after_s)
        if changed and state not in ("corrupt",):
            # its numbers belong to the configuration it ran with, not to today's resolution of the row
            shown = "; ".join(f"{k} {json.dumps(a)} then, {json.dumps(b)} now" for k, a, b in changed)
            state, action, reason = (
                "changed",
                "skip",
                (
                    f"{key} ran with another configuration: {shown}; set the old value in the experiment to keep "
                    "its numbers, or --rerun to run it again"
                ),
            )
        return PlanEntry(spec, state, action, reason, status.job_ids if status else ())

    def plan(
        self, specs: Sequence[RunSpec], job_alive: Optional[Callable[[str], Optional[bool]]] = None
    ) -> List[PlanEntry]:
        """One entry per spec: done/queued/running rows are skipped, new/failed/interrupted/stale/corrupt ones run.
        ``job_alive(job_id)`` (True/False/None = unknown) is the scheduler's answer about SLURM jobs (local jobs'
        processes are looked at directly): a job gone makes its record stale."""
        return [self.plan_one(spec, job_alive) for spec in specs]
