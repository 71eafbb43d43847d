"""Launching runs through submitit: SLURM, local processes or in-process (debug).

One job per spec (one array task when several specs share the same resources), arrays split under the
cluster's ``MaxArraySize``, a snapshot of the code per submission, and requeue on preemption or time-out.

* :func:`submit` is the one entry point: ``submit(specs, fn, launcher, log_dir, executor="auto")`` runs
  ``fn(spec)`` for each spec and returns submitit job handles, in the order of ``specs``.
* ``fn`` is wrapped in :class:`ResumableJob`, a ``submitit.helpers.Checkpointable``: when SLURM signals a
  pre-emption or an imminent time-out, submitit calls its ``checkpoint()``, which resubmits the same call,
  and requeues the job. The same happens, without the signal, when SLURM kills and requeues a job itself
  (``scontrol requeue``, a node failure): the batch script runs again. Either way ``fn`` must resume from
  the latest checkpoint in its run folder, which makes a requeued run finish like an uninterrupted one.
* Multi-task jobs: one task per GPU (``tasks_per_node`` defaults to ``gpus_per_node``); before ``fn`` runs,
  :func:`distributed_env_from_submitit` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` so ``fn`` initialises ``torch.distributed`` with ``env://``.
* Code snapshot: :func:`snapshot_code` copies the repository's files (tracked, plus untracked files that
  git does not ignore) to ``<snapshot_root>/<content hash>/``; the jobs import the code from there (the
  job's working directory and ``PYTHONPATH``), so editing the code after submitting does not change what
  queued or requeued jobs run. Relative paths in a spec still resolve against the directory ``submit``
  was called from.

Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import submitit
from submitit.core.utils import DelayedSubmission

from harness.config import LauncherConfig

EXECUTORS = ("auto", "slurm", "local", "debug")
SNAPSHOT_INFO = "SNAPSHOT.json"
ENV_WORKDIR = "HARNESS_SUBMIT_CWD"
ENV_SNAPSHOT = "HARNESS_CODE_SNAPSHOT"

# SLURM job states, as squeue/scontrol print them
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
                  "SUSPENDED", "RESIZING"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


class LaunchError(RuntimeError):
    """A submission that cannot be made (unknown executor, no SLURM, a failed sbatch...)."""


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------

def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def resolve_executor(name: str = "auto") -> str:
    """``auto`` is ``slurm`` where ``sbatch`` exists, ``local`` elsewhere."""
    if name not in EXECUTORS:
        raise LaunchError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")
    if name == "auto":
        return "slurm" if slurm_available() else "local"
    if name == "slurm" and not slurm_available():
        raise LaunchError("executor 'slurm' asked for, but sbatch/srun are not on PATH")
    return name


def tasks_per_node(launcher: LauncherConfig) -> int:
    """One task per GPU unless the config says otherwise; one task on a CPU-only job."""
    if launcher.tasks_per_node is not None:
        return max(1, int(launcher.tasks_per_node))
    return max(1, int(launcher.gpus_per_node or 0))


def slurm_config_value(key: str) -> Optional[str]:
    """One value of ``scontrol show config`` (None when SLURM does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip().lower() == key.lower():
            return value.strip()
    return None


def max_array_size(launcher: LauncherConfig, kind: str) -> int:
    """How many specs one array may hold: the config's limit, and under SLURM the cluster's.

    SLURM accepts array indices up to ``MaxArraySize - 1``; submitit numbers tasks from 0.
    """
    limit = max(1, int(launcher.max_array_size))
    if kind == "slurm":
        value = slurm_config_value("MaxArraySize")
        if value and value.isdigit() and int(value) > 0:
            limit = min(limit, int(value))
    return limit


def executor_parameters(launcher: LauncherConfig, kind: str, *, job_name: str = "harness",
                        snapshot_dir: Optional[Path] = None, array_parallelism: Optional[int] = None
                        ) -> Dict[str, Any]:
    """The parameters ``AutoExecutor.update_parameters`` gets for this launcher config and executor."""
    params: Dict[str, Any] = {"name": job_name, "timeout_min": int(launcher.timeout_min)}
    if kind == "debug":
        return params
    params.update(nodes=int(launcher.nodes), tasks_per_node=tasks_per_node(launcher),
                  cpus_per_task=int(launcher.cpus_per_task))
    if launcher.gpus_per_node:
        params["gpus_per_node"] = int(launcher.gpus_per_node)
    if launcher.mem_gb:
        params["mem_gb"] = launcher.mem_gb
    if kind == "slurm":
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(launcher, key)
            if value:
                params[f"slurm_{key}"] = value
        extra: Dict[str, Any] = {"requeue": True}
        for key, value in launcher.additional_parameters:
            key = str(key).lstrip("-")
            extra[key] = True if value in (None, "", True) else value
        if snapshot_dir is not None:
            extra.setdefault("chdir", str(snapshot_dir))
            params["slurm_setup"] = [f"export PYTHONPATH={_shell_quote(str(snapshot_dir))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        params["slurm_additional_parameters"] = extra
        # submitit's pre-emption/time-out signal: 90 s before the end, or less on short jobs
        params["slurm_signal_delay_s"] = int(min(90, max(10, launcher.timeout_min * 60 // 10)))
        if array_parallelism:
            params["slurm_array_parallelism"] = int(array_parallelism)
    elif kind == "local":
        if array_parallelism:
            params["local_array_parallelism"] = int(array_parallelism)
    return params


def make_executor(kind: str, log_dir: Union[str, Path], launcher: LauncherConfig, **kwargs: Any
                  ) -> submitit.AutoExecutor:
    """A configured submitit executor (``kind`` already resolved: slurm | local | debug)."""
    if kind not in ("slurm", "local", "debug"):
        raise LaunchError(f"unknown executor {kind!r}")
    init: Dict[str, Any] = {}
    if kind in ("slurm", "local"):
        init[f"{kind}_max_num_timeout"] = int(launcher.max_requeues)
    ex = submitit.AutoExecutor(folder=str(Path(log_dir).resolve()), cluster=kind, **init)
    params = executor_parameters(launcher, kind, **kwargs)
    if kind == "local":
        params.pop("local_array_parallelism", None)   # the local executor runs everything at once
    try:
        ex.update_parameters(**params)
    except ValueError as err:
        raise LaunchError(f"launcher settings rejected by submitit: {err}") from err
    return ex


def _shell_quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


# ---------------------------------------------------------------------------------------------
# code snapshot
# ---------------------------------------------------------------------------------------------

def repository_root(start: Union[str, Path, None] = None) -> Path:
    here = Path(start) if start else Path(__file__).resolve().parent
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchError(f"{here} is not inside a git repository; cannot snapshot the code")
    return Path(out.stdout.strip())


# untracked files under these folders, or larger than this, stay out of a snapshot (outputs, not code)
UNTRACKED_EXCLUDE = ("results/", "reports/", "data/", "datasets/", "checkpoints/", "outputs/")
UNTRACKED_MAX_BYTES = 10 * 2**20


def _git_ls(root: Path, *args: str) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, check=True)
    return [n for n in out.stdout.decode("utf-8", "surrogateescape").split("\0") if n]


def repository_files(root: Path) -> List[str]:
    """The code a job needs (relative paths): tracked files, and untracked files git does not ignore
    (new modules not yet added), except outputs (:data:`UNTRACKED_EXCLUDE`) and large files."""
    names = set(_git_ls(root, "--cached"))
    for name in _git_ls(root, "--others", "--exclude-standard"):
        if name.startswith(UNTRACKED_EXCLUDE) or "/." in "/" + name:
            continue
        try:
            if (root / name).stat().st_size > UNTRACKED_MAX_BYTES:
                continue
        except OSError:
            continue
        names.add(name)
    return sorted(n for n in names if (root / n).is_file() and not (root / n).is_symlink())


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def snapshot_code(snapshot_root: Union[str, Path], repo_root: Union[str, Path, None] = None,
                  include: Sequence[str] = ()) -> Path:
    """Copy the repository's files to ``<snapshot_root>/<hash>/`` and return that folder.

    The folder is named by a hash of the file names and contents, so an unchanged tree reuses the
    existing snapshot. ``include`` adds paths git ignores (built extensions, for instance); folders
    are copied whole. The copy is made in a temporary folder and renamed into place, so a snapshot
    folder either is complete or does not exist.
    """
    root = Path(repo_root).resolve() if repo_root else repository_root()
    snapshot_root = Path(snapshot_root).resolve()
    names = repository_files(root)
    for extra in include:
        path = root / extra
        if path.is_dir():
            names += [str(p.relative_to(root)) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            names.append(str(extra))
        else:
            raise LaunchError(f"snapshot include {extra!r} does not exist under {root}")
    names = sorted(set(names))
    try:
        inside = snapshot_root.relative_to(root)     # never copy earlier snapshots into a new one
        names = [n for n in names if not Path(n).is_relative_to(inside)]
    except ValueError:
        pass
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256((root / name).read_bytes()).digest())
    dest = snapshot_root / digest.hexdigest()[:16]
    if (dest / SNAPSHOT_INFO).is_file():
        return dest
    snapshot_root.mkdir(parents=True, exist_ok=True)
    tmp = snapshot_root / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    info = {"source": str(root), "commit": _git(root, "rev-parse", "HEAD"),
            "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no")),
            "files": len(names), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / SNAPSHOT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    try:
        os.rename(tmp, dest)
    except OSError:            # another submission made the same snapshot meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / SNAPSHOT_INFO).is_file():
            raise
    return dest


_JOB_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                  ENV_WORKDIR, ENV_SNAPSHOT)
_KEPT_VARIABLES = ("SLURM_CONF",)     # where the cluster's config is: a property of the cluster, not of a job


@contextmanager
def _without_job_variables() -> Iterator[None]:
    """Submitting from inside a job (an interactive allocation, a job that submits the next step):
    the new jobs must not inherit this job's SLURM_*, submitit and rank variables (sbatch would take
    SLURM_* settings as its own). User defaults for sbatch (SBATCH_*) stay."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if k not in _KEPT_VARIABLES and (k.startswith(("SLURM_", "SLURMD_", "SRUN_", "SUBMITIT_"))
                                               or k in _JOB_VARIABLES)}
    try:
        yield
    finally:
        os.environ.update(hidden)


@contextmanager
def _environment_for_local_jobs(snapshot_dir: Optional[Path], workdir: Path) -> Iterator[None]:
    """Local jobs are processes started by ``submit``: they inherit its working directory and environment."""
    if snapshot_dir is None:
        yield
        return
    old_cwd, old_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(snapshot_dir) + (os.pathsep + old_path if old_path else "")
    os.chdir(snapshot_dir)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


# ---------------------------------------------------------------------------------------------
# inside the job
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    job_id: Optional[str] = None


def master_port_for(job_id: Optional[str]) -> int:
    """A port in [20000, 40000) derived from the job id: concurrent jobs on one node differ.

    The numeric job id (the array's job id for array tasks) gives the port; the same formula as
    :func:`harness.distributed.env_from_submitit`, so either can be the one that sets it.
    """
    digits = "".join(ch for ch in str(job_id or "").split("_")[0] if ch.isdigit())
    if not digits:
        digits = str(int(hashlib.sha256(str(job_id).encode()).hexdigest()[:8], 16))
    return 20000 + int(digits) % 20000


def distributed_env_from_submitit(export: bool = True) -> DistributedEnv:
    """Ranks and rendezvous from submitit's ``JobEnvironment``; exported as torch's env:// variables.

    Outside a submitit job: a single process (rank 0 of 1) on localhost, unless ``RANK`` and
    ``WORLD_SIZE`` are already set (torchrun), which are then kept.
    """
    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:
        job_env = None
    if job_env is None:
        env = DistributedEnv(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                             local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                             local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                             master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                             master_port=int(os.environ.get("MASTER_PORT", 29500)))
    else:
        num_tasks = job_env.num_tasks
        hostnames = list(job_env.hostnames) or ["127.0.0.1"]
        env = DistributedEnv(rank=job_env.global_rank, world_size=num_tasks, local_rank=job_env.local_rank,
                             local_world_size=max(1, num_tasks // max(1, job_env.num_nodes)),
                             master_addr=hostnames[0], master_port=master_port_for(job_env.job_id),
                             job_id=str(job_env.job_id))
    if export:
        os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                           "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
                           "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})
    return env


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


# ---------------------------------------------------------------------------------------------
# submission
# ---------------------------------------------------------------------------------------------

LauncherArg = Union[LauncherConfig, Callable[[Any], LauncherConfig]]


def _chunks(items: Sequence[Any], size: int) -> List[Sequence[Any]]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


def group_by_launcher(specs: Sequence[Any], launcher: LauncherArg) -> List[Tuple[LauncherConfig, List[int]]]:
    """Indices of the specs that share one launcher config (one array each), in first-seen order."""
    groups: Dict[LauncherConfig, List[int]] = {}
    for i, spec in enumerate(specs):
        cfg = launcher(spec) if callable(launcher) and not isinstance(launcher, LauncherConfig) else launcher
        if not isinstance(cfg, LauncherConfig):
            raise LaunchError(f"launcher for spec {i} is {type(cfg).__name__}, not a LauncherConfig")
        groups.setdefault(cfg, []).append(i)
    return list(groups.items())


def submit(specs: Sequence[Any], fn: Callable[[Any], Any], launcher: LauncherArg,
           log_dir: Union[str, Path], executor: Optional[str] = None, *, job_name: str = "harness",
           snapshot_root: Union[str, Path, None] = None, repo_root: Union[str, Path, None] = None,
           snapshot_include: Sequence[str] = (), workdir: Union[str, Path, None] = None,
           on_submitted: Optional[Callable[[Any, submitit.Job], None]] = None) -> List[submitit.Job]:
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
            with _without_job_variables(), \
                    _environment_for_local_jobs(snapshot_dir if kind == "local" else None, workdir):
                try:
                    with ex.batch():
                        pending = [ex.submit(job_fn, specs[i]) for i in chunk]
                except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError,
                        submitit.core.utils.FailedSubmissionError) as err:
                    raise LaunchError(f"submission of {len(chunk)} job(s) failed: {err}") from err
            for i, job in zip(chunk, pending):
                jobs[i] = job
                if on_submitted is not None:
                    on_submitted(specs[i], job)
    return [j for j in jobs if j is not None]


# ---------------------------------------------------------------------------------------------
# following jobs (SLURM without accounting: sacct may not answer, squeue/scontrol do)
# ---------------------------------------------------------------------------------------------

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


def job_state(job: submitit.Job) -> str:
    """PENDING / RUNNING / COMPLETED / FAILED ... for any submitit job; UNKNOWN when nobody knows."""
    if isinstance(job, submitit.SlurmJob):
        state = slurm_job_state(job.job_id)
        if state:
            return state
        if has_result(job):
            return "COMPLETED"
        return "UNKNOWN"
    try:
        return str(job.state)
    except Exception:      # noqa: BLE001 - submitit's own watcher failed
        return "UNKNOWN"


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
