"""Following jobs: SLURM states (squeue/scontrol; accounting may be off), log paths, results, waiting."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import submitit

from harness.launch.executors import LaunchError
from harness.store.jobs import native_id

# SLURM job states, as squeue/scontrol print them
PENDING_STATES = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "RESV_DEL_HOLD",
    "SUSPENDED",
    "RESIZING",
}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
    "SPECIAL_EXIT",
}
ALIVE_STATES = PENDING_STATES | RUNNING_STATES


def _run(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_jobs(job_ids: Sequence[str]) -> Dict[str, Dict[str, Optional[str]]]:
    """``{"state", "nodes"}`` of every job id (``123`` or an array task ``123_4``); state None where SLURM no
    longer knows the job, nodes None until it has some (pending) or where SLURM does not say.

    Batched, whatever the number of jobs (cluster administrators forbid a query per job): one ``squeue``
    for all of them; for those it does not list, one ``sacct`` (accounting may be off), then one
    ``scontrol show job`` over the jobs the controller still remembers.
    """
    jobs: Dict[str, Dict[str, Optional[str]]] = {
        j: {"state": None, "nodes": None} for j in sorted({str(j) for j in job_ids})
    }
    if not jobs:
        return jobs
    text = _run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T %N"])
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in jobs:
            jobs[fields[0]] = {"state": fields[1], "nodes": fields[2] if len(fields) > 2 and fields[2] else None}
    missing = [j for j, job in jobs.items() if job["state"] is None]
    if missing:
        text = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State,NodeList"])
        for line in (text or "").splitlines():
            fields = line.split("|")
            if len(fields) >= 2 and fields[0] in jobs and fields[1]:
                nodes = fields[2] if len(fields) > 2 and fields[2] not in ("", "None assigned") else None
                jobs[fields[0]] = {"state": fields[1].split()[0], "nodes": nodes}  # "CANCELLED by 0" -> CANCELLED
    missing = [j for j, job in jobs.items() if job["state"] is None]
    if missing:
        for record in (_run(["scontrol", "-o", "show", "job"]) or "").splitlines():
            fields = dict(f.split("=", 1) for f in record.split() if "=" in f)
            names = {fields.get("JobId")}
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId"):
                names.add(f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}")
            for name in names & set(missing):
                nodes = fields.get("NodeList")
                jobs[name] = {
                    "state": fields.get("JobState"),
                    "nodes": None if nodes in (None, "", "(null)") else nodes,
                }
    return jobs


def slurm_job_states(job_ids: Sequence[str]) -> Dict[str, Optional[str]]:
    """The state of every job id (``123`` or an array task ``123_4``), None where SLURM no longer knows it
    (one batched query: :func:`slurm_jobs`)."""
    return {job_id: job["state"] for job_id, job in slurm_jobs(job_ids).items()}


def slurm_job_state(job_id: str) -> Optional[str]:
    """The state of one job (see :func:`slurm_job_states`)."""
    return slurm_job_states([job_id])[str(job_id)]


def scancel(job_ids: Sequence[str]) -> None:
    """``scancel`` every SLURM job id in one call; SLURM sends SIGTERM first, so running jobs stop at their next
    iteration with a checkpoint. (:func:`harness.launch.local.cancel` sends each executor its own jobs.)"""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return
    try:
        out = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LaunchError(f"scancel failed: {err}") from None
    if out.returncode != 0:
        raise LaunchError(f"scancel {' '.join(ids)} failed: {out.stderr.strip() or out.returncode}")


def log_paths(log_dir: Union[str, Path], job_id: str, task: int = 0) -> Tuple[Path, Path]:
    """(stdout, stderr) of one task of a job submitted with ``log_dir`` (array task ids as ``123_4``; a local
    job's ``local:<pid>:<start>`` by its pid)."""
    paths = submitit.core.utils.JobPaths(Path(log_dir), job_id=native_id(job_id), task_id=task)
    return paths.stdout, paths.stderr


def rank_errors(log_dir: Union[str, Path], job_id: str) -> List[Dict[str, Any]]:
    """The errors the tasks of a job wrote as they failed (:func:`harness.launch.wrapper._note_rank_error`),
    earliest first: in a multi-task job the first is the cause, the others mostly its consequences."""
    native = native_id(job_id)
    pattern = re.compile(re.escape(native) + r"_(\d+)_error\.json$")
    found = []
    folder = Path(log_dir)
    if not folder.is_dir():
        return found
    for path in folder.glob(f"{native}_*_error.json"):
        if not pattern.match(path.name):
            continue
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda note: (note.get("time", 0), note.get("rank", 0)))


