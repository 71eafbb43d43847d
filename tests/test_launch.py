"""harness.launch without a cluster: executor choice, sbatch parameters, arrays split under
MaxArraySize (a stand-in sbatch records what would be submitted), code snapshots, rank variables,
local (2 tasks) and debug executors, and the requeue hook. The real SLURM runs are in test_slurm.py."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from harness import launch  # noqa: E402
from harness.config import LauncherConfig  # noqa: E402
from harness.launch import executors  # noqa: E402
from harness.launch.check import task_info  # noqa: E402

REPO = Path(launch.__file__).resolve().parents[1]


# -- executors and parameters ------------------------------------------------------------------


def test_resolve_executor(monkeypatch):
    with pytest.raises(launch.LaunchError, match="slurm, local, debug"):
        launch.resolve_executor("kubernetes")
    monkeypatch.setattr(executors, "slurm_available", lambda: False)
    assert launch.resolve_executor("auto") == "local"
    with pytest.raises(launch.LaunchError, match="sbatch"):
        launch.resolve_executor("slurm")
    monkeypatch.setattr(executors, "slurm_available", lambda: True)
    assert launch.resolve_executor("auto") == "slurm"
    assert launch.resolve_executor("debug") == "debug"


def test_tasks_per_node():
    assert launch.tasks_per_node(LauncherConfig(gpus_per_node=8)) == 8
    assert launch.tasks_per_node(LauncherConfig(gpus_per_node=0)) == 1
    assert launch.tasks_per_node(LauncherConfig(gpus_per_node=0, tasks_per_node=2)) == 2


def test_slurm_parameters(tmp_path):
    cfg = LauncherConfig(
        partition="gpu",
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=10,
        mem_gb=400,
        timeout_min=4320,
        account="vision",
        qos="high",
        constraint="volta32gb",
        additional_parameters=(("exclusive", ""), ("--mail-type", "END")),
    )
    p = launch.executor_parameters(cfg, "slurm", job_name="table2", snapshot_dir=tmp_path)
    assert p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8 and p["nodes"] == 2
    assert p["slurm_partition"] == "gpu" and p["slurm_account"] == "vision"
    assert p["slurm_qos"] == "high" and p["slurm_constraint"] == "volta32gb"
    assert p["slurm_additional_parameters"] == {
        "requeue": True,
        "exclusive": True,
        "mail-type": "END",
        "chdir": str(tmp_path),
    }
    assert p["slurm_signal_delay_s"] == 90
    assert any(str(tmp_path) in line and "PYTHONPATH" in line for line in p["slurm_setup"])
    # debug: in process, one task; local: no slurm-only keys
    assert set(launch.executor_parameters(cfg, "debug")) == {"name", "timeout_min"}
    assert not any(k.startswith("slurm_") for k in launch.executor_parameters(cfg, "local"))


# -- a stand-in SLURM: sbatch records the script, scontrol reports MaxArraySize ------------------


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    record = tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sbatch").write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        n=$(( $(ls {record} | grep -c "\\.sh$") + 100 ))
        cp "$1" {record}/$n.sh
        env > {record}/$n.env
        echo "Submitted batch job $n"
    """)
    )
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 'MaxArraySize            = 3'\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def _scripts(record: Path):
    return [p.read_text() for p in sorted(record.glob("*.sh"), key=lambda p: int(p.stem))]


def test_arrays_split_under_max_array_size(fake_slurm, tmp_path):
    cfg = LauncherConfig(gpus_per_node=0, cpus_per_task=1, max_array_size=1000, partition="debug")
    specs = [{"row": i} for i in range(7)]
    jobs = launch.submit(specs, task_info, cfg, tmp_path / "logs", executor="slurm")
    scripts = _scripts(fake_slurm)
    # the cluster's MaxArraySize (3) wins over the config's 1000: 3 + 3 + a single job
    assert [re.search(r"--array=(\S+)", s).group(1) if "--array" in s else None for s in scripts] == [
        "0-2%3",
        "0-2%3",
        None,
    ]
    assert [j.job_id for j in jobs] == ["100_0", "100_1", "100_2", "101_0", "101_1", "101_2", "102"]
    for script in scripts:
        assert "#SBATCH --requeue" in script and "#SBATCH --partition=debug" in script
        assert "#SBATCH --signal=USR2@" in script


