"""Inside the job: :class:`ResumableJob` runs ``fn(spec)`` from the code snapshot, notes stop signals,
and asks submitit to requeue the same call on pre-emption or time-out."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

import submitit
from submitit.core.utils import DelayedSubmission

from harness.launch.environment import ENV_SNAPSHOT, ENV_WORKDIR, distributed_env_from_submitit


def _log(message: str) -> None:
    print(f"harness.launch: {message}", file=sys.stderr, flush=True)


def _job_cluster() -> Optional[str]:
    """slurm | local | debug inside a submitit job, None outside one."""
    try:
        return submitit.JobEnvironment().cluster
    except RuntimeError:
        return None


def _forget_previous_attempt() -> None:
    """A requeued job runs again under the same id: drop this task's result file from an earlier
    attempt (an error written while the job was being pre-empted), so only this attempt's counts."""
    try:
        paths = submitit.JobEnvironment().paths
        paths.result_pickle.unlink(missing_ok=True)
    except Exception:    # noqa: BLE001 - not in a submitit job, or nothing to remove
        pass


# After submitit's pre-emption / time-out signal, how long the job may take to stop on its own (polling
# stop_requested(), saving a mid-epoch checkpoint) before submitit's own handler requeues it regardless.
STOP_GRACE_S = 30

_stop_signals: List[int] = []        # signals that asked this process to stop
_deferred_requeue: List[Callable[[], Any]] = []   # submitit's requeue, held back while the job stops itself


def stop_requested() -> bool:
    """True once this job has been asked to stop: SLURM's SIGTERM (cancel, ``scontrol requeue``, pre-emption)
    or submitit's pre-emption / time-out signal. Long work polls it, saves its state and raises
    ``SystemExit``; the job is then requeued and resumes from that state."""
    return bool(_stop_signals)


def _requeue_now() -> None:
    """Run submitit's held-back requeue handler (checkpoint the call, ``scontrol requeue``, exit)."""
    signal.alarm(0)
    while _deferred_requeue:
        _deferred_requeue.pop()()


def _watch_stop_signals() -> None:
    """Note SIGTERM and submitit's signal. SIGTERM goes on to submitit's handler at once; submitit's requeue
    handler is held back until the job has stopped itself, or :data:`STOP_GRACE_S` seconds have passed."""
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
    except ValueError:   # not the main thread (a debug job run from a worker thread)
        pass


class ResumableJob(submitit.helpers.Checkpointable):
    """``fn(spec)`` as a requeueable submitit job.

    ``fn`` must be importable by name (a module-level function) for the code snapshot to apply; it
    must resume from whatever checkpoint its run folder holds, since a requeued job calls it again
    from the start.
    """

    def __init__(self, fn: Callable[[Any], Any], workdir: Union[str, Path, None] = None,
                 snapshot_dir: Union[str, Path, None] = None) -> None:
        self.fn = fn
        self.workdir = str(workdir) if workdir else None
        self.snapshot_dir = str(snapshot_dir) if snapshot_dir else None

    # after SLURM's SIGTERM (cancel, requeue, pre-emption) or submitit's pre-emption signal, a task
    # whose peers are gone fails in its next collective; it then waits this long for SLURM to kill it
    # instead of recording that failure as the job's result
    stop_grace_s: float = 180.0

    def __call__(self, spec: Any) -> Any:
        if _job_cluster() in ("slurm", "local"):           # not for debug jobs: they run in the caller
            _forget_previous_attempt()
            _watch_stop_signals()
        try:
            result = self._run(spec)
        except SystemExit:                 # the job stopped itself after a stop signal: requeue it now
            _log("stopped on request; requeueing" if _deferred_requeue else "stopped on request")
            _requeue_now()
            raise
        except Exception:
            if stop_requested():
                _log(f"failed after a stop signal; waiting up to {self.stop_grace_s:.0f} s to be requeued or killed")
                time.sleep(self.stop_grace_s)
            raise
        signal.alarm(0)                    # finished before the signal's grace ran out: nothing to requeue
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

    def checkpoint(self, spec: Any) -> DelayedSubmission:   # type: ignore[override]
        # the state lives in the run folder's checkpoints; the same call resumes from there
        return DelayedSubmission(self, spec)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"ResumableJob({getattr(self.fn, '__module__', '?')}.{name})"

