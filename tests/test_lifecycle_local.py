"""Start, follow, stop and resume a local run from a terminal, with real processes: ``run_experiment.py`` in a
process group of its own (a terminal's foreground job) submits a tiny row to the local executor (2 tasks, gloo);
a hook holds the job's tasks at the chosen moment (:mod:`lifecycle_helpers`) and the test presses Ctrl-C there:

* mid-epoch, with status.json deleted while it runs: interrupted at once, --status says so, resubmission resumes
  mid-epoch; the attempts and their count survive; the final weights equal an uninterrupted run's (bitwise);
* in an evaluation: the same, the epoch evaluated and logged once on resume;
* twice during a checkpoint write: a hard stop, after the write is complete; the same final weights;
* SIGKILL of the job: the resubmission takes it over at once (not "claimed by another submission");
* --cancel from another terminal, with SLURM stand-ins on PATH: they never see the local id.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from lifecycle_helpers import OVERRIDES, TINY, argv, ctrl_c, environment, start_submission, wait_for

from harness import cli, launch
from harness.grid import expand, load_experiment
from harness.run.checkpointing import read_checkpoint
from harness.store import ResultsStore
from harness.store.jobs import local_pid

pytestmark = pytest.mark.slow

SPEC = expand(load_experiment(str(TINY), rows=["K=1"], overrides=OVERRIDES))[0]


def _submit(root: Path, env: dict, timeout_s: float = 400) -> str:
    """A submission that runs to its end; its output."""
    proc = start_submission(root, env, "--wait")
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (root / "submission.log").read_text()
    assert rc == 0, out[-4000:]
    return out


def _weights(root: Path) -> dict:
    return torch.load(
        ResultsStore(root / "results").record_dir(SPEC.run_id) / "checkpoint.pth",
        map_location="cpu",
        weights_only=False,
    )["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    _submit(root, environment(root))
    return _weights(root)


def _interrupt(root: Path, hook: dict, presses: int = 1, during=None) -> str:
    """Submit with the hook; at the held moment, ``during()`` (if given), then Ctrl-C ``presses`` times; the
    submission's output once it has exited."""
    marker = root / "held"
    env = environment(root, hook={**hook, "marker": str(marker)})
    proc = start_submission(root, env, "--wait")
    log = root / "submission.log"
    try:
        wait_for(lambda: Path(f"{marker}.0").exists(), 300, f"the hook at {hook['target']}", proc, log)
        if during is not None:
            during()
        for _ in range(presses):
            ctrl_c(proc)
            time.sleep(1.0)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 130, out[-4000:]
    return out


def _check_interrupted(root: Path, out: str, capsys) -> ResultsStore:
    store = ResultsStore(root / "results")
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    resume = [line for line in out.splitlines() if line.startswith("interrupted: ")]
    assert len(resume) == 1 and "resume with: python run_experiment.py " in resume[0], out[-4000:]
    assert f"--rows K=1 --executor local {' '.join(OVERRIDES)} --wait" in resume[0]
    status = store.read_status(SPEC.run_id)
    assert status.state == "interrupted", status
    assert cli.main(argv(root, "--status")) == 0
    assert "interrupted" in capsys.readouterr().out
    entry = store.plan_one(SPEC)
    assert (entry.state, entry.action) == ("interrupted", "run")
    return store


def _check_resumes(root: Path, uninterrupted: dict, resumed_at: str = None) -> str:
    """Submit again: the run resumes and ends with the uninterrupted weights; the submission's output."""
    out = _submit(root, environment(root))
    assert "skip" not in out and "submitted 'K=1'" in out
    store = ResultsStore(root / "results")
    assert store.read_status(SPEC.run_id).state == "done"
    status = store.read_status(SPEC.run_id)
    log = launch.log_paths(status.log_dir, status.job_ids[-1])[0]  # the resumed job's
    if resumed_at:
        assert "resumed from " in log.read_text() and resumed_at in log.read_text(), log.read_text()[-3000:]
    assert [r["epoch"] for r in store.read_log(SPEC.run_id)] == [0, 1]  # each epoch logged once
    weights = _weights(root)
    assert weights.keys() == uninterrupted.keys()
    for k in weights:
        assert torch.equal(weights[k], uninterrupted[k]), k
    return out


def test_ctrl_c_mid_epoch_then_resume(tmp_path, capsys, uninterrupted):
    store = ResultsStore(tmp_path / "results")
    lost = lambda: (store.record_dir(SPEC.run_id) / "status.json").unlink()  # noqa: E731 - lost mid-run
    # the third optimiser step: epoch 1, iteration 0 of 2
    out = _interrupt(tmp_path, {"target": "torch.nn.utils:clip_grad_norm_", "call": 3, "sleep": 3}, during=lost)
    _check_interrupted(tmp_path, out, capsys)
    state = read_checkpoint(str(store.record_dir(SPEC.run_id) / "checkpoint.pth"))
    assert state["partial"] == {**state["partial"], "epoch": 1, "iteration": 1}  # mid-epoch
    _check_resumes(tmp_path, uninterrupted, resumed_at="at epoch 1, iteration 1")
    # the attempts survived the lost status.json: two, and the training record says so
    assert store.attempts(SPEC.run_id) == 2 == store.read_status(SPEC.run_id).attempts
    assert store.read_metrics(SPEC.run_id)["attempts"] == 2
    lines = [line for line in (store.record_dir(SPEC.run_id) / "attempts.jsonl").read_text().splitlines()]
    assert {'"attempt": "1"' in line for line in lines} == {True, False} and any(
        '"event": "end"' in text for text in lines
    )


