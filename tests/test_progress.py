"""Following a training: progress lines at a steady pace, the AP line, TensorBoard scalars (continued by a resumed
run), Weights & Biases when asked for, and job logs in the terminal (--logs --lines/--follow, a local job's log
printed while the submission waits)."""

from __future__ import annotations

import os
import sys
import threading
import time
import types

import pytest
from builders import tiny_run_config
from test_cli import TINY, _argv

from harness import cli
from harness.config import TrainConfig
from harness.grid import expand, load_experiment
from harness.run import engine, logs, tracking
from harness.store import ResultsStore

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:effective total batch"),
    pytest.mark.filterwarnings("ignore:Detected call of"),
]


# ------------------------------------------------------------------------------------ progress lines


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _tracker(monkeypatch, **train):
    clock = Clock()
    monkeypatch.setattr(tracking.time, "time", clock)
    lines = []
    tracker = tracking.Tracker(
        None,
        TrainConfig(epochs=3, **train),
        iters_per_epoch=100,
        print_fn=lines.append,
        evaluates=lambda epoch: epoch == 2,
    )
    return tracker, clock, lines


def _run(tracker, clock, epoch=0, n=100, skip=0, seconds_per_it=1.0):
    tracker.begin_epoch(epoch, n, skip)
    sums = {"loss": 2.0 * skip}  # a resumed epoch's sums include its first part
    for it in range(skip, n):
        clock.now += seconds_per_it
        sums["loss"] += 2.0
        tracker.iteration(it, {"loss": 2.0}, sums, {"lr_default": 2e-4, "lr_backbone": 2e-5})


def test_a_line_every_print_freq_iterations_or_interval_and_the_first_and_last(monkeypatch):
    tracker, clock, lines = _tracker(monkeypatch, print_freq=10)
    _run(tracker, clock, seconds_per_it=0.1)  # fast: every 10 iterations
    assert [line.split("]")[0] for line in lines] == ["epoch 0/3 [1/100"] + [
        f"epoch 0/3 [{i}/100" for i in range(11, 101, 10)
    ] + ["epoch 0/3 [100/100"]
    first = lines[1]
    assert "loss 2.0000 (mean 2.0000)" in first and "lr 2.00e-04" in first and "10.00 it/s" in first
    assert "eta 0:00:08" in first  # 89 iterations at 0.1 s
    lines.clear()
    tracker, clock, lines = _tracker(monkeypatch, print_freq=1000)
    _run(tracker, clock, seconds_per_it=7.0)  # slow: every PRINT_INTERVAL_S (20 s): every 3rd
    assert [line.split(" [")[1].split("/")[0] for line in lines[:4]] == ["1", "4", "7", "10"]
    assert lines[-1].startswith("epoch 0/3 [100/100]")


def test_eta_of_the_run_counts_later_epochs_and_evaluations(monkeypatch):
    tracker, clock, lines = _tracker(monkeypatch, print_freq=50)
    tracker.epoch_done(dict(epoch=0, train_loss=1.0, epoch_time_s=100.0, AP=1.0, eval_time_s=30.0))
    lines.clear()
    _run(tracker, clock, epoch=1, n=100, skip=50)  # resumed at iteration 50: 1 s per iteration
    assert lines[0].startswith("epoch 1/3 [51/100]") and "eta 0:00:49" in lines[0]
    # 49 s left in epoch 1, epoch 2's 100 s, its evaluation (30 s, the mean so far)
    assert "run 0:02:59" in lines[0]
    assert lines[-1].startswith("epoch 1/3 [100/100]") and "eta 0:00:00" in lines[-1] and "run 0:02:10" in lines[-1]


def test_ap_line_says_no_value_for_none():
    assert (
        tracking.ap_text(dict(AP=31.24, AP50=50.0, AP75=None, APs=0.0, APm=12.0, APl=None))
        == "AP 31.2  AP50 50.0  AP75 –  APs 0.0  APm 12.0  APl –"
    )


def test_epoch_done_prints_losses_and_ap(monkeypatch):
    tracker, clock, lines = _tracker(monkeypatch)
    tracker.epoch_done(
        dict(
            epoch=2,
            train_loss=1.5,
            train_loss_ce=0.5,
            train_loss_ce_0=0.6,
            lr_default=2e-4,
            epoch_time_s=61.0,
            AP=3.0,
            AP50=None,
            eval_time_s=2.0,
        )
    )
    assert lines == [
        "epoch 2/3 done in 0:01:01: loss 1.5000, loss_ce 0.5000",
        "epoch 2/3  AP 3.0  AP50 –  (evaluated in 0:00:02)",
    ]
    tracker.final(dict(AP=3.0, APl=None))
    assert lines[-1] == "final  AP 3.0  APl –"


