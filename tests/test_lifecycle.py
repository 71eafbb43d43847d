"""One lifecycle for every executor, the fast parts (real processes where liveness is the point, no training
but the engine's own): the interrupted state, the one stale rule for plans and submissions, job ids that carry
their executor (local ids never reach squeue/scancel), attempts that survive a lost status.json, array tasks
that wait for their submission's claim, a hard stop deferred past a checkpoint write, and a stop inside an
evaluation that resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import cli
from harness.grid import expand, load_experiment
from harness.store import ResultsStore, Status, decide
from harness.store.jobs import (
    executor_of,
    local_job_alive,
    local_job_id,
    native_id,
    process_start,
    slurm_id,
    split_job_id,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_experiment.yaml"


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.fixture
def sleeper():
    """A live process in a session of its own (a local job's controller stands in): it writes 'TERM' to its
    marker on SIGTERM and exits."""
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"sleeper-{os.getpid()}-{time.monotonic_ns()}"
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('TERM'), sys.exit(0)))\n"
        "print('ready', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.marker = marker
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    marker.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ the states


def test_interrupted_resumes_and_gone_jobs_are_stale_at_once():
    assert decide(Status("interrupted", reason="Ctrl-C"))[:2] == ("interrupted", "run")
    assert "resumes" in decide(Status("interrupted"))[2]
    assert decide(Status("interrupted", job_ids=("local:1:2",)), job_alive=True)[:2] == ("interrupted", "skip")
    assert decide(Status("interrupted"), claim_stale=False)[:2] == ("interrupted", "skip")  # still stopping
    # a queued or running record whose job is gone: stale now, not after the heartbeat timeout
    assert decide(Status("running", job_ids=("local:1:2",)), job_alive=False, status_age_s=1)[:2] == ("stale", "run")
    assert decide(Status("queued", job_ids=("7",)), job_alive=False)[:2] == ("stale", "run")
    assert decide(Status("running", job_ids=("7",)), job_alive=True, claim_stale=False)[:2] == ("running", "skip")
    # a dead holder's claim, but the scheduler still has the job (requeued, waiting to start): not resubmitted
    assert decide(Status("running", job_ids=("7",)), job_alive=True, claim_stale=True)[:2] == ("running", "skip")
    assert decide(Status("running", job_ids=("7",)), claim_stale=True)[:2] == ("stale", "run")


def test_job_ids_carry_their_executor(sleeper):
    assert split_job_id("123") == ("slurm", "123") and split_job_id("123_4") == ("slurm", "123_4")
    assert slurm_id("slurm:55") == "55" and slurm_id("41") == "41"  # a bare number of an old record
    job = local_job_id(sleeper.pid)
    assert job == f"local:{sleeper.pid}:{process_start(sleeper.pid)}" and executor_of(job) == "local"
    assert slurm_id(job) is None and native_id(job) == str(sleeper.pid)
    assert local_job_alive(job) is True
    assert local_job_alive(f"local:{sleeper.pid}:1") is False  # the pid, reused by another process
    assert local_job_alive(f"local:{_dead_pid()}:1") is False
    assert local_job_alive("123") is None  # not this executor's to answer


def test_a_killed_run_is_taken_over_at_once(tmp_path, sleeper):
    """A run whose process was killed (SIGKILL: no status written, its claim left behind) is stale for --dry-run
    and for the submission alike: the submission claims it (no 'claimed by another submission')."""
    spec = expand(load_experiment(str(TINY), rows=["K=1"], check_data=False))[0]
    store = ResultsStore(tmp_path)
    dead = _dead_pid()
    store.mark_queued(spec.run_id, job_id=f"local:{dead}:1")
    store.mark_running(spec.run_id, job_id=f"local:{dead}:1")
    lock = store.record_dir(spec.run_id) / "claim.lock"
    lock.write_text(
        json.dumps(
            {
                "token": "t",
                "host": store.host,
                "pid": dead,
                "time": 0,
                "job_id": f"local:{dead}:1",
                "role": "job",
                "start": "1",
            }
        )
    )
    entry = store.plan([spec])[0]
    assert (entry.state, entry.action) == ("stale", "run") and "no longer exists" in entry.reason
    claim = store.claim_for_submit(spec)
    assert claim is not None and json.loads(lock.read_text())["token"] == claim.token
    store.release(claim)

    # a live local job is left alone, by the plan and by a submission
    store.mark_queued(spec.run_id, job_id=local_job_id(sleeper.pid))
    assert store.plan([spec])[0].state == "queued" and store.claim_for_submit(spec) is None
    # a pid taken over by another process is not the job's
    store.mark_queued(spec.run_id, job_id=f"local:{sleeper.pid}:1")
    assert store.plan([spec])[0].state == "stale"


def test_attempts_survive_a_lost_or_corrupt_status(tmp_path):
    """attempts.jsonl is appended to, never rewritten: the attempt number and GPU-hours count every attempt
    whatever became of status.json (and an attempts.json of an earlier version still counts)."""
    clock = Clock(1000.0)
    store = ResultsStore(tmp_path, clock=clock)
    assert store.mark_running("r").attempts == 1
    store.record_attempt("r", 1, started=1000.0, gpus=8, event="start")
    clock.t += 3600
    store.record_attempt("r", 1, started=1000.0, gpus=8)
    (store.record_dir("r") / "status.json").unlink()  # lost mid-run
    clock.t += 600
    assert store.mark_running("r").attempts == 2
    store.record_attempt("r", 2, started=clock.t, gpus=8, event="start")
    clock.t += 1800
    store.record_attempt("r", 2, started=clock.t - 1800, gpus=8, event="end")
    assert store.gpu_hours("r") == pytest.approx(8 + 4)
    (store.record_dir("r") / "status.json").write_text('{"state": "runn')  # corrupt
    assert store.mark_running("r").attempts == 3 and store.attempts("r") == 3
    with open(store.record_dir("r") / "attempts.jsonl", "a") as f:
        f.write('{"attempt": "3", "event": "beat", "star')  # a line cut short by a crash
    old = store.record_dir("r") / "attempts.json"
    old.write_text(json.dumps({"0": {"started": 0.0, "seen": 3600.0, "gpus": 2}}))
    assert store.gpu_hours("r") == pytest.approx(8 + 4 + 2)


def test_an_array_task_waits_for_its_submission_to_let_go(tmp_path):
    pytest.importorskip("torch")
    from harness.run.attempt import claim_when_free

    store = ResultsStore(tmp_path)
    held = store.claim("r", role="submit")  # the submission, until its jobs are queued
    assert store.claimed_by_submission("r")
    threading.Timer(1.0, store.release, args=(held,)).start()
    start = time.monotonic()
    claim = claim_when_free(store, "r", "123_4", wait_s=30, poll_s=0.1)
    assert claim is not None and 0.9 < time.monotonic() - start < 20
    # another job's claim is not waited for
    start = time.monotonic()
    assert claim_when_free(ResultsStore(tmp_path, host="elsewhere"), "r", "999", wait_s=30) is None
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------- following, cancelling


@pytest.fixture
def stand_in_slurm(tmp_path, monkeypatch):
    """sbatch/srun on PATH (so SLURM counts as available); squeue says RUNNING for every id; every call's
    arguments recorded in calls.log."""
    bin_dir, log = tmp_path / "slurm-bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    record = f'echo "$(basename "$0") $*" >> {log}\n'
    squeue = (
        'while [ $# -gt 0 ]; do if [ "$1" = -j ]; then shift; tr , "\\n" <<< "$1" | sed "s/$/ RUNNING/"; fi; '
        "shift; done\n"
    )
    for name in ("sbatch", "srun", "sacct", "scontrol", "scancel", "squeue"):
        (bin_dir / name).write_text("#!/bin/bash\n" + record + (squeue if name == "squeue" else "exit 0\n"))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_status_and_cancel_ask_each_executor_about_its_own_jobs(tmp_path, capsys, stand_in_slurm, sleeper):
    experiment = load_experiment(str(TINY), check_data=False)
    local_row, slurm_row = (
        {s.label: s for s in expand(experiment)}["K=1"],
        {s.label: s for s in expand(experiment)}["K=2"],
    )
    store = ResultsStore(tmp_path / "results")
    local = local_job_id(sleeper.pid)
    store.mark_queued(local_row.run_id, job_id=local)
    store.mark_running(local_row.run_id, job_id=local)
    store.mark_queued(slurm_row.run_id, job_id="701")
    argv = [str(TINY), "--results", str(tmp_path / "results")]
    assert cli.main(argv + ["--status"]) == 0
    out = capsys.readouterr().out
    assert local in out and "701" in out and "stale" not in out
    assert cli.main(argv + ["--cancel"]) == 0
    out = capsys.readouterr().out
    assert f"cancelled 'K=1' ({local_row.run_id}, job {local})" in out and "cancelled 'K=2'" in out
    calls = stand_in_slurm.read_text().splitlines()
    assert "scancel 701" in calls and any(c.startswith("squeue") for c in calls)
    assert not [c for c in calls if "local" in c or str(sleeper.pid) in c], calls  # never the local id
    sleeper.wait(timeout=30)
    assert sleeper.marker.read_text() == "TERM"  # the local job was asked to stop
    assert {store.read_status(s.run_id).state for s in (local_row, slurm_row)} == {"cancelled"}


# ------------------------------------------------------------------------------------------- stopping


@pytest.fixture
def stop_signals():
    """The job's stop handlers installed in this process (as in a job), and everything put back after."""
    from harness.launch import wrapper

    saved = {num: signal.getsignal(num) for num in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGALRM)}
    wrapper._watch_stop_signals()
    yield wrapper
    for num, handler in saved.items():
        signal.signal(num, handler)
    for state in (wrapper._stop_signals, wrapper._deferred_requeue, wrapper._deferring, wrapper._hard_pending):
        state.clear()


