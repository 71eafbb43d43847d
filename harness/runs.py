"""The results store: ``<root>/<experiment>/<run_id>/`` with config.yaml, status.json, log.jsonl,
metrics.json and claim.lock.

Writes are atomic (a temporary file in the same folder, fsync, ``os.replace``). Reads detect truncated
or corrupt JSON and name the file. A run is claimed atomically (a lock file created with ``os.link``,
which fails if it exists) so that two submissions never run a row twice. :func:`decide` is the pure
rule that turns what is on disk into a plan entry.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import yaml

from harness.experiment import (Experiment, RunSpec, config_to_dict, estimate_gpu_hours, expand,
                                world_size)

STATES = ("queued", "running", "done", "failed")
CONFIG, STATUS, LOG, METRICS, CLAIM = "config.yaml", "status.json", "log.jsonl", "metrics.json", "claim.lock"
BENCHMARK = "benchmark.json"   # complexity/speed measured alone (no training): never marks a run done
STALE_AFTER_S = 30 * 60     # a claim whose holder has not heartbeated for this long is stale


class ResultsError(Exception):
    """A problem with the results folder; names the path."""

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = str(path), message


class CorruptFileError(ResultsError):
    """A truncated or corrupt results file (never loaded silently)."""


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
class Claim:
    path: str
    token: str
    host: str
    pid: int
    time: float
    job_id: Optional[str] = None


@dataclass(frozen=True)
class PlanEntry:
    spec: RunSpec
    state: str          # new | done | queued | running | failed | stale | lost | corrupt | claimed
    action: str         # run | skip
    reason: str = ""
    job_ids: Tuple[str, ...] = ()


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
    # queued or running
    if job_alive is False:
        return "lost", "run", f"job {', '.join(status.job_ids) or '?'} is no longer known to the scheduler"
    if status.state == "running":
        if claim_stale:
            return "stale", "run", "the running job stopped heartbeating"
        if claim_stale is None and status_age_s is not None and status_age_s > stale_after_s:
            return "stale", "run", f"running, but no claim and no update for {status_age_s / 60:.0f} min"
    return status.state, "skip", ""


def claim_is_stale(info: dict, now: float, mtime: float, host: str, pid_alive: Callable[[int], bool],
                   stale_after_s: float = STALE_AFTER_S) -> bool:
    """A claim is stale if its process is gone (same host) or it has not heartbeated for too long."""
    if info.get("host") == host and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
        return True
    return now - mtime > stale_after_s


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def utc_now(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))


def _parse_time(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        import calendar
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- file I/O

def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path) -> Optional[dict]:
    """The JSON object at ``path``; None if absent; :class:`CorruptFileError` if truncated or corrupt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise CorruptFileError(path, "corrupt: not UTF-8 text") from None
    if not text.strip():
        raise CorruptFileError(path, "corrupt: the file is empty (truncated write?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(path, f"truncated or corrupt JSON (line {e.lineno}, column {e.colno}: "
                               f"{e.msg})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(path, f"corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def tail_text(path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a (log) file, for status.json of a failed run."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def fsync_dir(path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- store

class ResultsStore:
    """``results/<experiment>/<run_id>/``. Methods take the experiment's name and the run id."""

    def __init__(self, root, clock: Callable[[], float] = time.time, host: Optional[str] = None,
                 stale_after_s: float = STALE_AFTER_S):
        self.root = Path(root)
        self.clock = clock
        self.host = host or socket.gethostname()
        self.stale_after_s = stale_after_s

    # -- layout
    def run_dir(self, experiment: str, run_id: str) -> Path:
        return self.root / experiment / run_id

    def run_ids(self, experiment: str) -> List[str]:
        folder = self.root / experiment
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    # -- before anything starts
    def check_writable(self, min_free_gb: float = 1.0) -> None:
        """Raise :class:`ResultsError` if the results root cannot be written or the disk is nearly full."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-check.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(b"\0" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                os.unlink(probe)
        except OSError as e:
            raise ResultsError(self.root, f"the results folder is not writable ({e.strerror or e}); "
                               "expected a folder this user can write, e.g. --results DIR") from None
        free_gb = shutil.disk_usage(self.root).free / 2 ** 30
        if free_gb < min_free_gb:
            raise ResultsError(self.root, f"only {free_gb:.2f} GiB free on its disk; expected at least "
                               f"{min_free_gb:g} GiB for checkpoints and results")

    # -- config.yaml
    def prepare(self, spec: RunSpec) -> Path:
        """Create the run folder and write its resolved config.yaml (if not there yet)."""
        folder = self.run_dir(spec.experiment, spec.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / CONFIG).exists():
            doc = {"experiment": spec.experiment, "label": spec.label, "seed": spec.seed,
                   "scale": spec.scale, "run_id": spec.run_id, "config": config_to_dict(spec.config)}
            atomic_write_text(folder / CONFIG, yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
        return folder

    def read_config(self, experiment: str, run_id: str) -> Optional[dict]:
        path = self.run_dir(experiment, run_id) / CONFIG
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except yaml.YAMLError as e:
            raise CorruptFileError(path, f"corrupt YAML ({e})") from None
        if not isinstance(data, dict):
            raise CorruptFileError(path, "corrupt: expected a mapping")
        return data

    # -- status.json
    def read_status(self, experiment: str, run_id: str) -> Optional[Status]:
        path = self.run_dir(experiment, run_id) / STATUS
        data = read_json(path)
        if data is None:
            return None
        try:
            return Status.from_dict(data)
        except (TypeError, ValueError) as e:
            raise CorruptFileError(path, f"corrupt status: {e}") from None

    def write_status(self, experiment: str, run_id: str, state: str, job_id: Optional[str] = None,
                     **fields) -> Status:
        """Merge ``fields`` into the run's status and write it atomically; returns the new status."""
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
        folder = self.run_dir(experiment, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            old = self.read_status(experiment, run_id)
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
            d["attempts"] = int(d.get("attempts") or 0) + 1
            d.update(reason=None, log_tail=None, finished_at=None)
        else:
            d["finished_at"] = now
        status = Status.from_dict(d)
        atomic_write_json(folder / STATUS, status.to_dict())
        return status

    def mark_queued(self, experiment: str, run_id: str, job_id: Optional[str] = None) -> Status:
        return self.write_status(experiment, run_id, "queued", job_id=job_id)

    def mark_running(self, experiment: str, run_id: str, job_id: Optional[str] = None) -> Status:
        return self.write_status(experiment, run_id, "running", job_id=job_id)

    def mark_done(self, experiment: str, run_id: str) -> Status:
        return self.write_status(experiment, run_id, "done")

    def mark_failed(self, experiment: str, run_id: str, reason: str, log_tail: str = "") -> Status:
        return self.write_status(experiment, run_id, "failed", reason=reason, log_tail=log_tail)

    # -- log.jsonl
    def append_log(self, experiment: str, run_id: str, record: dict) -> None:
        """Append one JSON line (fsynced). A line cut short by a crash is closed off first."""
        path = self.run_dir(experiment, run_id) / LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def read_log(self, experiment: str, run_id: str, strict: bool = False) -> List[dict]:
        """Records of log.jsonl. An unterminated last line (a crash mid-write) is always dropped; other
        bad lines are skipped, or with ``strict`` raise :class:`CorruptFileError` naming the line."""
        path = self.run_dir(experiment, run_id) / LOG
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
    def write_metrics(self, experiment: str, run_id: str, metrics: dict) -> None:
        folder = self.run_dir(experiment, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / METRICS, metrics)

    def read_metrics(self, experiment: str, run_id: str) -> Optional[dict]:
        """metrics.json, None if absent; :class:`CorruptFileError` if truncated or corrupt."""
        return read_json(self.run_dir(experiment, run_id) / METRICS)

    # -- benchmark.json
    def write_benchmark(self, experiment: str, run_id: str, measured: dict) -> None:
        """Params, FLOPs and FPS of a run's configuration measured without training it (the same
        fields as metrics.json). The report shows them; the run's status is not touched."""
        folder = self.run_dir(experiment, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / BENCHMARK, measured)

    def read_benchmark(self, experiment: str, run_id: str) -> Optional[dict]:
        return read_json(self.run_dir(experiment, run_id) / BENCHMARK)

    # -- claim.lock
    def claim(self, experiment: str, run_id: str, job_id: Optional[str] = None) -> Optional[Claim]:
        """Claim the run for this process; None if a live holder has it.

        A stale claim (holder process gone on this host, or no heartbeat for ``stale_after_s``) is
        broken; a claim held by the same ``job_id`` (a requeued SLURM job) is taken over.
        """
        folder = self.run_dir(experiment, run_id)
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / CLAIM
        for _ in range(5):
            claim = Claim(str(lock), uuid.uuid4().hex, self.host, os.getpid(), self.clock(),
                          None if job_id is None else str(job_id))
            if self._create_lock(lock, claim):
                return claim
            info, mtime = self._read_lock(lock)
            if info is None and mtime is None:
                continue                        # released meanwhile: try again
            same_job = job_id is not None and info is not None and info.get("job_id") == str(job_id)
            stale = info is None and self.clock() - mtime > 60 or info is not None and claim_is_stale(
                info, self.clock(), mtime, self.host, pid_alive, self.stale_after_s)
            if not (same_job or stale):
                return None
            self._break_lock(lock, None if info is None else info.get("token"))
        return None

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the claim (a running job calls this more often than ``stale_after_s``); False if lost."""
        info, _ = self._read_lock(Path(claim.path))
        if info is None or info.get("token") != claim.token:
            return False
        now = self.clock()
        os.utime(claim.path, (now, now))
        return True

    def release(self, claim: Claim) -> None:
        info, _ = self._read_lock(Path(claim.path))
        if info is not None and info.get("token") == claim.token:
            self._break_lock(Path(claim.path), claim.token)

    def read_claim(self, experiment: str, run_id: str) -> Tuple[Optional[dict], Optional[float]]:
        return self._read_lock(self.run_dir(experiment, run_id) / CLAIM)

    def claim_stale(self, experiment: str, run_id: str) -> Optional[bool]:
        """None without a claim; else whether it is stale."""
        info, mtime = self.read_claim(experiment, run_id)
        if mtime is None:
            return None
        if info is None:
            return self.clock() - mtime > 60
        return claim_is_stale(info, self.clock(), mtime, self.host, pid_alive, self.stale_after_s)

    def claim_for_submit(self, spec: RunSpec, job_alive: Optional[Callable[[str], Optional[bool]]] = None
                         ) -> Optional[Claim]:
        """Claim a run to submit it, then check again that no one queued it meanwhile. The caller
        submits, writes ``mark_queued`` and releases. None: skip this run."""
        claim = self.claim(spec.experiment, spec.run_id)
        if claim is None:
            return None
        entry = self.plan_one(spec, job_alive, ignore_claim=True)     # the claim is ours now
        if entry.action != "run":
            self.release(claim)
            return None
        return claim

    def _create_lock(self, lock: Path, claim: Claim) -> bool:
        info = {"token": claim.token, "host": claim.host, "pid": claim.pid, "time": claim.time,
                "job_id": claim.job_id}
        fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=".claim.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, lock)              # atomic; fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError:                     # a filesystem without hard links
                try:
                    fd2 = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd2, "w") as f:
                    json.dump(info, f)
                return True
        finally:
            os.unlink(tmp)

    def _read_lock(self, lock: Path) -> Tuple[Optional[dict], Optional[float]]:
        try:
            mtime = lock.stat().st_mtime
            info = json.loads(lock.read_text())
        except FileNotFoundError:
            return None, None
        except (ValueError, OSError):
            return None, mtime
        return (info if isinstance(info, dict) else None), mtime

    def _break_lock(self, lock: Path, token: Optional[str]) -> None:
        """Move the lock aside; if what was moved is not the one judged (a race), put it back."""
        aside = lock.with_name(f".{CLAIM}.{uuid.uuid4().hex}.broken")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            return
        info, _ = self._read_lock(aside)
        if token is not None and (info or {}).get("token") != token:
            try:
                os.link(aside, lock)
            except OSError:
                pass
        os.unlink(aside)

    # -- planning
    def plan_one(self, spec: RunSpec, job_alive: Optional[Callable[[str], Optional[bool]]] = None,
                 ignore_claim: bool = False) -> PlanEntry:
        status, status_error, metrics_error = None, None, None
        try:
            status = self.read_status(spec.experiment, spec.run_id)
        except CorruptFileError as e:
            status_error = str(e)
        if status is not None and status.state == "done":
            try:
                if self.read_metrics(spec.experiment, spec.run_id) is None:
                    metrics_error = f"{self.run_dir(spec.experiment, spec.run_id) / METRICS}: missing"
            except CorruptFileError as e:
                metrics_error = str(e)
        alive = None
        if job_alive is not None and status is not None and status.state in ("queued", "running") and status.job_ids:
            alive = job_alive(status.job_ids[-1])
        age = None
        if status is not None:
            updated = _parse_time(status.updated_at)
            age = None if updated is None else self.clock() - updated
        claim_stale = None if ignore_claim else self.claim_stale(spec.experiment, spec.run_id)
        state, action, reason = decide(status, status_error, metrics_error, claim_stale, alive, age,
                                       self.stale_after_s)
        return PlanEntry(spec, state, action, reason, status.job_ids if status else ())

    def plan(self, specs: Sequence[RunSpec], job_alive: Optional[Callable[[str], Optional[bool]]] = None
             ) -> List[PlanEntry]:
        """One entry per spec: done/queued/running rows are skipped, new/failed/stale/corrupt ones run.
        ``job_alive(job_id)`` (True/False/None = unknown) lets a scheduler query mark lost jobs."""
        return [self.plan_one(spec, job_alive) for spec in specs]


# ------------------------------------------------------------------------------------------- dry run

def dry_run_plan(experiment: Experiment, store: Optional[ResultsStore] = None,
                 job_alive: Optional[Callable[[str], Optional[bool]]] = None) -> str:
    """The plan as text: per run its row, seed, run id, state, action, resources and estimated GPU-hours
    (see :func:`harness.experiment.estimate_gpu_hours`), then the totals. Submits nothing."""
    specs = expand(experiment)
    entries = store.plan(specs, job_alive) if store is not None else [
        PlanEntry(s, "new", "run") for s in specs]
    header = ("row", "seed", "run id", "state", "action", "resources", "est. GPU-h")
    table, total, to_spend, seen = [], 0.0, 0.0, set()
    for entry in entries:
        spec = entry.spec
        cfg = spec.config
        row = experiment.row(spec.label)
        hours = estimate_gpu_hours(cfg, row.paper.get("gpu_hours"), row.cells.get("epochs"))
        duplicate = spec.run_id in seen
        seen.add(spec.run_id)
        if not duplicate:
            total += hours
            if entry.action == "run":
                to_spend += hours
        l = cfg.launcher
        if l.gpus_per_node and cfg.data.dataset == "coco":
            gpus = l.nodes * l.gpus_per_node
            wall_h = hours / gpus if gpus else math.nan
            resources = f"{l.nodes}x{l.gpus_per_node} GPU, {l.executor}"
            if l.partition:
                resources += f" ({l.partition})"
            parts = math.ceil(wall_h * 60 / l.timeout_min) if wall_h == wall_h and wall_h > 0 else 1
            resources += f", ~{wall_h:.0f} h wall" + (f", {parts - 1} requeue(s)" if parts > 1 else "")
        else:
            resources = f"{world_size(l)} CPU process(es), {l.executor}"
        action = "shared" if duplicate else entry.action
        state = entry.state + (f" ({entry.reason})" if entry.reason and entry.action == "run" else "")
        table.append((spec.label, str(spec.seed), spec.run_id, state, action, resources,
                      f"{hours:.0f}" if hours else "-"))
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    lines = [f"{experiment.name} ({experiment.scale} scale, {experiment.path}): {len(entries)} run(s)", ""]
    for r in [header, tuple("-" * w for w in widths)] + table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    cited = [r.label for r in experiment.rows if r.cited]
    lines.append("")
    if cited:
        lines.append(f"cited rows (paper numbers only, not run): {', '.join(cited)}")
    lines.append(f"estimated GPU-hours (V100-equivalent): {total:.0f} in total, {to_spend:.0f} to spend now")
    return "\n".join(lines) + "\n"
