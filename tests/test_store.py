"""The results store: atomic writes, corrupt files, claims, plans and the dry run (no torch)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.grid import eval_id, expand, load_experiment, measure_id, run_id
from harness.store import (
    CorruptFileError,
    ResultsError,
    ResultsStore,
    Status,
    atomic_write_json,
    decide,
    dry_run_plan,
    tail_text,
)
from harness.store.plan import rerun_removals

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        textwrap.dedent("""
        name: exp
        rows:
          - label: a
          - label: b
            overrides: {model: {enc_n_points: 1}}
          - label: c
            overrides: {model: {enc_n_points: 2}}
        """)
    )
    return load_experiment(path, smoke=True)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"AP": 1.0})
    atomic_write_json(target, {"AP": 2.0})
    assert json.loads(target.read_text()) == {"AP": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_atomic_write_keeps_the_old_file_if_writing_fails(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"AP": 1.0})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"AP": object()})
    assert json.loads(target.read_text()) == {"AP": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


@pytest.mark.parametrize(
    "content,why", [('{"AP": 43.', "truncated"), ("", "empty"), ("[1, 2]", "object"), ("\x00\x00garbage", "corrupt")]
)
def test_corrupt_metrics_are_reported_by_path(tmp_path, content, why):
    store = ResultsStore(tmp_path)
    folder = store.record_dir("abc")
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(content)
    with pytest.raises(CorruptFileError) as info:
        store.read_metrics("abc")
    assert str(folder / "metrics.json") in str(info.value) and why in str(info.value)


def test_metrics_round_trip_and_missing(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.read_metrics("abc") is None
    store.write_metrics("abc", {"AP": 43.8, "device": "cpu"})
    assert store.read_metrics("abc") == {"AP": 43.8, "device": "cpu"}


def test_status_lifecycle(tmp_path):
    clock = Clock()
    store = ResultsStore(tmp_path, clock=clock, host="h1")
    store.mark_queued("r1", job_id="11")
    clock.t += 60
    s = store.mark_running("r1", job_id="11")
    assert s.state == "running" and s.job_ids == ("11",) and s.attempts == 1 and s.host == "h1"
    s = store.mark_running("r1", job_id="11_requeued")  # a requeue
    assert s.attempts == 2 and s.job_ids == ("11", "11_requeued")
    s = store.mark_failed("r1", "RuntimeError: boom", log_tail="line 1\nline 2")
    assert s.state == "failed" and s.reason == "RuntimeError: boom" and s.finished_at
    assert store.read_status("r1") == s
    s = store.mark_queued("r1", job_id="12")
    assert s.reason is None and s.log_tail is None and s.job_ids[-1] == "12"


def test_corrupt_status_is_reported(tmp_path):
    store = ResultsStore(tmp_path)
    folder = store.record_dir("r1")
    folder.mkdir(parents=True)
    (folder / "status.json").write_text('{"state": "runn')
    with pytest.raises(CorruptFileError, match="status.json"):
        store.read_status("r1")
    (folder / "status.json").write_text('{"state": "sleeping"}')
    with pytest.raises(CorruptFileError, match="sleeping"):
        store.read_status("r1")


def test_log_tolerates_a_line_cut_by_a_crash(tmp_path):
    store = ResultsStore(tmp_path)
    store.append_log("r1", {"epoch": 0, "AP": 1.0})
    path = store.record_dir("r1") / "log.jsonl"
    with open(path, "a") as f:
        f.write('{"epoch": 1, "AP"')  # crash mid-write
    assert store.read_log("r1") == [{"epoch": 0, "AP": 1.0}]
    store.append_log("r1", {"epoch": 1, "AP": 2.0})  # resumed: closes the cut line
    assert store.read_log("r1") == [{"epoch": 0, "AP": 1.0}, {"epoch": 1, "AP": 2.0}]
    with pytest.raises(CorruptFileError, match="line 2"):
        store.read_log("r1", strict=True)


def test_tail_text(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_text(path, 3) == "line 97\nline 98\nline 99"
    assert tail_text(tmp_path / "missing") == ""


def test_config_yaml_is_the_resolved_config(tmp_path, experiment):
    import yaml

    store = ResultsStore(tmp_path)
    spec = expand(experiment)[1]
    folder = store.prepare(spec)
    doc = yaml.safe_load((folder / "config.yaml").read_text())
    assert doc["run_id"] == spec.run_id and doc["label"] == "b" and doc["scale"] == "smoke"
    assert doc["config"]["model"]["enc_n_points"] == 1
    assert store.read_config(spec.run_id)["seed"] == spec.seed


# ------------------------------------------------------------------------------------------- claims


def test_claim_is_exclusive(tmp_path):
    store = ResultsStore(tmp_path)
    first = store.claim("r1")
    assert first is not None
    assert store.claim("r1") is None  # this process is alive: not stale
    store.release(first)
    second = store.claim("r1")
    assert second is not None and second.token != first.token


def test_claim_of_a_dead_process_is_stale(tmp_path):
    store = ResultsStore(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    lock = store.record_dir("r1") / "claim.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"token": "old", "host": store.host, "pid": dead_pid, "time": 0, "job_id": None}))
    assert store.claim_stale("r1") is True
    claim = store.claim("r1")
    assert claim is not None and json.loads(lock.read_text())["token"] == claim.token


def test_claim_on_another_host_goes_stale_without_heartbeat(tmp_path):
    clock = Clock()
    holder = ResultsStore(tmp_path, clock=clock, host="node1", stale_after_s=600)
    other = ResultsStore(tmp_path, clock=clock, host="node2", stale_after_s=600)
    claim = holder.claim("r1")
    os.utime(claim.path, (clock.t, clock.t))
    clock.t += 300
    assert other.claim("r1") is None
    assert holder.heartbeat(claim)
    clock.t += 500
    assert other.claim("r1") is None  # heartbeat 500 s ago
    clock.t += 200
    taken = other.claim("r1")
    assert taken is not None
    assert not holder.heartbeat(claim)  # the old holder learns it lost it


def test_requeued_job_takes_over_its_own_claim(tmp_path):
    first = ResultsStore(tmp_path, host="node1")
    second = ResultsStore(tmp_path, host="node2")
    assert first.claim("r1", job_id="77") is not None
    assert second.claim("r1", job_id="78") is None
    assert second.claim("r1", job_id="77") is not None


def test_two_submissions_claim_a_run_once(tmp_path, experiment):
    """Many processes race to submit the same rows: each row is claimed by exactly one."""
    script = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(ROOT)!r})
        from harness.grid import load_experiment, expand
        from harness.store import ResultsStore
        store = ResultsStore({str(tmp_path / "results")!r})
        won = []
        for spec in expand(load_experiment({experiment.path!r}, smoke=True)):
            claim = store.claim_for_submit(spec)
            if claim is not None:
                store.mark_queued(spec.run_id, job_id=str(__import__('os').getpid()))
                store.release(claim)
                won.append(spec.run_id)
        print(json.dumps(won))
        """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    won = [json.loads(p.communicate()[0]) for p in procs]
    all_won = [r for w in won for r in w]
    assert sorted(all_won) == sorted(s.run_id for s in expand(experiment))


