"""One record per number: the training job's three records (training facts, the row's evaluation, its
measurement), what each holds, the training's own per-epoch evaluation settings, and a failing evaluation
that leaves the shared training done. A tiny model trained for one epoch on a generated set (seconds)."""

import dataclasses
import hashlib
import math
import os
import shutil

import pytest
from builders import tiny_run_config

from harness.config import BenchmarkConfig
from harness.grid import RunSpec, eval_id
from harness.grid.identity import ids
from harness.metrics import EVALUATED_FIELDS, MEASURED_FIELDS
from harness.run import job
from harness.run.job import JobRequest, run_job, training_config
from harness.store import ResultsStore

TRAINING_ONLY = (
    set(EVALUATED_FIELDS) | set(MEASURED_FIELDS) | {"fps_bs1", "fps_details", "num_detections", "gflops_input"}
)


@pytest.fixture(autouse=True)
def _environment():
    """run_job exports torch's rank variables: put them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _spec(cfg, label="row"):
    run, evaluation, measurement = ids(cfg)
    return RunSpec("records", label, cfg.train.seed, cfg, run, "smoke", {}, 0, evaluation, measurement)


def _config(data_root, **eval_fields):
    cfg = tiny_run_config(data_root, epochs=1, eval=eval_fields or None)
    return dataclasses.replace(
        cfg, benchmark=BenchmarkConfig(flops_images=1, fps_images=2, fps_warmup=0, fps_batch_sizes=(1,))
    )


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_training_evaluates_itself_as_the_run_not_as_the_row(tmp_path):
    row = _config(tmp_path, tta=True, tta_sizes=(48, 64), num_detections=50, batch_size_per_gpu=1)
    row = dataclasses.replace(row, data=dataclasses.replace(row.data, eval_size=96))
    own = training_config(row)
    assert own.eval.tta is False and own.eval.num_detections == 100 and own.eval.batch_size_per_gpu is None
    assert own.data.eval_size == row.data.train_size == 64 and own.data.val_split == "val2017"
    assert own.data.synthetic_val_images == row.data.synthetic_val_images  # the split's content
    assert ids(own)[0] == ids(row)[0] and eval_id(own) != eval_id(row)  # the same training
    plain = _config(tmp_path)
    assert eval_id(training_config(plain)) == eval_id(plain)  # reused: no second evaluation
    # a test-dev row: its training follows an annotated split; test-dev is evaluated once, at the end
    test_dev = dataclasses.replace(plain, data=dataclasses.replace(plain.data, val_split="test-dev2017"))
    assert training_config(test_dev).data.val_split == "val2017"
    coco = dataclasses.replace(
        test_dev, data=dataclasses.replace(test_dev.data, dataset="coco", root=str(tmp_path / "no-val"))
    )
    assert training_config(coco).data.val_split == "test-dev2017"  # no val2017 there


def test_training_job_writes_one_record_per_number(tmp_path, monkeypatch):
    """The TTA row submits the shared training: the training record holds training facts only, its log was
    evaluated at the training size without TTA, and the row's evaluation ran afterwards with TTA."""
    store = ResultsStore(tmp_path / "results")
    spec = _spec(_config(tmp_path / "data", tta=True, tta_sizes=(48, 64)))
    evaluated = []
    real_evaluate = job.evaluate
    monkeypatch.setattr(job, "evaluate", lambda cfg, **kw: evaluated.append(cfg) or real_evaluate(cfg, **kw))
    records = run_job(JobRequest(spec, str(store.root), commit="abc1234"))
    assert set(records) == {"train", "evaluate", "measure"}
    for key in (spec.run_id, spec.eval_key, spec.measure_key):
        assert store.read_status(key).state == "done", key

    training = store.read_metrics(spec.run_id)
    assert not TRAINING_ONLY & set(training), TRAINING_ONLY & set(training)
    sha = _sha256(store.record_dir(spec.run_id) / "checkpoint.pth")
    assert training["checkpoint_sha256"] == sha
    assert training["epochs_trained"] == 1 and training["attempts"] == 1 and training["world_size"] == 1
    last = store.read_log(spec.run_id)[-1]
    assert training["train_loss"] == last["train_loss"] and "AP" in last  # the losses; AP stays in the log
    for key in ("device", "attn_impl", "backbone_weights", "torch", "gpu_hours"):
        assert key in training, key
    assert training["commit"] == "abc1234" and len(training["date"]) == 10
    assert training["log_evaluation"]["tta"] is False and training["log_evaluation"]["eval_size"] == 64

    evaluation = store.read_metrics(spec.eval_key)
    assert set(EVALUATED_FIELDS) <= set(evaluation) and not set(MEASURED_FIELDS) & set(evaluation)
    assert evaluation["checkpoint_sha256"] == sha and evaluation["reused_training_evaluation"] is False
    assert evaluation["tta"] is True and evaluation["tta_sizes"] == [48, 64] and evaluation["split"] == "val2017"
    assert evaluation["eval_size"] == 64 and evaluation["num_detections"] == 100 and evaluation["eval_batch_size"] == 2
    assert evaluation["commit"] == "abc1234" and evaluation["gpu_hours"] is None and evaluation["device"]
    assert [c.eval.tta for c in evaluated] == [True]  # evaluated once more, with TTA
    assert store.gpu_hours(spec.eval_key) == 0.0 and (store.record_dir(spec.eval_key) / "attempts.jsonl").is_file()

    measurement = store.read_metrics(spec.measure_key)
    assert set(MEASURED_FIELDS) - {"fps_bs4"} <= set(measurement) and not set(EVALUATED_FIELDS) & set(measurement)
    assert measurement["checkpoint_sha256"] == sha and measurement["trained"] is True
    assert measurement["benchmark"]["fps_batch_sizes"] == [1] and measurement["eval_size"] == 64
    assert measurement["commit"] == "abc1234" and len(measurement["date"]) == 10


