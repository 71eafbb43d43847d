"""Claims: at most one live holder per run, so two submissions (or a submission and a requeued job) never
run a row twice.

A claim is a lock file created with ``os.link`` (atomic, fails if it exists) holding its token, host, pid
(with the process's start time, so a reused pid is not taken for the holder), job id and role (``job``, or
``submit`` for a submission that holds the run only until its job is queued); its holder refreshes its
mtime (heartbeat). A claim is stale when its process is gone (same host) or it has not been refreshed for
:data:`STALE_AFTER_S`; a stale claim may be broken.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from harness.store.jobs import process_alive, process_start

CLAIM = "claim.lock"
STALE_AFTER_S = 30 * 60  # a claim whose holder has not heartbeated for this long is stale
# a claim file that cannot be read: its writer died between creating and renaming it, or it is being replaced;
# a minute is far longer than a write takes
UNREADABLE_STALE_S = 60


@dataclass(frozen=True)
class Claim:
    path: str
    token: str
    host: str
    pid: int
    time: float
    job_id: Optional[str] = None
    role: str = "job"  # job | submit (a submission, until its job is queued)
    start: Optional[str] = None  # the holder process's start time


def claim_is_stale(
    info: Optional[dict],
    now: float,
    mtime: float,
    host: str,
    alive: Callable[[int, Optional[str]], bool] = process_alive,
    stale_after_s: float = STALE_AFTER_S,
) -> bool:
    """A claim is stale if its process is gone (same host: the pid, started when the claim says) or it has not
    heartbeated for too long. An unreadable claim (``info`` None) is stale after :data:`UNREADABLE_STALE_S`."""
    if info is None:
        return now - mtime > UNREADABLE_STALE_S
    if info.get("host") == host and isinstance(info.get("pid"), int) and not alive(info["pid"], info.get("start")):
        return True
    return now - mtime > stale_after_s


def own_start() -> Optional[str]:
    """This process's start time, as claims record it."""
    return process_start(os.getpid())


def create_lock(lock: Path, claim: Claim) -> bool:
    """Create ``lock`` holding ``claim``; False if it exists already."""
    info = {
        "token": claim.token,
        "host": claim.host,
        "pid": claim.pid,
        "time": claim.time,
        "job_id": claim.job_id,
        "role": claim.role,
        "start": claim.start,
    }
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=".claim.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock)  # atomic; fails if the lock exists
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd2 = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w") as f:
                json.dump(info, f)
            return True
    finally:
        os.unlink(tmp)


def read_lock(lock: Path) -> Tuple[Optional[dict], Optional[float]]:
    try:
        mtime = lock.stat().st_mtime
        info = json.loads(lock.read_text())
    except FileNotFoundError:
        return None, None
    except (ValueError, OSError):
        return None, mtime
    return (info if isinstance(info, dict) else None), mtime


def break_lock(lock: Path, token: Optional[str]) -> None:
    """Move the lock aside; if what was moved is not the one judged (a race), put it back."""
    aside = lock.with_name(f".{CLAIM}.{uuid.uuid4().hex}.broken")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    info, _ = read_lock(aside)
    if token is not None and (info or {}).get("token") != token:
        try:
            os.link(aside, lock)
        except OSError:
            pass
    os.unlink(aside)