# --------------------------------------------------------------------------------------------- plan


def test_decide_rules():
    done = Status("done")
    assert decide(None) == ("new", "run", "")
    assert decide(None, claim_stale=False)[:2] == ("claimed", "skip")
    assert decide(done)[:2] == ("done", "skip")
    assert decide(done, metrics_error="metrics.json: truncated")[:2] == ("corrupt", "run")
    assert decide(Status("failed", reason="OOM")) == ("failed", "run", "OOM")
    assert decide(Status("queued", job_ids=("5",)))[:2] == ("queued", "skip")
    assert decide(Status("queued", job_ids=("5",)), job_alive=False)[:2] == ("stale", "run")
    assert decide(Status("running"), claim_stale=False)[:2] == ("running", "skip")
    assert decide(Status("running"), claim_stale=True)[:2] == ("stale", "run")
    assert decide(Status("running"), status_age_s=10)[:2] == ("running", "skip")
    assert decide(Status("running"), status_age_s=10**6)[:2] == ("stale", "run")
    assert decide(None, status_error="status.json: corrupt")[:2] == ("corrupt", "run")


def test_plan_skips_done_and_reruns_failed(tmp_path, experiment):
    store = ResultsStore(tmp_path)
    a, b, c = expand(experiment)
    store.write_metrics(a.run_id, {"epochs_trained": 1})
    store.mark_done(a.run_id)
    # trained, but nothing to evaluate: the plan says so instead of queueing a job that would fail
    entry = store.plan([a])[0]
    assert (entry.state, entry.action, entry.kind) == ("no checkpoint", "skip", "evaluate")
    assert "checkpoint.pth is not there" in entry.reason
    (store.record_dir(a.run_id) / "checkpoint.pth").write_bytes(b"weights")
    assert (store.plan([a])[0].state, store.plan([a])[0].kind) == ("new", "evaluate")  # trained only
    store.write_metrics(a.eval_key, {"AP": 1.0})
    store.mark_done(a.eval_key)
    assert (store.plan([a])[0].state, store.plan([a])[0].kind) == ("new", "measure")  # not measured yet
    store.write_metrics(a.measure_key, {"params": 10})
    store.mark_done(a.measure_key)
    store.mark_failed(b.run_id, "killed")
    plan = {e.spec.label: e for e in store.plan([a, b, c])}
    assert (plan["a"].state, plan["a"].action) == ("done", "skip")
    assert (plan["b"].state, plan["b"].action, plan["b"].reason) == ("failed", "run", "killed")
    assert (plan["c"].state, plan["c"].action) == ("new", "run")
    (store.record_dir(a.run_id) / "metrics.json").write_text('{"AP": 1.')
    entry = store.plan([a])[0]
    assert entry.state == "corrupt" and entry.action == "run" and "metrics.json" in entry.reason