def test_other_ranks_print_and_write_nothing(tmp_path):
    lines = []
    tracker = tracking.Tracker(str(tmp_path), TrainConfig(wandb=True), 10, main=False, print_fn=lines.append)
    tracker.begin_epoch(0, 10)
    tracker.iteration(0, {"loss": 1.0}, {"loss": 1.0}, {"lr_default": 1.0})
    tracker.epoch_done(dict(epoch=0, train_loss=1.0, AP=1.0))
    tracker.close()
    assert lines == [] and not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb_id").exists()


# ------------------------------------------------------------------------------------- TensorBoard


def _scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_a_resumed_run_continues_its_curves(tmp_path):
    data = tmp_path / "data"
    common = dict(
        train=dict(total_batch_size=4, max_iters_per_epoch=4, eval_every=1),
        data=dict(synthetic_train_images=8),
        eval=dict(save_detections=False),
    )
    cfg = tiny_run_config(data, epochs=2, **common)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    engine.train(cfg, full, print_fn=None)
    scalars = _scalars(full)
    assert {
        "train/loss",
        "train/loss_ce",
        "lr/default",
        "lr/backbone",
        "train/iters_per_s",
        "epoch/train_loss",
        "epoch/time_s",
        "epoch/eval_time_s",
        "val/AP",
        "val/AP50",
    } <= set(scalars)
    assert "val/APl" not in scalars  # no large object in the synthetic val split: no value
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))  # print_freq 1, 4 iterations x 2 epochs
    assert [s for s, _ in scalars["val/AP"]] == [4, 8]
    assert scalars["lr/default"][-1][1] == pytest.approx(2e-6)  # lr_drop 1: dropped per epoch
    polls = []
    with pytest.raises(engine.TrainingInterrupted):  # the first poll of epoch 1: after its iteration 2
        engine.train(cfg, part, print_fn=None, should_stop=lambda: polls.append(1) or len(polls) == 3)
    engine.train(cfg, part, print_fn=None)
    resumed = _scalars(part)
    for tag in ("train/loss", "train/loss_bbox", "lr/default", "val/AP", "epoch/train_loss"):
        assert resumed[tag] == scalars[tag], tag  # the same points, each once: the curve goes on
    assert len(os.listdir(os.path.join(part, "tensorboard"))) == 2  # one events file per attempt


