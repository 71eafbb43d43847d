"""Submitting runs through submitit (SLURM, local processes, in-process debug) and following them.

executors.py    which executor, and the parameters submitit gets (sbatch options, arrays)
snapshot.py     the code a job runs, copied per submission
environment.py  job variables: rank/rendezvous export, what a submission must not pass on
wrapper.py      inside the job: ResumableJob, stop signals (soft, then hard), requeue
local.py        local jobs: detached processes, their ids, stopping them; cancel for every executor
follow.py       --status, --logs, --cancel: each executor asked about its own jobs
submit.py       submit(specs, fn, launcher, log_dir, executor)
slurm.py        job states, log paths, waiting for results
check.py        a toy distributed job that checks a cluster end to end
"""

from harness.launch.environment import ENV_SNAPSHOT, ENV_WORKDIR, distributed_env_from_submitit, master_port_for
from harness.launch.executors import (
    LaunchError,
    check_launcher,
    executor_parameters,
    explain_executor,
    make_executor,
    resolve_executor,
    slurm_available,
    tasks_per_node,
)
from harness.launch.local import LocalStopper, cancel, current_job_id, job_id_of, stop_local_job
from harness.launch.slurm import ALIVE_STATES, log_paths, slurm_job_state, slurm_job_states, wait
from harness.launch.snapshot import SNAPSHOT_INFO, snapshot_code
from harness.launch.submit import submit
from harness.launch.wrapper import ResumableJob

__all__ = [
    "ALIVE_STATES",
    "ENV_SNAPSHOT",
    "ENV_WORKDIR",
    "LaunchError",
    "LocalStopper",
    "ResumableJob",
    "SNAPSHOT_INFO",
    "cancel",
    "check_launcher",
    "current_job_id",
    "distributed_env_from_submitit",
    "executor_parameters",
    "explain_executor",
    "job_id_of",
    "log_paths",
    "make_executor",
    "master_port_for",
    "resolve_executor",
    "slurm_available",
    "slurm_job_state",
    "slurm_job_states",
    "snapshot_code",
    "stop_local_job",
    "submit",
    "tasks_per_node",
    "wait",
]
