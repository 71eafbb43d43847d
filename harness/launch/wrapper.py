"""Inside the job: :class:`ResumableJob` runs ``fn(spec)`` from the code snapshot, notes stop signals,
and asks submitit to requeue the same call on pre-emption or time-out.

One stop path for every executor (DESIGN.md, Lifecycle): SIGINT (Ctrl-C), SIGTERM (``scancel``, ``--cancel``
of a local run, ``scontrol requeue``) and submitit's pre-emption / time-out signal set the flag
:func:`stop_requested`; the work polls it (every optimiser step, every evaluation batch), writes an atomic
checkpoint and raises a :class:`JobInterrupted`. A SIGINT after a stop was asked for stops harder: it raises
:class:`HardStop` at once (no checkpoint), except inside :func:`stop_deferred` (a checkpoint being written),
where it waits until the write is complete.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Union

import submitit
from submitit.core.utils import DelayedSubmission

from harness.launch.environment import ENV_SNAPSHOT, ENV_WORKDIR, distributed_env_from_submitit
from harness.launch.executors import LaunchError
from harness.launch.slurm import scancel
from harness.store.files import atomic_write_text


def _log(message: str) -> None:
    print(f"harness.launch: {message}", file=sys.stderr, flush=True)


def _job_cluster() -> Optional[str]:
    """slurm | local | debug inside a submitit job, None outside one."""
    try:
        return submitit.JobEnvironment().cluster
    except RuntimeError:
        return None


def rank_error_path(result_pickle: Path) -> Path:
    """Where a task writes the error that ended it, beside submitit's ``<job>_<task>_result.pkl``."""
    return result_pickle.with_name(result_pickle.name.replace("_result.pkl", "_error.json"))


def _forget_previous_attempt() -> None:
    """A requeued job runs again under the same id: drop this task's result file from an earlier
    attempt (an error written while the job was being pre-empted), so only this attempt's counts."""
    try:
        paths = submitit.JobEnvironment().paths
        paths.result_pickle.unlink(missing_ok=True)
        rank_error_path(paths.result_pickle).unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - not in a submitit job, or nothing to remove
        pass


def _note_rank_error(err: BaseException) -> None:
    """Every task that fails writes which rank it is, its node and its error, when: in a multi-node job the
    first failure is the cause (``--status`` shows it) and the others' (a peer gone mid-collective) follow."""
    try:
        job_env = submitit.JobEnvironment()
        path = rank_error_path(job_env.paths.result_pickle)
        note = {
            "rank": job_env.global_rank,
            "world_size": job_env.num_tasks,
            "job_id": str(job_env.job_id),
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "time": time.time(),
            "nodes": list(job_env.hostnames),  # whose node a rank that reports nothing was on
            "error": f"{type(err).__name__}: {err}".strip().splitlines()[0][:1000],
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-4000:],
        }
        atomic_write_text(path, json.dumps(note))
    except Exception:  # noqa: BLE001 - not in a submitit job, or the folder is not writable: nothing to note
        pass


# After submitit's pre-emption / time-out signal, how long the job may take to stop on its own (polling
# stop_requested(), saving a mid-epoch checkpoint) before submitit's own handler requeues it regardless.
STOP_GRACE_S = 30

_stop_signals: List[int] = []  # signals that asked this process to stop
_deferred_requeue: List[Callable[[], Any]] = []  # submitit's requeue, held back while the job stops itself
_deferring: List[bool] = []  # inside stop_deferred(): a hard stop waits
_hard_pending: List[int] = []  # a hard stop that arrived while deferred


class JobInterrupted(SystemExit):
    """The job stopped on request (a stop signal): its state is saved where it could be, and the record is
    marked interrupted (or queued again, when the job is being requeued). A ``SystemExit``, so code that marks
    failures on ``Exception`` leaves it alone."""


class HardStop(JobInterrupted):
    """A second Ctrl-C: stop now, without a checkpoint (the last complete one stays)."""


def stop_requested() -> bool:
    """True once this job has been asked to stop: SIGINT (Ctrl-C), SIGTERM (``scancel``, a cancel of a local
    run, ``scontrol requeue``) or submitit's pre-emption / time-out signal. Long work polls it, saves its state
    and raises :class:`JobInterrupted`; the next submission (or the requeued job) resumes from that state."""
    return bool(_stop_signals)


def stop_signal_names() -> str:
    """The signals that asked this job to stop, each once, in order (``SIGTERM, SIGINT``); empty when none did."""
    names = []
    for num in _stop_signals:
        try:
            names.append(signal.Signals(num).name)
        except ValueError:
            names.append(str(num))
    return ", ".join(dict.fromkeys(names))


def requeue_pending() -> bool:
    """The stop came with submitit's pre-emption / time-out signal: the job is requeued once it has stopped."""
    return bool(_deferred_requeue)


