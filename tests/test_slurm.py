"""Launching on a real one-node SLURM cluster on localhost (started by tests/conftest_slurm.py).

* a code snapshot: jobs run the code as it was at submission, not as edited afterwards; job arrays
  are split under ``max_array_size``;
* a 2-task job (gloo all_reduce across the tasks) gives its result back;
* a job requeued with ``scontrol requeue`` mid-run, and then pre-empted through submitit's signal
  (checkpoint() + requeue), resumes from its checkpoint and ends with the uninterrupted result.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("submitit")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

from harness import launch  # noqa: E402
from harness.config import LauncherConfig  # noqa: E402

CPU_JOB = dict(gpus_per_node=0, cpus_per_task=1, mem_gb=None, timeout_min=10)


def _read_jsonl(path: Path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_snapshot_and_arrays(slurm_cluster, tmp_path, monkeypatch):
    # a throwaway repository whose module says which version of the code ran
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "snapmod.py").write_text(
        textwrap.dedent("""
        import os
        VERSION = 1
        def which_code(spec):
            return {"version": VERSION, "spec": spec, "file": __file__, "cwd": os.getcwd(),
                    "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
    """)
    )
    _git(repo, "init", "-q")
    _git(repo, "add", "snapmod.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "v1")
    monkeypatch.syspath_prepend(str(repo))
    # the jobs find the harness through PYTHONPATH (sbatch passes the environment on)
    harness_root = str(Path(launch.__file__).resolve().parents[2])  # harness/launch/__init__.py -> the checkout
    monkeypatch.setenv("PYTHONPATH", harness_root)
    import snapmod

    workdir = tmp_path / "work"
    workdir.mkdir()
    # held at submission, so the code can change before any job starts
    cfg = LauncherConfig(tasks_per_node=1, max_array_size=2, additional_parameters=(("hold", ""),), **CPU_JOB)
    specs = [{"row": i} for i in range(3)]
    jobs = launch.submit(
        specs,
        snapmod.which_code,
        cfg,
        tmp_path / "logs",
        executor="slurm",
        job_name="test-snapshot",
        snapshot_root=tmp_path / "snapshots",
        repo_root=repo,
        workdir=workdir,
    )
    try:
        assert len(jobs) == 3
        # 3 specs under max_array_size=2: an array of two tasks, then a plain job
        assert jobs[0].job_id.endswith("_0") and jobs[1].job_id.endswith("_1")
        assert jobs[0].job_id.split("_")[0] == jobs[1].job_id.split("_")[0]
        assert "_" not in jobs[2].job_id
        (repo / "snapmod.py").write_text((repo / "snapmod.py").read_text().replace("VERSION = 1", "VERSION = 2"))
        for job_id in {jobs[0].job_id.split("_")[0], jobs[2].job_id}:
            slurm_cluster.scontrol("release", job_id)
        outcomes = launch.wait(jobs, timeout_s=120, poll_s=0.5)
    except BaseException:
        slurm_cluster.cancel_all([j.job_id for j in jobs])
        raise
    snapshots = [p for p in (tmp_path / "snapshots").iterdir() if not p.name.startswith(".")]
    assert len(snapshots) == 1
    for spec, (status, value) in zip(specs, outcomes):
        assert status == "success", value
        assert value["version"] == 1  # the code as submitted
        assert value["spec"] == spec
        assert Path(value["file"]).parent == snapshots[0]
        assert value["cwd"] == str(workdir)  # relative paths mean what they meant
        assert (value["rank"], value["world_size"]) == (0, 1)
    assert json.loads((snapshots[0] / launch.SNAPSHOT_INFO).read_text())["files"] == 1


def _toy_cfg():
    # 30 min: a signal in the first 10 minutes is a pre-emption for submitit, not a time-out
    return LauncherConfig(tasks_per_node=2, max_requeues=3, **{**CPU_JOB, "timeout_min": 30})


def test_two_tasks_gloo_uninterrupted(slurm_cluster, tmp_path):
    pytest.importorskip("torch")
    from harness.launch.check import expected_state, toy_train

    spec = {"out_dir": str(tmp_path / "run"), "epochs": 3, "seed": 7, "sleep_s": 0.0}
    (job,) = launch.submit([spec], toy_train, _toy_cfg(), tmp_path / "logs", executor="slurm", job_name="test-gloo")
    try:
        ((status, value),) = launch.wait([job], timeout_s=150, poll_s=0.5)
    except BaseException:
        slurm_cluster.cancel_all([job.job_id])
        raise
    assert status == "success", value
    assert value["world_size"] == 2 and value["rank"] == 0 and value["start_epoch"] == 0
    # both tasks ran and agree (the state is the all_reduce'd sum, identical on every rank)
    results = job.results()
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["state"] == results[1]["state"]
    assert value["state"] == pytest.approx(expected_state(7, 3, 2), abs=1e-12)


def test_requeue_and_preemption_resume(slurm_cluster, tmp_path):
    """scontrol requeue mid-run, then submitit's pre-emption signal: the run resumes both times."""
    pytest.importorskip("torch")
    from harness.launch.check import expected_state, toy_train

    out = tmp_path / "run"
    n_epochs = 16  # a requeued job runs on for KillWait (5 s) before SIGKILL: leave it epochs to lose
    spec = {"out_dir": str(out), "epochs": n_epochs, "seed": 3, "sleep_s": 1.0}
    (job,) = launch.submit(
        [spec],
        toy_train,
        _toy_cfg(),
        tmp_path / "logs",
        executor="slurm",
        job_name="test-requeue",
        snapshot_root=tmp_path / "snapshots",
    )
    epochs = lambda: _read_jsonl(out / "epochs.jsonl")  # noqa: E731
    attempts = lambda: _read_jsonl(out / "attempts.jsonl")  # noqa: E731

    def epochs_in_attempt(n: int) -> int:
        runs = attempts()
        return 0 if len(runs) < n else sum(e["time"] > runs[n - 1]["time"] for e in epochs())

    log = tmp_path / "logs" / f"{job.job_id}_0_log.out"  # submitit's INFO lines
    try:
        # 1. killed and requeued by SLURM (SIGTERM, SIGKILL after KillWait): resumes from the last checkpoint
        slurm_cluster.wait_for(lambda: epochs_in_attempt(1) >= 1, 120, "an epoch of the first attempt")
        slurm_cluster.requeue(job.job_id)
        slurm_cluster.start_when_requeued(job.job_id)
        # 2. pre-empted: submitit's signal (USR2); rank 0 calls ResumableJob.checkpoint() and requeues
        slurm_cluster.wait_for(lambda: epochs_in_attempt(2) >= 1, 120, "an epoch of the second attempt")
        job._interrupt()
        slurm_cluster.wait_for(
            lambda: log.exists() and "Requeued job" in log.read_text(),
            60,
            "submitit's requeue after the pre-emption signal",
        )
        slurm_cluster.start_when_requeued(job.job_id)
        ((status, value),) = launch.wait([job], timeout_s=150, poll_s=0.5)
    except BaseException:
        slurm_cluster.cancel_all([job.job_id])
        raise
    assert status == "success", value
    runs = attempts()
    assert len(runs) == 3, runs
    starts = [r["start_epoch"] for r in runs]
    assert starts[0] == 0 < starts[1] < starts[2] < n_epochs, starts  # resumed, never restarted
    assert [r["restarts"] for r in runs] == ["0", "1", "2"]
    assert slurm_cluster.restarts(job.job_id) == 2
    assert value["start_epoch"] == starts[2]
    assert "Calling checkpoint method" in log.read_text()
    # every epoch ran (one may run twice, when killed between its checkpoint and the next), in order
    done = [e["epoch"] for e in epochs()]
    assert sorted(set(done)) == list(range(n_epochs))
    assert value["state"] == pytest.approx(expected_state(3, n_epochs, 2), abs=1e-12)
    # the requeued attempts ran the same snapshot of the code
    assert len({r["code"] for r in runs}) == 1 and runs[0]["code"]