def test_plan_asks_the_scheduler_about_queued_jobs(tmp_path, experiment):
    store = ResultsStore(tmp_path)
    a = expand(experiment)[0]
    store.mark_queued(a.run_id, job_id="42")
    assert store.plan([a])[0].state == "queued"
    assert store.plan([a], job_alive=lambda job: job != "42")[0].state == "stale"
    assert store.plan([a], job_alive=lambda job: None)[0].state == "queued"


def test_a_failed_record_whose_job_has_not_ended_is_left_to_it(tmp_path, experiment):
    """A two-node job that lost a node: rank 0 marks the record failed about a minute before SLURM requeues the
    job. Until the job has ended, a submission and ``--rerun`` leave the record alone (no second job trains the
    same folder); once it has, the record runs again."""
    store = ResultsStore(tmp_path)
    a = expand(experiment)[0]
    store.mark_queued(a.run_id, job_id="42")
    store.mark_failed(a.run_id, "rank 1 of 2 on nodeb reported nothing")
    entry = store.plan([a], job_alive=lambda job: job == "42")[0]
    assert (entry.state, entry.action) == ("failed", "skip"), entry
    assert entry.reason.startswith("rank 1 of 2 on nodeb reported nothing; its job 42 has not ended"), entry.reason
    assert rerun_removals(store, [entry]) == []
    entry = store.plan([a], job_alive=lambda job: False)[0]
    assert (entry.state, entry.action, entry.reason) == ("failed", "run", "rank 1 of 2 on nodeb reported nothing")
    assert [e for e, _ in rerun_removals(store, [entry])] == [entry]
    assert store.plan([a])[0].action == "run"  # the scheduler not asked: as before


def test_results_root_must_be_writable(tmp_path):
    ResultsStore(tmp_path / "new" / "results").check_writable(min_free_gb=0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ResultsError, match="not writable"):
        ResultsStore(blocker / "results").check_writable(min_free_gb=0)
    with pytest.raises(ResultsError, match="GiB free"):
        ResultsStore(tmp_path).check_writable(min_free_gb=1e12)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_results_root(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ResultsError, match="not writable"):
            ResultsStore(tmp_path).check_writable(min_free_gb=0)
    finally:
        tmp_path.chmod(0o700)


def _trained_evaluated_measured(store, spec, training: dict, evaluation: dict, measurement: dict) -> None:
    """A row whose three records are done, as a training job leaves them (with a stand-in checkpoint)."""
    store.prepare(spec)
    (store.record_dir(spec.run_id) / "checkpoint.pth").write_bytes(b"weights")
    for key, metrics in ((spec.eval_key, evaluation), (spec.measure_key, measurement), (spec.run_id, training)):
        store.prepare(spec, key)
        store.complete(key, {"checkpoint_sha256": "c0ffee", **metrics})


