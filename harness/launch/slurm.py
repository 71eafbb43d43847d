"""Following jobs: SLURM states (squeue/scontrol; accounting may be off), log paths, results, waiting."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import submitit

# SLURM job states, as squeue/scontrol print them
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
                  "SUSPENDED", "RESIZING"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}



def slurm_job_state(job_id: str) -> Optional[str]:
    """The job's state from squeue, or scontrol for recently finished jobs; None when SLURM forgot it."""
    for cmd in (["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                ["scontrol", "-o", "show", "job", str(job_id)]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode != 0 or not out.stdout.strip():
            continue
        if cmd[0] == "squeue":
            return out.stdout.split()[0].strip()
        match = re.search(r"\bJobState=(\S+)", out.stdout)
        if match:
            return match.group(1)
    return None


def log_paths(log_dir: Union[str, Path], job_id: str, task: int = 0) -> Tuple[Path, Path]:
    """(stdout, stderr) of one task of a job submitted with ``log_dir`` (array task ids as ``123_4``)."""
    paths = submitit.core.utils.JobPaths(Path(log_dir), job_id=str(job_id), task_id=task)
    return paths.stdout, paths.stderr


def _task_jobs(job: submitit.Job) -> List[submitit.Job]:
    return list(getattr(job, "_sub_jobs", None) or [job])


def has_result(job: submitit.Job) -> bool:
    """Every task of the job has written its result (or its error)."""
    return all(task.paths.result_pickle.exists() for task in _task_jobs(job))


def job_result(job: submitit.Job) -> Any:
    """The result of the job's first task (rank 0); raises what the job raised."""
    return job.results()[0]




def wait(jobs: Sequence[submitit.Job], timeout_s: Optional[float] = None, poll_s: float = 2.0,
         grace_s: float = 60.0) -> List[Tuple[str, Any]]:
    """Wait for every job; ``[("success", result) | ("error", message), ...]`` in the order of ``jobs``.

    The result is rank 0's. A SLURM job that has left the queue without a result (killed, node
    failure) is an error after ``grace_s`` seconds (result files may lag on a shared file system).
    Debug jobs run here, one after the other.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    outcome: Dict[int, Tuple[str, Any]] = {}
    gone_since: Dict[int, float] = {}
    while len(outcome) < len(jobs):
        for i, job in enumerate(jobs):
            if i in outcome:
                continue
            if isinstance(job, submitit.SlurmJob) and not has_result(job):
                state = slurm_job_state(job.job_id)
                if state is None or state.split()[0] in FINISHED_STATES:
                    first = gone_since.setdefault(i, time.monotonic())
                    if time.monotonic() - first > grace_s:
                        outcome[i] = ("error", f"job {job.job_id} ended ({state or 'gone from the queue'}) "
                                               f"without a result; see {job.paths.stderr}")
                else:
                    gone_since.pop(i, None)
                continue
            if isinstance(job, submitit.DebugJob) or has_result(job) or job.done():
                try:
                    outcome[i] = ("success", job_result(job))
                except Exception as err:   # noqa: BLE001 - the job raised: submitit carries its traceback
                    outcome[i] = ("error", str(err))
        if len(outcome) < len(jobs):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(jobs) - len(outcome)} of {len(jobs)} job(s) still running "
                                   f"after {timeout_s:.0f} s")
            time.sleep(poll_s)
    return [outcome[i] for i in range(len(jobs))]

