"""Executors: which one runs the jobs (slurm, local processes, in-process debug) and the parameters
submitit gets for a launcher config. Nothing here imports torch."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import submitit

from harness.config import EXECUTORS, LauncherConfig


class LaunchError(RuntimeError):
    """A submission that cannot be made (unknown executor, no SLURM, a failed sbatch...)."""


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def resolve_executor(name: str = "auto") -> str:
    """``auto`` is ``slurm`` where ``sbatch`` exists, ``local`` elsewhere."""
    return explain_executor(name)[0]


def explain_executor(name: str = "auto") -> Tuple[str, str]:
    """(the executor that will run, why): ``auto`` is ``slurm`` where ``sbatch`` exists, ``local`` elsewhere."""
    if name not in EXECUTORS:
        raise LaunchError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")
    if name == "auto":
        if slurm_available():
            return "slurm", f"auto: sbatch found at {shutil.which('sbatch')}"
        return "local", "auto: no sbatch on PATH, so local processes on this machine"
    if name == "slurm" and not slurm_available():
        raise LaunchError("executor 'slurm' asked for, but sbatch/srun are not on PATH")
    return name, "asked for"


def check_launcher(launcher: LauncherConfig, kind: str) -> None:
    """Settings the executor cannot honour, as a :class:`LaunchError` that says what to change."""
    if kind == "local" and launcher.nodes > 1:
        raise LaunchError(
            f"the local executor runs on this machine only, but launcher.nodes is {launcher.nodes}; "
            "run with launcher.nodes=1 (and launcher.gpus_per_node set to this machine's GPUs: "
            "gradient accumulation keeps the total batch), or submit where sbatch exists"
        )


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


def executor_parameters(
    launcher: LauncherConfig,
    kind: str,
    *,
    job_name: str = "harness",
    snapshot_dir: Optional[Path] = None,
    array_parallelism: Optional[int] = None,
) -> Dict[str, Any]:
    """The parameters ``AutoExecutor.update_parameters`` gets for this launcher config and executor."""
    params: Dict[str, Any] = {"name": job_name, "timeout_min": int(launcher.timeout_min)}
    if kind == "debug":
        return params
    params.update(
        nodes=int(launcher.nodes), tasks_per_node=tasks_per_node(launcher), cpus_per_task=int(launcher.cpus_per_task)
    )
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
            params["slurm_setup"] = [f"export PYTHONPATH={shlex.quote(str(snapshot_dir))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        params["slurm_additional_parameters"] = extra
        # submitit's pre-emption/time-out signal: 90 s before the end, or less on short jobs
        params["slurm_signal_delay_s"] = int(min(90, max(10, launcher.timeout_min * 60 // 10)))
        if array_parallelism:
            params["slurm_array_parallelism"] = int(array_parallelism)
    elif kind == "local":
        if array_parallelism:
            params["local_array_parallelism"] = int(array_parallelism)
    return params


def make_executor(
    kind: str, log_dir: Union[str, Path], launcher: LauncherConfig, **kwargs: Any
) -> submitit.AutoExecutor:
    """A configured submitit executor (``kind`` already resolved: slurm | local | debug)."""
    if kind not in ("slurm", "local", "debug"):
        raise LaunchError(f"unknown executor {kind!r}")
    check_launcher(launcher, kind)
    init: Dict[str, Any] = {}
    if kind in ("slurm", "local"):
        init[f"{kind}_max_num_timeout"] = int(launcher.max_requeues)
    ex = submitit.AutoExecutor(folder=str(Path(log_dir).resolve()), cluster=kind, **init)
    params = executor_parameters(launcher, kind, **kwargs)
    if kind == "local":
        params.pop("local_array_parallelism", None)  # the local executor runs everything at once
    try:
        ex.update_parameters(**params)
    except ValueError as err:
        raise LaunchError(f"launcher settings rejected by submitit: {err}") from err
    return ex


def layout_text(launcher: LauncherConfig, kind: str) -> str:
    """``2 node(s) x 8 task(s) = 16 ranks, 8 GPU(s) per node``: what the job asks for."""
    if kind == "debug":
        return "1 task, in this process"
    tasks = tasks_per_node(launcher)
    gpus = f", {launcher.gpus_per_node} GPU(s) per node" if launcher.gpus_per_node else ", CPU only (gloo)"
    return f"{launcher.nodes} node(s) x {tasks} task(s) = {launcher.nodes * tasks} rank(s){gpus}"


def sbatch_lines(launcher: LauncherConfig, job_name: str = "harness", log_dir: str = "<log dir>") -> List[str]:
    """The ``#SBATCH`` lines and the ``srun`` line of the batch script submitit writes for this launcher
    config (``log_dir`` shown in place of the real folder). Submits nothing."""
    with tempfile.TemporaryDirectory() as folder:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        try:
            ex.update_parameters(**executor_parameters(launcher, "slurm", job_name=job_name))
        except ValueError as err:
            raise LaunchError(f"launcher settings rejected by submitit: {err}") from err
        text = ex._executor._make_submission_file_text("python -u -m submitit.core._submit <folder>", "<uid>")
        resolved = str(Path(folder).resolve())
    lines = [line.replace(resolved, log_dir).replace(folder, log_dir) for line in text.splitlines()]
    return [line for line in lines if line.startswith(("#SBATCH", "srun"))]