def silent_ranks(log_dir: Union[str, Path], job_id: str, notes: List[Dict[str, Any]]) -> List[Tuple[int, str]]:
    """``(rank, node)`` of the tasks that wrote neither a result nor an error while another wrote an error
    (``notes``): a rank whose node was lost (its processes killed or frozen with it), or one stuck before it
    could fail. Its node is the job's ``nodes[rank // tasks per node]`` (SLURM's block distribution)."""
    if not notes:
        return []
    first = notes[0]
    world_size, nodes = int(first.get("world_size") or 1), list(first.get("nodes") or [])
    per_node = max(1, world_size // max(1, len(nodes)))
    noted = {note.get("rank") for note in notes}
    silent = []
    for rank in range(world_size):
        result = submitit.core.utils.JobPaths(Path(log_dir), job_id=native_id(job_id), task_id=rank).result_pickle
        if rank not in noted and not result.exists():
            silent.append((rank, nodes[rank // per_node] if rank // per_node < len(nodes) else "an unknown node"))
    return silent


def first_failure(log_dir: Union[str, Path], job_id: str) -> Optional[str]:
    """The first error of a multi-task job, as ``rank 1 of 2 on nodeb: ValueError: ...``; led by the ranks that
    reported nothing when some did (a lost node: ``rank 1 of 2 on nodeb reported neither a result nor an error
    ...``, then the first error, mostly a collective timing out); None without any error."""
    notes = rank_errors(log_dir, job_id)
    if not notes:
        return None
    first = notes[0]
    error = f"rank {first.get('rank')} of {first.get('world_size')} on {first.get('node')}: {first.get('error')}"
    silent = silent_ranks(log_dir, job_id, notes)
    if not silent:
        return error
    who = ", ".join(f"rank {rank} of {first.get('world_size')} on {node}" for rank, node in silent)
    return f"{who} reported neither a result nor an error (its node lost, or the task killed or stuck); then {error}"


def _task_jobs(job: submitit.Job) -> List[submitit.Job]:
    return list(getattr(job, "_sub_jobs", None) or [job])


def has_result(job: submitit.Job) -> bool:
    """Every task of the job has written its result (or its error)."""
    return all(task.paths.result_pickle.exists() for task in _task_jobs(job))


def job_result(job: submitit.Job) -> Any:
    """The result of the job's first task (rank 0); raises what the job raised."""
    return job.results()[0]


def wait(
    jobs: Sequence[submitit.Job], timeout_s: Optional[float] = None, poll_s: float = 2.0, grace_s: float = 60.0
) -> List[Tuple[str, Any]]:
    """Wait for every job; ``[("success", result) | ("error", message), ...]`` in the order of ``jobs``.

    The result is rank 0's. A SLURM job that has left the queue without a result (killed, node
    failure) is an error after ``grace_s`` seconds (result files may lag on a shared file system).
    Debug jobs run here, one after the other.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    outcome: Dict[int, Tuple[str, Any]] = {}
    gone_since: Dict[int, float] = {}
    while len(outcome) < len(jobs):
        waiting = [
            str(job.job_id)
            for i, job in enumerate(jobs)
            if i not in outcome and isinstance(job, submitit.SlurmJob) and not has_result(job)
        ]
        states = slurm_job_states(waiting) if waiting else {}  # one query per poll for all jobs
        for i, job in enumerate(jobs):
            if i in outcome:
                continue
            if isinstance(job, submitit.SlurmJob) and str(job.job_id) in states:
                state = states[str(job.job_id)]
                if state is None or state.split()[0] in FINISHED_STATES:
                    first = gone_since.setdefault(i, time.monotonic())
                    if time.monotonic() - first > grace_s:
                        outcome[i] = (
                            "error",
                            f"job {job.job_id} ended ({state or 'gone from the queue'}) "
                            f"without a result; see {job.paths.stderr}",
                        )
                else:
                    gone_since.pop(i, None)
                continue
            if isinstance(job, submitit.DebugJob) or has_result(job) or job.done():
                if isinstance(job, submitit.LocalJob):  # this machine's disk: no result file is coming late
                    for task in _task_jobs(job) + [job]:
                        task._results_timeout_s = min(getattr(task, "_results_timeout_s", 15), 1)
                try:
                    outcome[i] = ("success", job_result(job))
                except Exception as err:  # noqa: BLE001 - the job raised: submitit carries its traceback
                    outcome[i] = ("error", str(err))
        if len(outcome) < len(jobs):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(jobs) - len(outcome)} of {len(jobs)} job(s) still running after {timeout_s:.0f} s"
                )
            time.sleep(poll_s)
    return [outcome[i] for i in range(len(jobs))]