def test_a_second_ctrl_c_waits_for_the_checkpoint_being_written(tmp_path, stop_signals, monkeypatch):
    torch = pytest.importorskip("torch")
    from harness.run import checkpointing

    os.kill(os.getpid(), signal.SIGINT)  # the first: a request, no exception
    assert stop_signals.stop_requested() and not stop_signals.requeue_pending()
    real_save = torch.save

    def slow_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # the second, in the middle of the write
        time.sleep(0.2)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", slow_save)
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "lr_scheduler": {}, "epoch": 4}
    with pytest.raises(stop_signals.HardStop):
        checkpointing.save_checkpoint(str(tmp_path), state)
    assert checkpointing.read_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 4  # complete, renamed
    assert not (tmp_path / "checkpoint.pth.tmp").exists()
    assert stop_signals.stop_signal_names() == "SIGINT"
    with pytest.raises(stop_signals.HardStop):  # outside a write: at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_stop_in_an_evaluation_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """A stop between evaluation batches: the epoch's checkpoint is complete and holds the epoch's record; the
    resumed run evaluates and logs that epoch first, each epoch is logged once, and the weights are those of a
    run that never stopped."""
    torch = pytest.importorskip("torch")
    from builders import tiny_run_config

    from harness.run import checkpointing, engine, evaluation

    cfg = tiny_run_config(
        tmp_path / "data",
        epochs=2,
        train=dict(eval_every=1, total_batch_size=2),
        data=dict(synthetic_val_images=4),
        eval=dict(batch_size_per_gpu=1, save_detections=False),
    )
    full, part = tmp_path / "full", tmp_path / "part"
    engine.train(cfg, str(full), print_fn=None)
    asked = []
    real_predict = evaluation.predict

    def predict(*args, **kwargs):  # the stop arrives during the first evaluation's first batch
        asked.append(1)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict", predict)
    with pytest.raises(engine.TrainingInterrupted, match="in the evaluation of epoch 0"):
        engine.train(cfg, str(part), print_fn=None, should_stop=lambda: bool(asked))
    state = checkpointing.read_checkpoint(str(part / "checkpoint.pth"))
    assert state["epoch"] == 0 and state["pending"]["record"]["epoch"] == 0 and not (part / "log.jsonl").exists()
    monkeypatch.setattr(evaluation, "predict", real_predict)
    engine.train(cfg, str(part), print_fn=None, should_stop=lambda: False)
    logged = [json.loads(line)["epoch"] for line in (part / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1] and "AP" in json.loads((part / "log.jsonl").read_text().splitlines()[0])
    a = torch.load(full / "checkpoint.pth", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resumed again at the end: nothing is logged twice
    engine.train(cfg, str(part), print_fn=None)
    assert [json.loads(line)["epoch"] for line in (part / "log.jsonl").read_text().splitlines()] == [0, 1]