def test_tensorboard_purges_what_an_attempt_wrote_after_its_checkpoint(tmp_path):
    """A hard stop (SIGKILL) loses the iterations after the last checkpoint: the next attempt writes them again,
    and TensorBoard shows only the new points."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(1, 11):
        writer.add_scalar("train/loss", 1.0, step)
    writer.close()
    tracker = tracking.Tracker(
        str(tmp_path), TrainConfig(print_freq=1), iters_per_epoch=10, print_fn=None, first_step=4
    )
    tracker.begin_epoch(0, 10, skip=4)
    for it in range(4, 6):
        tracker.iteration(it, {"loss": 2.0}, {"loss": 2.0 * (it + 1)}, {"lr_default": 1e-4})
    tracker.close()
    assert _scalars(str(tmp_path))["train/loss"] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0), (6, 2.0)]


def test_console_of_a_run(tmp_path, capsys):
    cfg = tiny_run_config(tmp_path / "data", epochs=1, train=dict(max_iters_per_epoch=2))
    engine.train(cfg, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "training epochs 0..0 of 1, 2 iterations each" in out and str(tmp_path / "run" / "tensorboard") in out
    assert "epoch 0/1 [1/2]  loss " in out and "epoch 0/1 [2/2]" in out and "run 0:" in out
    assert "epoch 0/1 done in" in out and "epoch 0/1  AP " in out and "APl –" in out


# ---------------------------------------------------------------------------------- Weights & Biases


def test_wandb_on_without_wandb_installed_warns_once_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = tiny_run_config(
        tmp_path / "data", epochs=1, train=dict(max_iters_per_epoch=1, wandb=True), eval=dict(save_detections=False)
    )
    metrics = engine.train(cfg, str(tmp_path / "run"), print_fn=None)
    assert "AP" in metrics
    warnings = [line for line in capsys.readouterr().out.splitlines() if "wandb" in line]
    assert warnings == [
        "WARNING: train.wandb is on but wandb is not installed (pip install wandb): not logging to Weights & Biases"
    ]


def test_wandb_gets_the_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda data, step: calls.append(("log", step, data)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):
        tracker = tracking.Tracker(
            str(tmp_path / "abc123"),
            TrainConfig(wandb=True, print_freq=1),
            5,
            print_fn=None,
            config={"train": {"lr": 1}},
            tensorboard=False,
        )
        tracker.begin_epoch(0, 5)
        tracker.iteration(0, {"loss": 3.0}, {"loss": 3.0}, {"lr_default": 1e-4})
        tracker.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["id"] == inits[1]["id"] == (tmp_path / "abc123" / "wandb_id").read_text().strip()
    assert inits[0]["name"] == "abc123" and inits[0]["resume"] == "allow" and inits[0]["config"] == {"train": {"lr": 1}}
    logged = [c for c in calls if c[0] == "log"]
    assert logged[0][1] == 1 and logged[0][2]["train/loss"] == 3.0 and logged[0][2]["lr/default"] == 1e-4
    assert calls[-1] == ("finish",)


def test_a_failing_tracker_never_fails_the_training(tmp_path, capsys, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("not logged in")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken))
    tracker = tracking.Tracker(str(tmp_path), TrainConfig(wandb=True, print_freq=1), 5, print_fn=None)
    assert tracker.wandb is None and "Weights & Biases off: RuntimeError: not logged in" in capsys.readouterr().out

    class BadWriter:
        def add_scalar(self, *args):
            raise OSError("disk full")

    tracker.writer = BadWriter()
    tracker.begin_epoch(0, 5)
    tracker.iteration(0, {"loss": 1.0}, {"loss": 1.0}, {"lr_default": 1.0})
    assert tracker.writer is None and "TensorBoard off: OSError: disk full" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ job logs


def test_file_follower_prints_complete_lines_and_restarts_a_rewritten_file(tmp_path):
    path, out = tmp_path / "log.out", []
    follower = logs.FileFollower([(path, out.append)])
    assert not follower.poll()  # not there yet
    path.write_text("one\ntw")
    assert follower.poll() and out == ["one\n"]
    with open(path, "a") as f:
        f.write("o\nthree")
    follower.poll()
    assert out == ["one\n", "two\n"]
    follower.poll(final=True)
    assert out[-1] == "three\n"
    path.write_text("new\n")  # shorter: written anew
    follower.poll()
    assert out[-1] == "new\n"


def test_a_local_job_s_log_is_printed_while_the_submission_waits(tmp_path, capsys):
    out, err = tmp_path / "1_0_log.out", tmp_path / "1_0_log.err"

    def job():
        for i in range(3):
            with open(out, "a") as f:
                f.write(f"epoch 0/1 [{i + 1}/3]\n")
            time.sleep(0.1)
        err.write_text("a warning\n")

    with logs.printing_logs([(out, err)], poll_s=0.05):
        thread = threading.Thread(target=job)
        thread.start()
        thread.join()
    captured = capsys.readouterr()
    assert captured.out == "epoch 0/1 [1/3]\nepoch 0/1 [2/3]\nepoch 0/1 [3/3]\n" and captured.err == "a warning\n"


def _queued_row_with_log(tmp_path, lines=100):
    spec = expand(load_experiment(str(TINY), rows=["K=2"]))[0]
    store = ResultsStore(tmp_path / "results")
    store.mark_queued(spec.run_id, job_id="42")
    log_dir = tmp_path / "results" / "tiny" / ".submitit"
    log_dir.mkdir(parents=True)
    (log_dir / "42_0_log.out").write_text("".join(f"line {i}\n" for i in range(lines)))
    return spec, store, log_dir / "42_0_log.out"


def test_logs_lines(tmp_path, capsys):
    _queued_row_with_log(tmp_path)
    assert cli.main(_argv(tmp_path, "--logs", "0", "--lines", "5")) == 0
    out = capsys.readouterr().out
    assert "line 99" in out and "line 95" in out and "line 94" not in out
    with pytest.raises(SystemExit):
        cli.main(_argv(tmp_path, "--status", "--follow"))
    assert "--follow and --lines go with --logs" in capsys.readouterr().err


def test_logs_follow_until_the_job_ends(tmp_path):
    spec, store, log = _queued_row_with_log(tmp_path, lines=10)
    experiment = load_experiment(str(TINY), rows=["0"])
    written = []

    def job():
        time.sleep(0.2)
        store.mark_running(spec.run_id, job_id="42")
        for i in range(10, 13):
            with open(log, "a") as f:
                f.write(f"line {i}\n")
            time.sleep(0.1)
        store.mark_cancelled(spec.run_id)

    thread = threading.Thread(target=job)
    thread.start()
    state = logs.follow_logs(experiment, store, "0", lines=3, poll_s=0.02, state_every_s=0.1, write=written.append)
    thread.join()
    text = "".join(written)
    assert state == "cancelled"
    assert "line 6\n" not in text and "line 7\nline 8\nline 9\n" in text and "line 10\nline 11\nline 12\n" in text
    assert text.splitlines()[-1].startswith(f"==> {spec.run_id}: cancelled")


def test_logs_follow_stops_cleanly_on_ctrl_c(tmp_path, capsys, monkeypatch):
    _queued_row_with_log(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "follow_logs", interrupted)
    assert cli.main(_argv(tmp_path, "--logs", "0", "--follow")) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "resume with" not in captured.err
