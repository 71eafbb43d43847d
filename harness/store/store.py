"""The results store: ``<root>/runs/<run_id>/`` with config.yaml, status.json, log.jsonl, attempts.jsonl,
metrics.json and claim.lock, and the same files in each of its ``evaluations/<eval_id>/`` and
``measurements/<measure_id>/`` records (one record per number: DESIGN.md, Records).

Every write is atomic (:mod:`harness.store.files`); a run is claimed before it is submitted or run
(:mod:`harness.store.claims`); :meth:`ResultsStore.plan` applies the rule of :mod:`harness.store.status`
to what is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import yaml

from harness.grid import EVALUATIONS, SCHEMA_VERSION, RunSpec, config_to_dict
from harness.grid.specs import MEASUREMENTS
from harness.provenance import utc_now
from harness.store import attempts as attempt_log
from harness.store.claims import (
    CLAIM,
    STALE_AFTER_S,
    Claim,
    break_lock,
    claim_is_stale,
    create_lock,
    own_start,
    read_lock,
)
from harness.store.files import (
    CorruptFileError,
    ResultsError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    probe_writable,
    read_json,
)
from harness.store.jobs import LOCAL, executor_of
from harness.store.planner import CONFIG, METRICS, Planning
from harness.store.status import STATES, Status

STATUS, LOG = "status.json", "log.jsonl"
RUNS = "runs"


class ResultsStore(Planning):
    """``results/runs/<run_id>/``, shared by every experiment; methods take a record's key (a run id, or the
    key of one of its evaluations or measurements: :meth:`RunSpec.key`). An experiment's own
    folder ``results/<experiment>/`` holds only what its submissions write (job logs, code snapshots)."""

    def __init__(
        self,
        root,
        clock: Callable[[], float] = time.time,
        host: Optional[str] = None,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.root = Path(root)
        self.clock = clock
        self.host = host or socket.gethostname()
        self.stale_after_s = stale_after_s

    # -- layout
    def record_dir(self, key: str) -> Path:
        """``<root>/runs/<key>/``: the folder of a record, ``key`` a run id (one folder per training whichever
        experiments need it: a training two tables share runs once) or its ``<run_id>/evaluations/<eval_id>``
        or ``<run_id>/measurements/<measure_id>``."""
        return self.root / RUNS / key

    def run_ids(self) -> List[str]:
        folder = self.root / RUNS
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    # -- before anything starts
    def check_writable(self, min_free_gb: float = 1.0) -> None:
        """Raise :class:`ResultsError` if the results root cannot be written or the disk is nearly full."""
        try:
            probe_writable(self.root)
        except OSError as e:
            raise ResultsError(
                self.root,
                f"the results folder is not writable ({e.strerror or e}); "
                "expected a folder this user can write, e.g. --results DIR",
            ) from None
        free_gb = shutil.disk_usage(self.root).free / 2**30
        if free_gb < min_free_gb:
            raise ResultsError(
                self.root,
                f"only {free_gb:.2f} GiB free on its disk; expected at least "
                f"{min_free_gb:g} GiB for checkpoints and results",
            )

    # -- config.yaml
    def prepare(self, spec: RunSpec, key: Optional[str] = None) -> Path:
        """Create the record's folder (the run's, or ``key``: its evaluation's) and write the resolved
        config.yaml of the row that asked for it first (if not there yet, or unreadable): the full resolved
        configuration, against which later plans compare today's resolution of the row, and the command-line
        overrides that row was submitted with (``overrides: [train.epochs=3]``; ``[]``: the experiment as
        written), which ``--status --all`` lists."""
        folder = self.record_dir(key or spec.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            present = self.read_config(key or spec.run_id) is not None
        except CorruptFileError:
            present = False
        if not present:
            doc = {
                "experiment": spec.experiment,
                "label": spec.label,
                "seed": spec.seed,
                "scale": spec.scale,
                "schema": SCHEMA_VERSION,
                "run_id": spec.run_id,
                "eval_id": spec.eval_id,
                "measure_id": spec.measure_id,
                "overrides": list(spec.overrides),
                "config": config_to_dict(spec.config),
            }
            atomic_write_text(folder / CONFIG, yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
        return folder

    def read_config(self, key: str) -> Optional[dict]:
        path = self.record_dir(key) / CONFIG
        try:
            # libyaml's loader where PyYAML has it: a plan of a thousand runs reads a thousand of these
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except FileNotFoundError:
            return None
        except yaml.YAMLError as e:
            raise CorruptFileError(path, f"corrupt YAML ({e})") from None
        if not isinstance(data, dict):
            raise CorruptFileError(path, "corrupt: expected a mapping")
        return data

    # -- status.json
    def read_status(self, key: str) -> Optional[Status]:
        path = self.record_dir(key) / STATUS
        data = read_json(path)
        if data is None:
            return None
        try:
            return Status.from_dict(data)
        except (TypeError, ValueError) as e:
            raise CorruptFileError(path, f"corrupt status: {e}") from None

    def write_status(self, key: str, state: str, job_id: Optional[str] = None, **fields) -> Status:
        """Merge ``fields`` into the run's status and write it atomically; returns the new status."""
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
        folder = self.record_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            old = self.read_status(key)
        except CorruptFileError:
            old = None
        now = utc_now(self.clock)
        d = old.to_dict() if old else {"state": state}
        d.update(fields)
        d["state"] = state
        d["updated_at"] = now
        if job_id is not None and str(job_id) not in d.get("job_ids", []):
            d["job_ids"] = list(d.get("job_ids", [])) + [str(job_id)]
        if state == "queued":
            d["queued_at"] = now
            d.update(reason=None, log_tail=None, finished_at=None)
        elif state == "running":
            d["started_at"] = now
            d["host"] = fields.get("host", self.host)
            # the attempt number from attempts.jsonl too: it survives a lost or corrupt status.json
            d["attempts"] = max(int(d.get("attempts") or 0), attempt_log.last_attempt(folder)) + 1
            d.update(reason=None, log_tail=None, finished_at=None)
        else:
            d["finished_at"] = now
        status = Status.from_dict(d)
        atomic_write_json(folder / STATUS, status.to_dict())
        return status

    def mark_queued(self, key: str, job_id: Optional[str] = None, log_dir: Optional[str] = None) -> Status:
        fields = {} if log_dir is None else {"log_dir": str(log_dir)}
        if job_id is not None and executor_of(job_id) == LOCAL:
            fields["host"] = self.host  # where its process can be looked at
        return self.write_status(key, "queued", job_id=job_id, **fields)

    def mark_running(self, key: str, job_id: Optional[str] = None) -> Status:
        return self.write_status(key, "running", job_id=job_id)

    def mark_done(self, key: str) -> Status:
        return self.write_status(key, "done")

    def complete(self, key: str, metrics: dict) -> Status:
        """Write the record's metrics, then mark it done: a done record always has its numbers."""
        self.write_metrics(key, metrics)
        return self.mark_done(key)

    def mark_failed(self, key: str, reason: str, log_tail: str = "") -> Status:
        return self.write_status(key, "failed", reason=reason, log_tail=log_tail)

    def mark_cancelled(self, key: str) -> Status:
        """Cancelled by the user; its checkpoints stay, and the next submission resumes from them."""
        return self.write_status(key, "cancelled", reason="cancelled by the user")

    def mark_interrupted(self, key: str, reason: str = "interrupted", job_id: Optional[str] = None) -> Optional[Status]:
        """Stopped by a signal (Ctrl-C, SIGTERM, a cancel, a pre-emption): its checkpoints stay, and the next
        submission resumes from them. Only a queued or running record (of ``job_id``, when given) is marked: a
        cancelled, failed or done one keeps its state. Returns the new status, or None when left as it was."""
        try:
            status = self.read_status(key)
        except CorruptFileError:
            status = None
        if status is not None and (
            status.state not in ("queued", "running")
            or job_id is not None
            and status.job_ids
            and status.job_ids[-1] != str(job_id)
        ):
            return None
        return self.write_status(key, "interrupted", reason=reason)

    # -- log.jsonl
    def append_log(self, key: str, record: dict) -> None:
        """Append one record to the run's log.jsonl (see :func:`~harness.store.files.append_jsonl`)."""
        append_jsonl(self.record_dir(key) / LOG, record)

    def read_log(self, key: str, strict: bool = False) -> List[dict]:
        """Records of log.jsonl. An unterminated last line (a crash mid-write) is always dropped; other
        bad lines are skipped, or with ``strict`` raise :class:`CorruptFileError` naming the line."""
        path = self.record_dir(key) / LOG
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        if lines and not text.endswith("\n"):
            lines = lines[:-1]
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                if strict:
                    raise CorruptFileError(path, f"corrupt line {i + 1}") from None
                continue
            records.append(record)
        return records

    # -- metrics.json
    def write_metrics(self, key: str, metrics: dict) -> None:
        """The record's numbers (``key``: a run, or its ``evaluations/<eval_id>`` or
        ``measurements/<measure_id>``): each record holds only the numbers it produced."""
        folder = self.record_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / METRICS, metrics)

    def read_metrics(self, key: str) -> Optional[dict]:
        """metrics.json, None if absent; :class:`CorruptFileError` if truncated or corrupt."""
        return read_json(self.record_dir(key) / METRICS)

    # -- attempts.jsonl
    def record_attempt(
        self, key: str, attempt, started: float, gpus: int, event: str = "beat", job_id: Optional[str] = None
    ) -> None:
        """This attempt at the record has run from ``started`` until now on ``gpus`` GPUs: one line appended to
        its attempts.jsonl (:mod:`harness.store.attempts`), when it starts, on every heartbeat and when it ends,
        so a job killed without warning loses at most one heartbeat. Each record (training, evaluation,
        measurement) has its own attempts."""
        attempt_log.append_attempt(self.record_dir(key), attempt, started, self.clock(), gpus, event, job_id)

    def gpu_hours(self, key: str) -> float:
        """GPU-hours over every attempt at the record (0 for CPU runs), whatever became of status.json."""
        return attempt_log.gpu_hours(self.record_dir(key))

    def attempts(self, key: str) -> int:
        """How many attempts the record has seen (attempts.jsonl, else status.json)."""
        try:
            status = self.read_status(key)
        except CorruptFileError:
            status = None
        return max(attempt_log.last_attempt(self.record_dir(key)), status.attempts if status else 0)

    # -- claim.lock
    def claim(self, key: str, job_id: Optional[str] = None, role: str = "job") -> Optional[Claim]:
        """Claim the run for this process; None if a live holder has it.

        A stale claim (holder process gone on this host, or no heartbeat for ``stale_after_s``) is
        broken; a claim held by the same ``job_id`` (a requeued SLURM job) is taken over. ``role``: job, or
        submit for a submission that holds it until its job is queued.
        """
        folder = self.record_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / CLAIM
        for _ in range(5):
            claim = Claim(
                str(lock),
                uuid.uuid4().hex,
                self.host,
                os.getpid(),
                self.clock(),
                None if job_id is None else str(job_id),
                role,
                own_start(),
            )
            if create_lock(lock, claim):
                return claim
            info, mtime = read_lock(lock)
            if info is None and mtime is None:
                continue  # released meanwhile: try again
            same_job = job_id is not None and info is not None and info.get("job_id") == str(job_id)
            stale = claim_is_stale(info, self.clock(), mtime, self.host, stale_after_s=self.stale_after_s)
            if not (same_job or stale):
                return None
            break_lock(lock, None if info is None else info.get("token"))
        return None

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the claim (a running job calls this more often than ``stale_after_s``); False if lost."""
        info, _ = read_lock(Path(claim.path))
        if info is None or info.get("token") != claim.token:
            return False
        now = self.clock()
        os.utime(claim.path, (now, now))
        return True

    def release(self, claim: Claim) -> None:
        info, _ = read_lock(Path(claim.path))
        if info is not None and info.get("token") == claim.token:
            break_lock(Path(claim.path), claim.token)

    def read_claim(self, key: str) -> Tuple[Optional[dict], Optional[float]]:
        return read_lock(self.record_dir(key) / CLAIM)

    def claim_stale(self, key: str) -> Optional[bool]:
        """None without a claim; else whether it is stale."""
        info, mtime = self.read_claim(key)
        if mtime is None:
            return None
        return claim_is_stale(info, self.clock(), mtime, self.host, stale_after_s=self.stale_after_s)

    def claimed_by_submission(self, key: str) -> bool:
        """A live submission holds the record (it releases it once its job is queued)."""
        info, _ = self.read_claim(key)
        return (info or {}).get("role") == "submit" and self.claim_stale(key) is False

    def claim_for_submit(
        self, spec: RunSpec, job_alive: Optional[Callable[[str], Optional[bool]]] = None
    ) -> Optional[Claim]:
        """Claim a run to submit it, then check again that no one queued it meanwhile. The caller
        submits, writes ``mark_queued`` and releases. None: skip this run.

        The same rule as the plan (:func:`~harness.store.status.decide`): a record the plan calls stale (its job
        or process gone, its holder gone) is taken over, its stale claim broken; the check after claiming
        judges the record as the plan did before the claim was ours."""
        entry = self.plan_one(spec, job_alive)
        if entry.action != "run":
            return None
        verdict = self.claim_stale(entry.key)
        claim = self.claim(entry.key, role="submit")
        if claim is None:
            return None
        entry = self.plan_one(spec, job_alive, claim_stale=verdict)  # the claim is ours now
        if entry.action != "run":
            self.release(claim)
            return None
        return claim

    # -- --rerun
    def rerun_paths(self, spec: RunSpec) -> List[Path]:
        """What rerunning a row deletes: its training's own files (checkpoints, log, status, numbers) and the
        row's evaluation and measurement records. Other rows' evaluations and measurements of the same
        training stay; the new checkpoint makes them outdated, and they run again when their rows are
        submitted."""
        folder = self.record_dir(spec.run_id)
        keep = {EVALUATIONS, MEASUREMENTS, CLAIM}
        paths = [p for p in sorted(folder.iterdir()) if p.name not in keep] if folder.is_dir() else []
        for key in (spec.eval_key, spec.measure_key):
            if self.record_dir(key).is_dir():
                paths.append(self.record_dir(key))
        return paths

    @staticmethod
    def remove(paths: Sequence[Path]) -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