def test_a_retrain_outdates_the_evaluations_of_the_old_checkpoint(tmp_path, experiment):
    store = ResultsStore(tmp_path)
    a = expand(experiment)[0]
    _trained_evaluated_measured(store, a, {}, {"AP": 1.0}, {"params": 10})
    assert store.plan([a])[0].state == "done"
    store.complete(a.run_id, {"checkpoint_sha256": "beef"})  # trained again: another checkpoint
    entry = store.plan([a])[0]
    assert (entry.state, entry.action, entry.kind) == ("outdated", "run", "evaluate")
    (store.record_dir(a.run_id) / "checkpoint.pth").unlink()
    assert store.plan([a])[0].state == "no checkpoint"


def test_a_changed_default_is_named_not_taken_as_done(tmp_path, experiment):
    import dataclasses

    import yaml

    store = ResultsStore(tmp_path)
    a = expand(experiment)[0]
    _trained_evaluated_measured(store, a, {}, {"AP": 1.0}, {"params": 10})
    # the run's config.yaml says it trained with another learning rate than today's resolution gives
    path = store.record_dir(a.run_id) / "config.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["config"]["train"]["lr"] = 0.0005
    path.write_text(yaml.safe_dump(doc))
    entry = store.plan([a])[0]
    assert (entry.state, entry.action) == ("changed", "skip")
    assert "train.lr 0.0005 then, " in entry.reason and "--rerun" in entry.reason
    # a field that changes no number (the data loader's workers) is not a change of the run
    doc["config"]["train"]["lr"] = a.config.train.lr
    doc["config"]["data"]["num_workers"] = a.config.data.num_workers + 3
    path.write_text(yaml.safe_dump(doc))
    assert store.plan([a])[0].state == "done"
    # an unreadable config.yaml marks that run corrupt; the other rows plan as usual
    path.write_text("config: [unclosed")
    b = dataclasses.replace(expand(experiment)[1])
    entries = store.plan([a, b])
    assert entries[0].state == "corrupt" and "config.yaml" in entries[0].reason
    assert entries[1].state == "new"
    store.prepare(a)  # the next submission writes it again
    assert store.read_config(a.run_id)["config"]["train"]["lr"] == a.config.train.lr


def test_rerun_deletes_only_the_rows_own_records(tmp_path, experiment):
    import dataclasses

    store = ResultsStore(tmp_path)
    a = expand(experiment)[0]
    other = dataclasses.replace(a, label="other row", eval_id="other", measure_id="other")  # same training
    _trained_evaluated_measured(store, a, {}, {"AP": 1.0}, {"params": 10})
    _trained_evaluated_measured(store, other, {}, {"AP": 2.0}, {"params": 10})
    paths = store.rerun_paths(a)
    names = {str(p.relative_to(store.record_dir(a.run_id))) for p in paths}
    assert {"checkpoint.pth", "status.json", "metrics.json", "config.yaml"} <= names
    assert f"evaluations/{a.eval_id}" in names and f"measurements/{a.measure_id}" in names
    assert not any("other" in n for n in names)
    store.remove(paths)
    assert store.read_metrics(other.eval_key)["AP"] == 2.0  # another row's evaluation stays
    assert store.plan([a])[0].state == "new"


def test_dry_run_plan(tmp_path):
    exp = load_experiment(ROOT / "experiments" / "table1.yaml", check_data=False)
    store = ResultsStore(tmp_path)
    spec = [s for s in expand(exp) if s.label == "Deformable DETR"][0]
    _trained_evaluated_measured(store, spec, {"epochs_trained": 50}, {"AP": 43.0}, {"params": 40069665})
    text = dry_run_plan(exp, store)
    assert "8 run(s)" in text
    for s in expand(exp):
        assert s.run_id in text and s.label in text
    line = [text for text in text.splitlines() if spec.run_id in text][0]
    assert "done" in line and "skip" in line and "2x8 GPU" in line and "325" in line
    assert "one more seed for every row (train.seed: [...] on the rows, for mean and spread): +11770 GPU-hours" in text
    total = [text for text in text.splitlines() if text.startswith("estimated GPU-hours")][0]
    assert "11770 in total" in total and "11445 to spend now" in total
    smoke = dry_run_plan(load_experiment(ROOT / "experiments" / "table2.yaml", smoke=True))
    assert "CPU process" in smoke and "0 in total" in smoke