def test_ctrl_c_in_an_evaluation_then_resume(tmp_path, capsys, uninterrupted):
    # the first batch of epoch 0's evaluation (2 batches per task)
    out = _interrupt(tmp_path, {"target": "harness.run.evaluation:predict", "call": 1, "sleep": 3})
    store = _check_interrupted(tmp_path, out, capsys)
    assert "in the evaluation of epoch 0" in store.read_status(SPEC.run_id).reason
    assert store.read_log(SPEC.run_id) == []
    _check_resumes(tmp_path, uninterrupted, resumed_at="the end of epoch 0")


def test_ctrl_c_twice_in_a_checkpoint_write_then_resume(tmp_path, capsys, uninterrupted):
    """The second Ctrl-C stops at once, but not in the middle of the checkpoint being written: the file is
    complete (epoch 0), the record interrupted, and the resumed run ends like an uninterrupted one."""
    out = _interrupt(tmp_path, {"target": "torch:save", "call": 1, "sleep": 4}, presses=2)
    store = _check_interrupted(tmp_path, out, capsys)
    assert "stopping at once" in out and "second SIGINT" in store.read_status(SPEC.run_id).reason
    state = read_checkpoint(str(store.record_dir(SPEC.run_id) / "checkpoint.pth"))  # complete, its checksum holds
    assert state["epoch"] == 0 and "partial" not in state and state["pending"]["record"]["epoch"] == 0
    assert not list(store.record_dir(SPEC.run_id).glob("*.tmp"))
    _check_resumes(tmp_path, uninterrupted, resumed_at="the end of epoch 0")


def test_sigkill_then_resubmit_takes_over_at_once(tmp_path, capsys, uninterrupted):
    marker = tmp_path / "held"
    env = environment(
        tmp_path, hook={"target": "torch.nn.utils:clip_grad_norm_", "call": 2, "sleep": 30, "marker": str(marker)}
    )
    proc = start_submission(tmp_path, env, "--wait")
    store = ResultsStore(tmp_path / "results")
    try:
        wait_for(lambda: Path(f"{marker}.0").exists(), 300, "the hook", proc, tmp_path / "submission.log")
        job = store.read_status(SPEC.run_id).job_ids[-1]
        os.killpg(local_pid(job), signal.SIGKILL)  # the job's processes, without warning
        os.killpg(proc.pid, signal.SIGKILL)  # and the terminal's
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.read_status(SPEC.run_id).state == "running"  # nobody could say otherwise
    time.sleep(0.5)  # the killed controller reaped by init
    assert cli.main(argv(tmp_path, "--dry-run")) == 0
    assert "stale" in capsys.readouterr().out
    (tmp_path / "submission.log").unlink()
    out = _check_resumes(tmp_path, uninterrupted)
    assert "claimed by another submission" not in out


def test_cancel_a_local_run_from_another_terminal(tmp_path, capsys, monkeypatch):
    bin_dir, calls = tmp_path / "slurm-bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "squeue", "sacct", "scontrol", "scancel"):
        (bin_dir / name).write_text(f'#!/bin/bash\necho "$(basename "$0") $*" >> {calls}\nexit 0\n')
        (bin_dir / name).chmod(0o755)
    marker = tmp_path / "held"
    env = environment(
        tmp_path, hook={"target": "torch.nn.utils:clip_grad_norm_", "call": 1, "sleep": 8, "marker": str(marker)}
    )
    proc = start_submission(tmp_path, env, "--wait")
    store = ResultsStore(tmp_path / "results")
    try:
        wait_for(lambda: Path(f"{marker}.0").exists(), 300, "the hook", proc, tmp_path / "submission.log")
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # SLURM "exists" here
        assert cli.main(argv(tmp_path, "--status")) == 0
        job = store.read_status(SPEC.run_id).job_ids[-1]
        assert job.startswith("local:") and "running" in capsys.readouterr().out
        assert cli.main(argv(tmp_path, "--cancel")) == 0
        assert f"cancelled 'K=1' ({SPEC.run_id}, job {job})" in capsys.readouterr().out
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "submission.log").read_text()
    assert rc == 130 and "Traceback" not in out and "cancelled" in out, out[-3000:]
    seen = calls.read_text() if calls.exists() else ""
    assert "local" not in seen and str(local_pid(job)) not in seen, seen  # the stand-ins never saw the local id
    assert store.read_status(SPEC.run_id).state == "cancelled"
    state = read_checkpoint(str(store.record_dir(SPEC.run_id) / "checkpoint.pth"))
    assert state["partial"]["epoch"] == 0 and state["partial"]["iteration"] == 1  # stopped with a checkpoint
    entry = store.plan_one(SPEC)
    assert (entry.state, entry.action) == ("cancelled", "run")