@contextmanager
def stop_deferred() -> Iterator[None]:
    """A section a hard stop must not cut (a checkpoint written and renamed): the stop waits for its end."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
        if not _deferring and _hard_pending:
            _hard_stop(_hard_pending.pop())


def _hard_stop(num: int) -> None:
    _log(f"{signal.Signals(num).name} again: stopping now, without a checkpoint")
    raise HardStop(f"stopped by a second {signal.Signals(num).name} (the last complete checkpoint is kept)")


def _on_interrupt(num: int, frame: Any) -> None:
    """SIGINT: the first asks to stop at the next iteration, one after any stop request stops hard."""
    again = stop_requested()
    _stop_signals.append(num)
    if not again:
        _log("SIGINT: stopping at the next iteration with a checkpoint (again to stop at once)")
    elif _deferring:
        _hard_pending.append(num)
    else:
        _hard_stop(num)


def _end_slurm_job(err: BaseException) -> None:
    """``scancel`` this SLURM job after a failure the other ranks cannot notice (``err.ends_the_job``: rank 0's
    rendezvous failed, and the ranks that never arrived are in no collective): a rank stuck before its
    rendezvous would otherwise hold its node until the wall time. A cancelled job is not requeued."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return
    _log(f"ending job {job_id}: {type(err).__name__} leaves the other ranks nothing that would end them")
    try:
        scancel([job_id])
    except LaunchError as scancel_err:
        _log(str(scancel_err))


def _requeue_now() -> None:
    """Run submitit's held-back requeue handler (checkpoint the call, ``scontrol requeue``, exit)."""
    signal.alarm(0)
    while _deferred_requeue:
        _deferred_requeue.pop()()


def _watch_stop_signals() -> None:
    """Note SIGINT, SIGTERM and submitit's signal. SIGTERM goes on to submitit's handler at once; submitit's
    requeue handler is held back until the job has stopped itself, or :data:`STOP_GRACE_S` seconds have
    passed. SIGINT is :func:`_on_interrupt`'s."""
    usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, None)

    def chain(signum: int, previous: Any) -> Callable[..., Any]:
        def handler(num: int, frame: Any) -> Any:
            _stop_signals.append(num)
            if num == usr_sig and callable(previous):
                _deferred_requeue.append(lambda: previous(num, frame))
                signal.alarm(STOP_GRACE_S)
                return None
            if callable(previous):
                return previous(num, frame)
            if previous == signal.SIG_DFL:
                signal.signal(num, signal.SIG_DFL)
                os.kill(os.getpid(), num)
            return None

        return handler

    try:
        for signum in {signal.SIGTERM, usr_sig} - {None}:
            signal.signal(signum, chain(signum, signal.getsignal(signum)))
        signal.signal(signal.SIGALRM, lambda num, frame: _requeue_now())
        signal.signal(signal.SIGINT, _on_interrupt)
    except ValueError:  # not the main thread (a debug job run from a worker thread)
        pass


class ResumableJob(submitit.helpers.Checkpointable):
    """``fn(spec)`` as a requeueable submitit job.

    ``fn`` must be importable by name (a module-level function) for the code snapshot to apply; it
    must resume from whatever checkpoint its run folder holds, since a requeued job calls it again
    from the start.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workdir: Union[str, Path, None] = None,
        snapshot_dir: Union[str, Path, None] = None,
    ) -> None:
        self.fn = fn
        self.workdir = str(workdir) if workdir else None
        self.snapshot_dir = str(snapshot_dir) if snapshot_dir else None

    # after SLURM's SIGTERM (cancel, requeue, pre-emption) or submitit's pre-emption signal, a task
    # whose peers are gone fails in its next collective; it then waits this long for SLURM to kill it
    # instead of recording that failure as the job's result
    stop_grace_s: float = 180.0

    def __call__(self, spec: Any) -> Any:
        cluster = _job_cluster()
        if cluster in ("slurm", "local"):  # not for debug jobs: they run in the caller
            _forget_previous_attempt()
            _watch_stop_signals()
        try:
            result = self._run(spec)
        except SystemExit:  # the job stopped itself after a stop signal: requeue it now
            _log("stopped on request; requeueing" if _deferred_requeue else "stopped on request")
            _requeue_now()
            raise
        except Exception as err:
            if cluster in ("slurm", "local"):
                _note_rank_error(err)
            if stop_requested() and cluster == "slurm":
                _log(f"failed after a stop signal; waiting up to {self.stop_grace_s:.0f} s to be requeued or killed")
                time.sleep(self.stop_grace_s)
            elif cluster == "slurm" and getattr(err, "ends_the_job", False):
                _end_slurm_job(err)
            raise
        signal.alarm(0)  # finished before the signal's grace ran out: nothing to requeue
        _deferred_requeue.clear()
        return result

    def _run(self, spec: Any) -> Any:
        if self.snapshot_dir:
            os.environ[ENV_SNAPSHOT] = self.snapshot_dir
            if self.snapshot_dir not in sys.path:
                sys.path.insert(0, self.snapshot_dir)
        if self.workdir:
            # the code comes from the snapshot (already imported, or first on sys.path); relative
            # paths in the spec mean what they meant where submit() was called
            os.environ[ENV_WORKDIR] = self.workdir
            os.chdir(self.workdir)
        distributed_env_from_submitit(export=True)
        return self.fn(spec)

    def checkpoint(self, spec: Any) -> DelayedSubmission:  # type: ignore[override]
        # the state lives in the run folder's checkpoints; the same call resumes from there
        return DelayedSubmission(self, spec)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"ResumableJob({getattr(self.fn, '__module__', '?')}.{name})"