def test_gpu_hours_sum_every_attempt(tmp_path):
    """A run pre-empted after 2 h on 8 GPUs and requeued for 1 h more cost 24 GPU-hours, not the last 8."""
    now = [1000.0]
    store = ResultsStore(tmp_path, clock=lambda: now[0])
    store.record_attempt("r", "1", started=1000.0, gpus=8)
    now[0] += 2 * 3600  # heartbeats until the pre-emption
    store.record_attempt("r", "1", started=1000.0, gpus=8)
    restart = now[0] + 600  # queued again for 10 minutes: not counted
    now[0] = restart + 3600
    store.record_attempt("r", "2", started=restart, gpus=8)
    assert store.gpu_hours("r") == pytest.approx(24.0)
    assert ResultsStore(tmp_path / "elsewhere").gpu_hours("r") == 0.0


def test_rows_that_differ_only_in_evaluation_share_one_training(tmp_path):
    """Table 3's TTA row evaluates the DCN row's training, and its ResNet-50 row (test-dev) Table 1's
    two-stage training: no second training, and once the training is done, an evaluation only."""
    table1 = expand(load_experiment(ROOT / "experiments" / "table1.yaml", check_data=False))
    table3 = expand(load_experiment(ROOT / "experiments" / "table3.yaml", check_data=False))
    by_label = {s.label: s for s in table1 + table3}
    dcn, tta = by_label["Deformable DETR, ResNeXt-101 + DCN"], by_label["Deformable DETR, ResNeXt-101 + DCN, TTA"]
    two_stage, test_dev = by_label["++ two-stage Deformable DETR"], by_label["Deformable DETR, ResNet-50"]
    assert dcn.run_id == tta.run_id and dcn.eval_id != tta.eval_id
    assert two_stage.run_id == test_dev.run_id and two_stage.eval_id != test_dev.eval_id
    store = ResultsStore(tmp_path)
    _trained_evaluated_measured(store, dcn, {"epochs_trained": 50}, {"AP": 50.1}, {"params": 112_000_000})
    plan = {e.spec.label: e for e in store.plan([dcn, tta])}
    assert (plan[dcn.label].state, plan[dcn.label].action) == ("done", "skip")
    assert (plan[tta.label].state, plan[tta.label].action, plan[tta.label].kind) == ("new", "run", "evaluate")
    text = dry_run_plan(load_experiment(ROOT / "experiments" / "table3.yaml", check_data=False), store)
    line = [text for text in text.splitlines() if tta.eval_key in text][0]
    assert "evaluate only" in line and line.rstrip().endswith(" 0.6")  # 0.2 GPU-h x 3 with TTA
    # changing an evaluation setting of a done row keeps its training
    import dataclasses

    more = dataclasses.replace(dcn.config, eval=dataclasses.replace(dcn.config.eval, num_detections=300))
    assert run_id(more) == dcn.run_id and eval_id(more) != dcn.eval_id
    # and a measurement setting measures again: no training, no evaluation
    faster = dataclasses.replace(
        dcn.config, benchmark=dataclasses.replace(dcn.config.benchmark, fps_batch_sizes=(1, 8))
    )
    assert run_id(faster) == dcn.run_id and eval_id(faster) == dcn.eval_id and measure_id(faster) != dcn.measure_id
    respec = dataclasses.replace(dcn, config=faster, measure_id=measure_id(faster))
    entry = store.plan([respec])[0]
    assert (entry.state, entry.action, entry.kind, entry.key) == ("new", "run", "measure", respec.measure_key)


def test_test_dev_detections_are_zipped_for_the_evaluation_server(tmp_path):
    from harness.run.job import server_submission

    detections = tmp_path / "detections_test-dev2017.json"
    detections.write_text('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]')
    zipped = server_submission(detections, tmp_path, "table_3")
    assert zipped.name == "detections_test-dev2017_table3_results.zip"
    import zipfile

    with zipfile.ZipFile(zipped) as archive:
        assert archive.namelist() == ["detections_test-dev2017_table3_results.json"]
        assert archive.read(archive.namelist()[0]) == detections.read_bytes()
    assert server_submission(tmp_path / "missing.json", tmp_path, "t") is None