def test_config_array_limit_and_groups(fake_slurm, tmp_path):
    small = LauncherConfig(gpus_per_node=0, cpus_per_task=1, max_array_size=2)
    big = LauncherConfig(gpus_per_node=8, cpus_per_task=10, max_array_size=2)
    specs = [{"row": i, "big": i % 2 == 1} for i in range(4)]
    seen = []
    jobs = launch.submit(
        specs,
        task_info,
        lambda s: big if s["big"] else small,
        tmp_path / "logs",
        executor="slurm",
        on_submitted=lambda spec, job: seen.append((spec["row"], job.job_id)),
    )
    scripts = _scripts(fake_slurm)
    assert len(scripts) == 2  # one array per launcher config
    assert "--gpus-per-node" not in scripts[0] and "#SBATCH --gpus-per-node=8" in scripts[1]
    assert "#SBATCH --ntasks-per-node=8" in scripts[1]
    assert [j.job_id for j in jobs] == ["100_0", "101_0", "100_1", "101_1"]  # in the order of the specs
    assert sorted(seen) == [(0, "100_0"), (1, "101_0"), (2, "100_1"), (3, "101_1")]


def test_snapshot_in_the_batch_script(fake_slurm, tmp_path):
    cfg = LauncherConfig(gpus_per_node=0, cpus_per_task=1)
    launch.submit([{}], task_info, cfg, tmp_path / "logs", executor="slurm", snapshot_root=tmp_path / "snap")
    (script,) = _scripts(fake_slurm)
    (snap,) = [p for p in (tmp_path / "snap").iterdir() if not p.name.startswith(".")]
    assert f"#SBATCH --chdir={snap}" in script
    assert f"export PYTHONPATH={snap}" in script
    assert (snap / "harness" / "launch" / "submit.py").is_file()


