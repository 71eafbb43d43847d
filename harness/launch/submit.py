"""Launching runs through submitit: SLURM, local processes or in-process (debug).

One job per spec (one array task when several specs share the same resources), arrays split under the
cluster's ``MaxArraySize``, a snapshot of the code per submission, and requeue on preemption or time-out.

* :func:`submit` is the one entry point: ``submit(specs, fn, launcher, log_dir, executor=None)`` runs
  ``fn(spec)`` for each spec and returns submitit job handles, in the order of ``specs``.
* ``fn`` is wrapped in :class:`~harness.launch.wrapper.ResumableJob`, a ``submitit.helpers.Checkpointable``: when
  SLURM signals a
  pre-emption or an imminent time-out, submitit calls its ``checkpoint()``, which resubmits the same call,
  and requeues the job. The same happens, without the signal, when SLURM kills and requeues a job itself
  (``scontrol requeue``, a node failure): the batch script runs again. Either way ``fn`` must resume from
  the latest checkpoint in its run folder, which makes a requeued run finish like an uninterrupted one.
* Multi-task jobs: one task per GPU (``tasks_per_node`` defaults to ``gpus_per_node``); before ``fn`` runs,
  :func:`~harness.launch.environment.distributed_env_from_submitit` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` so ``fn`` initialises ``torch.distributed`` with ``env://``.
* Code snapshot: :func:`~harness.launch.snapshot.snapshot_code` copies the repository's files (tracked, plus untracked
  files that
  git does not ignore) to ``<snapshot_root>/<content hash>/``; the jobs import the code from there (the
  job's working directory and ``PYTHONPATH``), so editing the code after submitting does not change what
  queued or requeued jobs run. Relative paths in a spec still resolve against the directory ``submit``
  was called from.

Nothing here imports torch.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import submitit

from harness.config import LauncherConfig
from harness.launch.environment import environment_for_local_jobs, without_job_variables
from harness.launch.executors import LaunchError, make_executor, max_array_size, resolve_executor
from harness.launch.local import detached_local_jobs
from harness.launch.snapshot import snapshot_code
from harness.launch.wrapper import ResumableJob

LauncherArg = Union[LauncherConfig, Callable[[Any], LauncherConfig]]


def _chunks(items: Sequence[Any], size: int) -> List[Sequence[Any]]:
    size = max(1, int(size))
    return [items[i : i + size] for i in range(0, len(items), size)]


def group_by_launcher(specs: Sequence[Any], launcher: LauncherArg) -> List[Tuple[LauncherConfig, List[int]]]:
    """Indices of the specs that share one launcher config (one array each), in first-seen order."""
    groups: Dict[LauncherConfig, List[int]] = {}
    for i, spec in enumerate(specs):
        cfg = launcher(spec) if callable(launcher) and not isinstance(launcher, LauncherConfig) else launcher
        if not isinstance(cfg, LauncherConfig):
            raise LaunchError(f"launcher for spec {i} is {type(cfg).__name__}, not a LauncherConfig")
        groups.setdefault(cfg, []).append(i)
    return list(groups.items())


def submit(
    specs: Sequence[Any],
    fn: Callable[[Any], Any],
    launcher: LauncherArg,
    log_dir: Union[str, Path],
    executor: Optional[str] = None,
    *,
    job_name: str = "harness",
    snapshot_root: Union[str, Path, None] = None,
    repo_root: Union[str, Path, None] = None,
    snapshot_include: Sequence[str] = (),
    workdir: Union[str, Path, None] = None,
    on_submitted: Optional[Callable[[Any, submitit.Job], None]] = None,
) -> List[submitit.Job]:
    """Run ``fn(spec)`` for every spec; returns one submitit job per spec, in the order of ``specs``.

    ``launcher`` is a :class:`LauncherConfig` or a function giving one per spec; specs sharing a config go
    into job arrays of at most ``max_array_size`` tasks (and the cluster's ``MaxArraySize``). ``executor``:
    auto | slurm | local | debug (``auto``: slurm when ``sbatch`` exists); None takes the launcher config's
    (the first spec's, when they differ). ``log_dir`` holds submitit's
    pickles and logs (``%j_0_log.out``). With ``snapshot_root`` the code is snapshot there (see
    :func:`snapshot_code`) and the jobs run it; ``workdir`` (default: the current directory) is where the
    jobs resolve relative paths. ``on_submitted(spec, job)`` is called after each submission (to record
    the job id as the run's status, for instance).

    A debug job runs in this process when its result is asked for, with a single task.
    """
    specs = list(specs)
    if not specs:
        return []
    groups = group_by_launcher(specs, launcher)
    kind = resolve_executor(executor if executor is not None else groups[0][0].executor)
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir).resolve() if workdir else Path.cwd()
    snapshot_dir = None
    if snapshot_root is not None and kind != "debug":
        snapshot_dir = snapshot_code(snapshot_root, repo_root=repo_root, include=snapshot_include)
    job_fn = ResumableJob(fn, workdir=workdir, snapshot_dir=snapshot_dir)

    jobs: List[Optional[submitit.Job]] = [None] * len(specs)
    for cfg, indices in groups:
        size = max_array_size(cfg, kind)
        ex = make_executor(kind, log_dir, cfg, job_name=job_name, snapshot_dir=snapshot_dir)
        for chunk in _chunks(indices, size):
            with (
                without_job_variables(),
                detached_local_jobs(),
                environment_for_local_jobs(snapshot_dir if kind == "local" else None, workdir),
            ):
                try:
                    with ex.batch():
                        pending = [ex.submit(job_fn, specs[i]) for i in chunk]
                except (
                    subprocess.CalledProcessError,
                    submitit.core.utils.FailedJobError,
                    submitit.core.utils.FailedSubmissionError,
                ) as err:
                    raise LaunchError(f"submission of {len(chunk)} job(s) failed: {err}") from err
            for i, job in zip(chunk, pending):
                jobs[i] = job
                if on_submitted is not None:
                    on_submitted(specs[i], job)
    return [j for j in jobs if j is not None]
