"""The whole product: run_experiment.py on a tiny grid, locally and on the localhost SLURM.

* locally: every row trains, evaluates and is measured (a training, an evaluation and a measurement
  record); log.jsonl and the report appear;
  a second submission skips the done rows; --status shows them;
* on SLURM, 2 tasks per job (gloo): a job requeued with ``scontrol requeue`` mid-run resumes from its
  checkpoint and ends with the weights and metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from harness import cli, launch
from harness.grid import expand, load_experiment
from harness.run import submission
from harness.store import ResultsStore

pytestmark = pytest.mark.slow  # trains rows end to end

TINY = Path(__file__).parent / "fixtures" / "tiny_experiment.yaml"


def _argv(tmp_path, *extra):
    return [str(TINY), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), *extra]


def _final_weights(run_dir: Path):
    state = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=False)
    return state["model"]


def test_local_grid_end_to_end(tmp_path, capsys):
    rc = cli.main(_argv(tmp_path, "--executor", "local", "--rows", "K=1", "--wait"))
    out = capsys.readouterr().out
    assert rc == 0, out
    store = ResultsStore(tmp_path / "results")
    spec = expand(load_experiment(str(TINY), rows=["K=1"]))[0]
    # one record per number: training facts, the row's evaluation (AP), its measurement (params, FLOPs, FPS)
    training = store.read_metrics(spec.run_id)
    metrics = store.read_metrics(spec.eval_key)
    measured = store.read_metrics(spec.measure_key)
    for key in ("epochs_trained", "device", "commit", "date", "scale", "checkpoint_sha256", "train_loss"):
        assert key in training, key
    assert not {"AP", "params", "gflops", "fps_bs1"} & set(training)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "num_detections", "device", "commit", "split"):
        assert key in metrics, key
    assert training["epochs_trained"] == 3 and metrics["num_detections"] == 100
    assert measured["params"] > 20e6 and measured["gflops"] > 0 and measured["fps_bs1"] > 0
    assert metrics["checkpoint_sha256"] == measured["checkpoint_sha256"] == training["checkpoint_sha256"]
    for key in (spec.run_id, spec.eval_key, spec.measure_key):
        assert store.read_status(key).state == "done", key
    assert [r["epoch"] for r in store.read_log(spec.run_id)] == [0, 1, 2]
    # a submission of some rows leaves the canonical report alone; --report writes it, of every row
    assert not (tmp_path / "reports" / "tiny.md").exists()
    assert cli.main(_argv(tmp_path, "--report")) == 0
    report = (tmp_path / "reports" / "tiny.md").read_text()
    lines = report.splitlines()
    k1 = lines.index(next(line for line in lines if line.startswith("| 1 | paper | 39.0 | 59.0 |")))
    ours = lines[k1 + 1]  # the row's own line under its paper line
    assert ours.startswith("|  | ours (full) | ") and f"{metrics['AP']:.1f} ({metrics['AP'] - 39.0:+.1f})" in ours
    assert any(line.startswith("| 2 | paper; ours: not run | 40.0 | 60.0 |") for line in lines)  # not selected

    # a second submission runs nothing; --status shows the row as done
    assert cli.main(_argv(tmp_path, "--executor", "local", "--rows", "K=1")) == 0
    assert "skip" in capsys.readouterr().out
    assert cli.main(_argv(tmp_path, "--status")) == 0
    status = capsys.readouterr().out
    assert spec.run_id in status and "done" in status

    # another experiment file that needs the same run: its submission reuses it, and its report shows it
    other = tmp_path / "other.yaml"
    other.write_text(TINY.read_text().replace("name: tiny", "name: tiny_other"))
    argv_other = [str(other), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")]
    assert cli.main(argv_other + ["--rows", "K=1", "--executor", "local"]) == 0
    assert f"skip  'K=1' ({spec.run_id}): done" in capsys.readouterr().out
    assert cli.main(argv_other + ["--dry-run", "--rows", "K=1", "--executor", "local"]) == 0
    assert "reuses tiny: 'K=1'" in capsys.readouterr().out
    assert cli.main(argv_other + ["--report"]) == 0
    assert f"{metrics['AP']:.1f} ({metrics['AP'] - 39.0:+.1f})" in (tmp_path / "reports" / "tiny_other.md").read_text()

    # an evaluation setting changed: the same training, evaluated again (a job that does not train)
    log_before = store.read_log(spec.run_id)
    assert cli.main(_argv(tmp_path, "eval.num_detections=50", "--rows", "K=1", "--executor", "local")) == 0
    out = capsys.readouterr().out
    assert f"submitted evaluation of 'K=1' ({spec.run_id}/evaluations/" in out
    fewer = expand(load_experiment(str(TINY), rows=["K=1"], overrides=["eval.num_detections=50"]))[0]
    assert fewer.run_id == spec.run_id and fewer.eval_id != spec.eval_id
    evaluation = store.read_metrics(fewer.eval_key)
    assert evaluation["num_detections"] == 50 and 0 <= evaluation["AP"] <= metrics["AP"] + 1e-9
    assert store.read_log(spec.run_id) == log_before  # no epoch trained again
    assert store.read_metrics(spec.eval_key)["AP"] == metrics["AP"]  # the first evaluation is kept

    # a measurement setting changed: the trained model measured again (a job that neither trains nor evaluates)
    assert cli.main(_argv(tmp_path, "benchmark.fps_batch_sizes=[2]", "--rows", "K=1", "--executor", "local")) == 0
    assert f"submitted measurement of 'K=1' ({spec.run_id}/measurements/" in capsys.readouterr().out
    remeasured = expand(load_experiment(str(TINY), rows=["K=1"], overrides=["benchmark.fps_batch_sizes=[2]"]))[0]
    assert remeasured.run_id == spec.run_id and remeasured.eval_id == spec.eval_id
    measurement = store.read_metrics(remeasured.measure_key)
    assert measurement["fps_bs2"] > 0 and measurement["params"] == measured["params"]
    assert store.read_log(spec.run_id) == log_before

    # --rerun trains the done row again from scratch (a fresh log, the same deterministic result)
    assert cli.main(_argv(tmp_path, "--executor", "local", "--rows", "K=1", "--rerun")) == 0
    assert "skip" not in capsys.readouterr().out
    assert [r["epoch"] for r in store.read_log(spec.run_id)] == [0, 1, 2]
    assert store.read_status(spec.run_id).attempts == 1
    assert store.read_metrics(spec.eval_key)["AP"] == metrics["AP"]


def test_bad_experiment_exits_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("enc_n_points: 2,", "enc_n_pionts: 2,"))
    rc = cli.main([str(bad), "--results", str(tmp_path / "r"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(bad) in err and "'K=2'" in err and "model.enc_n_pionts" in err and "enc_n_points" in err


@pytest.mark.slurm
def test_slurm_requeue_mid_epoch_resumes_with_identical_results(slurm_cluster, tmp_path, capsys):
    """``scontrol requeue`` in the middle of an epoch: the job stops at the next iteration with a mid-epoch
    checkpoint, the requeued attempt resumes at that iteration, and the result equals an uninterrupted run's."""
    # 32 training images: 8 iterations per epoch on each of the 2 tasks, about 0.5 s each here. The requeue is
    # sent after the first iteration and reaches the job 1-2 s later: with 4 iterations an epoch, sent after the
    # second, it once arrived after the last (1 run of 7) and the run resumed at the epoch's end, not mid-epoch
    longer = tmp_path / "tiny.yaml"
    longer.write_text(TINY.read_text().replace("synthetic_train_images: 8", "synthetic_train_images: 32"))
    experiment = load_experiment(str(longer), rows=["K=2"])
    spec = expand(experiment)[0]

    def argv(root, *extra):
        return [str(longer), "--results", str(root / "results"), "--reports", str(root / "reports"), *extra]

    # uninterrupted
    rc = cli.main(argv(tmp_path / "a", "--rows", "K=2", "--executor", "slurm", "--wait"))
    assert rc == 0, capsys.readouterr().out
    store_a = ResultsStore(tmp_path / "a" / "results")
    assert store_a.read_metrics(spec.run_id)["world_size"] == 2
    metrics_a = {**store_a.read_metrics(spec.eval_key), **store_a.read_metrics(spec.measure_key)}

    # requeued in the middle of its second epoch
    store_b = ResultsStore(tmp_path / "b" / "results")
    store_b.check_writable()
    specs, jobs, outcomes = submission.submit(experiment, store_b, "slurm")
    assert outcomes is None and len(jobs) == 1
    job_id = str(jobs[0].job_id)
    stdout, _ = launch.log_paths(store_b.root / "tiny" / ".submitit", job_id)
    # a second experiment file needing the same row, submitted meanwhile: no second job, the same one followed
    other = tmp_path / "other.yaml"
    other.write_text(longer.read_text().replace("name: tiny", "name: tiny_other"))
    other_argv = [
        str(other),
        "--results",
        str(tmp_path / "b" / "results"),
        "--reports",
        str(tmp_path / "b" / "reports"),
    ]
    capsys.readouterr()
    assert cli.main(other_argv + ["--rows", "K=2", "--executor", "slurm"]) == 0
    assert f"skip  'K=2' ({spec.run_id}): " in capsys.readouterr().out
    assert cli.main(other_argv + ["--status", "--rows", "K=2"]) == 0
    assert job_id in capsys.readouterr().out
    try:
        slurm_cluster.wait_for(
            lambda: stdout.is_file() and "epoch 1/3 [1/8]" in stdout.read_text(),
            300,
            "the first iteration of the second epoch",
        )
        slurm_cluster.requeue(job_id)
        slurm_cluster.start_when_requeued(job_id)
        ((outcome, value),) = launch.wait(jobs, timeout_s=400)
    except BaseException:
        slurm_cluster.cancel_all([job_id])
        raise
    assert outcome == "success", value
    assert slurm_cluster.restarts(job_id) >= 1
    status = store_b.read_status(spec.run_id)
    assert status.state == "done" and status.attempts >= 2
    resumed = re.search(r"resumed from \S+ at epoch (\d), iteration (\d+)", stdout.read_text())
    assert resumed and 1 <= int(resumed.group(2)) < 8, stdout.read_text()[-3000:]  # mid-epoch

    metrics_b = {**store_b.read_metrics(spec.eval_key), **store_b.read_metrics(spec.measure_key)}
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "params", "gflops"):
        assert metrics_b[key] == metrics_a[key], key
    weights_a = _final_weights(store_a.record_dir(spec.run_id))
    weights_b = _final_weights(store_b.record_dir(spec.run_id))
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    # each epoch logged once: the interrupted epoch was finished by the requeued attempt
    assert [r["epoch"] for r in store_b.read_log(spec.run_id)] == [0, 1, 2]
    # both experiments' reports show the one job's numbers
    assert cli.main(argv(tmp_path / "b", "--report")) == 0
    assert cli.main(other_argv + ["--report"]) == 0
    shown = f"{metrics_b['AP']:.1f} ({metrics_b['AP'] - 40.0:+.1f})"
    for name in ("tiny", "tiny_other"):
        assert shown in (tmp_path / "b" / "reports" / f"{name}.md").read_text(), name