# -- code snapshots ------------------------------------------------------------------------------


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_snapshot_code(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("A = 1\n")
    (repo / ".gitignore").write_text("build/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    (repo / "pkg" / "new.py").write_text("NEW = 1\n")  # untracked: a new module
    (repo / "build").mkdir()
    (repo / "build" / "ext.so").write_text("binary")  # ignored
    (repo / "results" / "exp" / "run").mkdir(parents=True)
    (repo / "results" / "exp" / "run" / "checkpoint.pth").write_text("weights")  # an output
    root = repo / "results" / "exp" / ".snapshots"

    first = launch.snapshot_code(root, repo_root=repo)
    files = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert files == [".gitignore", launch.SNAPSHOT_INFO, "pkg/a.py", "pkg/new.py"]
    assert launch.snapshot_code(root, repo_root=repo) == first  # unchanged tree: same snapshot
    (repo / "pkg" / "a.py").write_text("A = 2\n")
    second = launch.snapshot_code(root, repo_root=repo, include=["build"])
    assert second != first
    assert (first / "pkg" / "a.py").read_text() == "A = 1\n"  # the old snapshot is untouched
    assert (second / "pkg" / "a.py").read_text() == "A = 2\n"
    assert (second / "build" / "ext.so").is_file()
    assert not any(".snapshots" in str(p.relative_to(second)) for p in second.rglob("*"))
    with pytest.raises(launch.LaunchError, match="does not exist"):
        launch.snapshot_code(root, repo_root=repo, include=["missing"])


# -- ranks and rendezvous --------------------------------------------------------------------------


def test_master_port_for():
    assert launch.master_port_for("123") == 20123
    assert launch.master_port_for("123_4") == 20123  # array tasks: the array's id
    assert launch.master_port_for("20123") == 20123
    port = launch.master_port_for("local-abc")
    assert 20000 <= port < 40000 and port == launch.master_port_for("local-abc")


JOB_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SUBMITIT_EXECUTOR",
    "SLURM_JOB_ID",
    "SUBMITIT_LOCAL_JOB_ID",
    "SUBMITIT_DEBUG_JOB_ID",
    launch.ENV_WORKDIR,
    launch.ENV_SNAPSHOT,
)


def _clean_job_environment(monkeypatch):
    """What a job exports is put back as it was after the test."""
    for key in JOB_VARIABLES:
        monkeypatch.delenv(key, raising=False)


def test_distributed_env_outside_a_job(monkeypatch):
    _clean_job_environment(monkeypatch)
    env = launch.distributed_env_from_submitit(export=True)
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_distributed_env_inside_a_job(monkeypatch):
    import types

    from harness.launch import environment

    class JobEnvironment:
        global_rank, num_tasks, local_rank, num_nodes = 3, 8, 1, 2
        hostnames = ["node-a", "node-b"]
        job_id = "12345_7"

    monkeypatch.setattr(environment, "submitit", types.SimpleNamespace(JobEnvironment=JobEnvironment))
    _clean_job_environment(monkeypatch)
    env = environment.distributed_env_from_submitit(export=True)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "4" and os.environ["MASTER_ADDR"] == "node-a"
    assert os.environ["MASTER_PORT"] == "32345" and env.job_id == "12345_7"


def test_checkpoint_resubmits_the_same_call():
    job = launch.ResumableJob(task_info, workdir="/tmp")
    delayed = job.checkpoint({"row": 3})
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == ({"row": 3},)


# -- local and debug executors -------------------------------------------------------------------


def test_local_two_tasks_from_a_snapshot(tmp_path):
    cfg = LauncherConfig(gpus_per_node=0, tasks_per_node=2, cpus_per_task=1, timeout_min=5)
    workdir = tmp_path / "work"
    workdir.mkdir()
    jobs = launch.submit(
        [{"row": 0}, {"fail": "on purpose"}],
        task_info,
        cfg,
        tmp_path / "logs",
        executor="local",
        snapshot_root=tmp_path / "snap",
        workdir=workdir,
    )
    outcomes = launch.wait(jobs, timeout_s=120, poll_s=0.2)
    (snap,) = [p for p in (tmp_path / "snap").iterdir() if not p.name.startswith(".")]
    status, info = outcomes[0]
    assert status == "success", info
    assert info["module"] == str(snap / "harness" / "launch" / "check.py")  # the snapshot's code ran
    assert info["cwd"] == str(workdir)
    assert info["env"]["WORLD_SIZE"] == "2" and info["env"]["RANK"] == "0"
    ranks = sorted(r["env"]["RANK"] for r in jobs[0].results())
    assert ranks == ["0", "1"]
    assert len({r["env"]["MASTER_PORT"] for r in jobs[0].results()}) == 1
    assert outcomes[1][0] == "error" and "asked to fail: on purpose" in outcomes[1][1]
    assert os.getcwd() != str(snap)  # submit() restored the cwd


def test_debug_runs_in_process(tmp_path, monkeypatch):
    _clean_job_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = LauncherConfig(gpus_per_node=8)
    (job,) = launch.submit(
        [{"row": 1}], task_info, cfg, tmp_path / "logs", executor="debug", snapshot_root=tmp_path / "snap"
    )
    ((status, info),) = launch.wait([job], timeout_s=30)
    assert status == "success" and info["pid"] == os.getpid()
    assert info["env"]["WORLD_SIZE"] == "1"
    assert not (tmp_path / "snap").exists()  # no snapshot in process


def test_submitting_from_inside_a_job(fake_slurm, tmp_path, monkeypatch):
    """The job's own SLURM_* and rank variables are not passed on to the jobs it submits."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    monkeypatch.setenv("SBATCH_ACCOUNT", "vision")
    monkeypatch.setenv("RANK", "3")
    launch.submit([{}], task_info, LauncherConfig(executor="slurm", gpus_per_node=0), tmp_path / "logs")
    assert len(_scripts(fake_slurm)) == 1  # executor=None: the config's ("slurm")
    env = dict(line.split("=", 1) for line in (fake_slurm / "100.env").read_text().splitlines() if "=" in line)
    assert "SLURM_JOB_ID" not in env and "SLURM_CPUS_PER_TASK" not in env and "RANK" not in env
    assert env["SLURM_CONF"] == "/etc/slurm/slurm.conf" and env["SBATCH_ACCOUNT"] == "vision"
    assert os.environ["SLURM_JOB_ID"] == "77" and os.environ["RANK"] == "3"  # put back afterwards


def test_log_paths(tmp_path):
    out, err = launch.log_paths(tmp_path, "100_3")
    assert (out.name, err.name) == ("100_3_0_log.out", "100_3_0_log.err")
