"""Job ids carry their executor, and a process is known by its pid *and* its start time.

* ``local:<pid>:<start>``: a job of the local executor, a process on the host the record names (the pid of
  submitit's local controller and that process's start time, so a pid the system hands to another process
  later is not taken for the job);
* anything else is a SLURM id (``123``, an array task ``123_4``; ``slurm:123`` is read too). A bare number
  in a record written before ids were tagged is a SLURM id.

Local ids never reach ``squeue``/``scancel``: :func:`slurm_id` is None for them. Nothing here imports torch.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

LOCAL, SLURM = "local", "slurm"


def split_job_id(job_id: str) -> Tuple[str, str]:
    """(executor, the id that executor knows): ``local:12:34`` -> (local, 12:34), ``123_4`` -> (slurm, 123_4)."""
    job_id = str(job_id)
    executor, sep, rest = job_id.partition(":")
    if sep and executor in (LOCAL, SLURM):
        return executor, rest
    return SLURM, job_id


def executor_of(job_id: str) -> str:
    return split_job_id(job_id)[0]


def slurm_id(job_id: str) -> Optional[str]:
    """The id squeue/scancel know, None for a local job."""
    executor, native = split_job_id(job_id)
    return native if executor == SLURM else None


def native_id(job_id: str) -> str:
    """The id submitit names its files by (a local job's pid, a SLURM job's id)."""
    executor, native = split_job_id(job_id)
    return native.split(":")[0] if executor == LOCAL else native


def local_pid(job_id: str) -> Optional[int]:
    executor, native = split_job_id(job_id)
    if executor != LOCAL:
        return None
    pid = native.split(":")[0]
    return int(pid) if pid.isdigit() else None


def local_job_id(pid: int) -> str:
    """The id of a local job whose (controller) process is ``pid``: ``local:<pid>:<start>``."""
    return f"{LOCAL}:{int(pid)}:{process_start(pid) or '?'}"


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22; psutil's
    create_time elsewhere), None when there is no such live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode("ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return _psutil_start(pid)
    fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _psutil_start(pid: int) -> Optional[str]:
    try:
        import psutil
    except ImportError:
        return "?" if pid_exists(pid) else None
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{proc.create_time():.2f}"
    except psutil.Error:
        return None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether ``pid`` is the live process that started at ``start`` (any start when None or unknown)."""
    now = process_start(pid)
    if now is None:
        return False
    return start in (None, "?") or now in ("?", str(start))


def local_job_alive(job_id: str) -> Optional[bool]:
    """Whether a local job's process still runs on this host (None: not a local id)."""
    executor, native = split_job_id(job_id)
    if executor != LOCAL:
        return None
    pid, _, start = native.partition(":")
    return pid.isdigit() and process_alive(int(pid), start or None)