def _coco_whose_images_are_missing(root: Path) -> Path:
    """A COCO folder the checks before queueing accept (annotation files, non-empty image folders) whose
    annotations name an image that is not there: the job fails inside the run, loading the split."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        (root / split / "000000000001.jpg").write_bytes(b"not the image the annotations name")
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(
                {
                    "images": [{"id": 2, "file_name": "000000000002.jpg", "width": 64, "height": 64}],
                    "annotations": [
                        {"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}
                    ],
                    "categories": [{"id": 1, "name": "thing"}],
                }
            )
        )
    return root


def test_crashed_row_is_marked_failed_and_rerun(tmp_path, capsys):
    empty_coco = _coco_whose_images_are_missing(tmp_path / "coco")
    broken = tmp_path / "broken.yaml"
    broken.write_text(TINY.read_text().replace("dataset: synthetic,", f"dataset: coco, root: {empty_coco},"))
    argv = [
        str(broken),
        "--results",
        str(tmp_path / "results"),
        "--reports",
        str(tmp_path / "reports"),
        "--rows",
        "K=1",
        "--executor",
        "local",
        "--wait",
    ]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED 'K=1'" in out and "DatasetError" in out and "not found" in out

    spec = expand(load_experiment(str(broken), rows=["K=1"]))[0]
    status = ResultsStore(tmp_path / "results").read_status(spec.run_id)
    assert status.state == "failed" and str(empty_coco) in status.reason and "Traceback" in status.log_tail
    assert cli.main([str(broken), "--results", str(tmp_path / "results"), "--status"]) == 0
    shown = capsys.readouterr().out
    assert "failed" in shown and "DatasetError" in shown

    # resubmitting reruns the failed row (and only it)
    assert cli.main(argv) == 1
    assert "skip  'K=1'" not in capsys.readouterr().out
    assert ResultsStore(tmp_path / "results").read_status(spec.run_id).attempts == 2
