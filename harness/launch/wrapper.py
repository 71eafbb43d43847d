"""Inside the job: :class:`ResumableJob` runs ``fn(spec)`` from the code snapshot, notes stop signals,
and asks submitit to requeue the same call on pre-emption or time-out."""
from __future__ import annotations

import os
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


def _watch_stop_signals() -> Callable[[], bool]:
    """Note SIGTERM and submitit's pre-emption signal, keeping the handlers submitit installed."""
    import signal
    seen: List[int] = []

    def chain(signum: int, previous: Any) -> Callable[..., Any]:
        def handler(num: int, frame: Any) -> Any:
            seen.append(num)
            if callable(previous):
                return previous(num, frame)
            if previous == signal.SIG_DFL:
                signal.signal(num, signal.SIG_DFL)
                os.kill(os.getpid(), num)
            return None
        return handler

    try:
        names = {"SIGTERM", "SIG" + submitit.JobEnvironment.USR_SIG}
        for name in names:
            signum = getattr(signal, name, None)
            if signum is not None:
                signal.signal(signum, chain(signum, signal.getsignal(signum)))
    except ValueError:   # not the main thread (a debug job run from a worker thread)
        pass
    return lambda: bool(seen)


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
        stopping: Callable[[], bool] = lambda: False    # noqa: E731
        if _job_cluster() in ("slurm", "local"):           # not for debug jobs: they run in the caller
            _forget_previous_attempt()
            stopping = _watch_stop_signals()
        try:
            return self._run(spec)
        except Exception:
            if stopping():
                _log(f"failed after a stop signal; waiting up to {self.stop_grace_s:.0f} s to be requeued or killed")
                time.sleep(self.stop_grace_s)
            raise

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