def test_a_row_evaluated_as_the_training_reuses_its_final_evaluation(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "results")
    spec = _spec(_config(tmp_path / "data"))
    monkeypatch.setattr(job, "evaluate", lambda *a, **kw: pytest.fail("evaluated a second time"))
    run_job(JobRequest(spec, str(store.root)))
    evaluation = store.read_metrics(spec.eval_key)
    last = store.read_log(spec.run_id)[-1]
    assert evaluation["reused_training_evaluation"] is True
    assert {k: evaluation[k] for k in EVALUATED_FIELDS} == {k: last[k] for k in EVALUATED_FIELDS}
    assert evaluation["checkpoint_sha256"] == store.read_metrics(spec.run_id)["checkpoint_sha256"]


def test_a_failing_evaluation_leaves_the_shared_training_done(tmp_path, monkeypatch):
    """The row's evaluation fails after the training: the training record is done, the evaluation failed, the
    measurement still made; the requeued job does not train again and makes the evaluation."""
    store = ResultsStore(tmp_path / "results")
    spec = _spec(_config(tmp_path / "data", tta=True, tta_sizes=(48, 64)))
    real_evaluate = job.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory at TTA")

    monkeypatch.setattr(job, "evaluate", broken)
    with pytest.raises(RuntimeError, match="out of memory at TTA"):
        run_job(JobRequest(spec, str(store.root)))
    assert store.read_status(spec.run_id).state == "done"
    assert store.read_status(spec.eval_key).state == "failed"
    assert "out of memory" in store.read_status(spec.eval_key).reason
    assert store.read_status(spec.measure_key).state == "done"
    training, log = store.read_metrics(spec.run_id), store.read_log(spec.run_id)
    assert store.plan_one(spec).key == spec.eval_key  # what runs next: the evaluation only

    # the job again (a requeue): no second training, the evaluation made, the measurement left as it is
    monkeypatch.setattr(job, "evaluate", real_evaluate)
    measured = store.read_metrics(spec.measure_key)
    records = run_job(JobRequest(spec, str(store.root)))
    assert set(records) == {"evaluate"}
    assert store.read_log(spec.run_id) == log and store.read_metrics(spec.run_id) == training
    assert store.read_status(spec.run_id).attempts == 1
    assert store.read_status(spec.eval_key).state == "done" and store.read_status(spec.eval_key).attempts == 2
    assert store.read_metrics(spec.eval_key)["checkpoint_sha256"] == training["checkpoint_sha256"]
    assert store.read_metrics(spec.measure_key) == measured


