"""Local jobs as processes one can follow and stop like SLURM jobs, and the one ``cancel`` for every executor.

A local job is submitit's controller process (``python -m submitit.local._local``) and its task processes.
:func:`detached_local_jobs` starts each controller in a session of its own, ignoring SIGINT: a Ctrl-C in the
submitting terminal reaches the submission only, which then stops its job through :func:`stop_local_job`
(and a job outlives a submission killed outright, as a SLURM job does). Stopping a local job signals its
process group: SIGTERM first (the tasks stop at the next iteration with a checkpoint; the controller passes
SIGTERM on to them), SIGINT to stop hard (the tasks stop at once; the controller ignores it), SIGKILL last.

Job ids carry their executor (:mod:`harness.store.jobs`): ``local:<pid>:<start>`` never reaches
squeue/scancel. Nothing here imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import types
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import submitit

from harness.store.jobs import LOCAL, local_job_id, process_alive, slurm_id, split_job_id

# what stop_local_job sends, by how hard it stops
STOP_SIGNALS = {"stop": signal.SIGTERM, "hard": signal.SIGINT, "kill": signal.SIGKILL}


def _ignore_sigint() -> None:  # in the controller, before it execs: inherited, and kept by Python
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _detached_popen(*args, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("start_new_session", True)
    kwargs.setdefault("preexec_fn", _ignore_sigint)
    return subprocess.Popen(*args, **kwargs)


@contextmanager
def detached_local_jobs() -> Iterator[None]:
    """Local jobs submitted inside start in a session of their own, with SIGINT ignored by the controller."""
    from submitit.local import local as submitit_local

    module = submitit_local.subprocess
    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    shim.Popen = _detached_popen
    submitit_local.subprocess = shim
    try:
        yield
    finally:
        submitit_local.subprocess = module


def job_id_of(job: submitit.Job, kind: str) -> str:
    """The id a record keeps for a submitted job: ``local:<pid>:<start>`` for a local job, SLURM's own id."""
    if kind == LOCAL:
        return local_job_id(int(job.job_id))
    return str(job.job_id)


def current_job_id() -> Optional[str]:
    """The id of the job this process runs in, as :func:`job_id_of` gave it at submission (None outside one)."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not in a submitit job
        return os.environ.get("SLURM_JOB_ID")
    if env.cluster == LOCAL and str(env.job_id).isdigit():
        return local_job_id(int(env.job_id))
    return str(env.job_id)


def stop_local_job(job_id: str, how: str = "stop") -> bool:
    """Signal a local job's process group (``how``: stop | hard | kill, see :data:`STOP_SIGNALS`); False when
    its process is gone (or ``job_id`` is not a local id)."""
    executor, native = split_job_id(job_id)
    pid, _, start = native.partition(":")
    if executor != LOCAL or not pid.isdigit() or not process_alive(int(pid), start or None):
        return False
    sig = STOP_SIGNALS[how]
    try:
        if os.getpgid(int(pid)) == int(pid):  # its own process group: the controller and its tasks
            os.killpg(int(pid), sig)
        else:  # started before jobs were detached: the controller only
            os.kill(int(pid), signal.SIGTERM if how == "hard" else sig)
    except ProcessLookupError:
        return False
    return True


def cancel(job_ids: Sequence[str]) -> None:
    """Stop every job: local jobs through their process group (:func:`stop_local_job`), SLURM jobs in one
    ``scancel`` (SLURM sends SIGTERM first). Either way a running job stops at its next iteration with a
    checkpoint."""
    from harness.launch.slurm import scancel

    for job_id in job_ids:
        if split_job_id(job_id)[0] == LOCAL:
            stop_local_job(job_id)
    scancel([slurm_id(j) for j in job_ids if slurm_id(j) is not None])


class LocalStopper:
    """While a submission waits for its local jobs: Ctrl-C (or SIGTERM) asks the running job to stop at its next
    iteration with a checkpoint, and no further job is started; again, it stops the job at once (no checkpoint;
    the last complete one stays); a third time, or ``kill_after_s`` after the second, kills its processes.
    Jobs are added with :meth:`add` as they are submitted; one added after a stop is stopped at once."""

    HOW = ("stop", "hard", "kill")

    def __init__(self, kill_after_s: float = 15.0, announce=None):
        self.job_ids: list = []
        self.count = 0
        self.kill_after_s = kill_after_s
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous: dict = {}

    @property
    def stopped(self) -> bool:
        return self.count > 0

    def __enter__(self) -> "LocalStopper":
        try:
            for num in (signal.SIGINT, signal.SIGTERM):
                self._previous[num] = signal.signal(num, self._on_signal)
        except ValueError:  # not the main thread: signals stay where they were
            pass
        return self

    def __exit__(self, *exc) -> None:
        for num, previous in self._previous.items():
            signal.signal(num, previous)

    def add(self, job_id: str) -> None:
        self.job_ids.append(job_id)
        if self.count:
            stop_local_job(job_id, self.HOW[min(self.count, 3) - 1])

    def _on_signal(self, num: int, frame) -> None:
        self.count += 1
        how = self.HOW[min(self.count, 3) - 1]
        self.announce(
            {
                "stop": "stopping: the running job saves a checkpoint at its next iteration "
                "(Ctrl-C again to stop it at once)",
                "hard": "stopping at once: the last complete checkpoint is kept",
                "kill": "killing the job's processes",
            }[how]
        )
        for job_id in self.job_ids:
            stop_local_job(job_id, how)
        if how == "hard":
            timer = threading.Timer(self.kill_after_s, lambda: [stop_local_job(j, "kill") for j in self.job_ids])
            timer.daemon = True
            timer.start()