def test_an_evaluation_job_names_the_checkpoint_it_evaluated(tmp_path):
    """A row that only evaluates a done training (another detections setting) gets its own record with the
    training's checkpoint hash, even when the training record predates the hash (computed from the file)."""
    store = ResultsStore(tmp_path / "results")
    spec = _spec(_config(tmp_path / "data"))
    run_job(JobRequest(spec, str(store.root)))
    old = store.read_metrics(spec.run_id)
    sha = old.pop("checkpoint_sha256")
    store.write_metrics(spec.run_id, old)  # a training record of an earlier version
    fewer = dataclasses.replace(spec.config, eval=dataclasses.replace(spec.config.eval, num_detections=5))
    other = dataclasses.replace(spec, label="fewer", config=fewer, eval_id=eval_id(fewer))
    assert other.run_id == spec.run_id and other.eval_key != spec.eval_key
    record = run_job(JobRequest(other, str(store.root), kind="evaluate"))
    assert record["checkpoint_sha256"] == sha and record["num_detections"] == 5
    assert store.read_status(other.eval_key).state == "done"
    assert store.read_metrics(spec.run_id) == old  # the training is not touched


# ------------------------------------------------------------------------------------ collect: each from its record


def test_collect_reads_each_number_from_its_record(tmp_path):
    """AP from the evaluation record, parameters/FLOPs/FPS from the measurement record, epochs from the
    training record; GPU-hours the three records' sum; each record's provenance in its own columns."""
    from pathlib import Path

    from harness.grid import expand, load_experiment
    from harness.report.collect import collect

    fixture = Path(__file__).parent / "fixtures" / "results_small"
    shutil.copytree(fixture / "results", tmp_path / "results")
    experiment = load_experiment(fixture / "experiment.yaml", check_data=False)
    store = ResultsStore(tmp_path / "results")
    specs = {(s.label, s.seed): s for s in expand(experiment, "full")}
    base = specs[("base", 1)]
    for key, changes in (
        (base.run_id, {"AP": 99.0, "params": 1, "gpu_hours": 300.0, "commit": "train01"}),
        (
            base.eval_key,
            {
                "gpu_hours": 2.5,
                "commit": "eval02",
                "date": "2026-02-01",
                "device": "NVIDIA A100",
                "num_detections": 300,
                "epochs_trained": 7,
            },
        ),
        (base.measure_key, {"gpu_hours": 0.5, "commit": "measure03", "AP": 98.0, "device": "NVIDIA L4"}),
    ):
        store.write_metrics(key, {**store.read_metrics(key), **changes})
    df = collect(tmp_path / "results", experiment)
    row = df[(df.label == "base") & (df.seed == 1) & (df.scale == "full")].iloc[0]
    assert row.AP == 44.0 and row.params == 40069665 and row.epochs_trained == 50  # not the strays
    assert row.num_detections == 300
    assert row.gpu_hours == pytest.approx(303.0)
    assert (row.train_gpu_hours, row.eval_gpu_hours, row.measure_gpu_hours) == (300.0, 2.5, 0.5)
    assert (row.train_commit, row.eval_commit, row.measure_commit) == ("train01", "eval02", "measure03")
    assert row.eval_date == "2026-02-01" and row.train_date == "2026-01-02"
    assert (row.train_device, row.eval_device, row.measure_device) == (
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100",
        "NVIDIA L4",
    )
    assert row.commit == "train01, eval02, measure03" and row.device == "NVIDIA H100 80GB HBM3"
    assert row.eval_split == "val2017" and row.checkpoint_sha256 == "ab" * 32

    # an evaluation of an earlier checkpoint (the training was redone) is not shown
    store.write_metrics(base.eval_key, {**store.read_metrics(base.eval_key), "checkpoint_sha256": "cd" * 32})
    row = collect(tmp_path / "results", experiment).query("label == 'base' and seed == 1 and scale == 'full'").iloc[0]
    assert math.isnan(row.AP) and row.params == 40069665

    # measured without training (python -m harness.measure): its numbers, the row still to train
    alone = collect(tmp_path / "results", experiment).query("label == 'not run' and scale == 'full'").iloc[0]
    assert alone.state == "new" and alone.params == 41524768 and math.isnan(alone.AP)
    assert alone.measure_commit == "89abcdef0123" and alone.train_commit == "" and alone.commit == "89abcdef0123"
    assert alone.dataset == "coco" and bool(alone.has_metrics)
