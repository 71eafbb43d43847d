"""run_experiment.py as a cluster user drives it, against a stand-in SLURM that records every call:
overrides, experiment names and row indices, --status with progress in one batched squeue, --cancel,
--logs, --dry-run's executor and checks, and a checkout without git."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_experiment import fake_coco

from harness import cli
from harness.grid import expand, load_experiment
from harness.launch import snapshot
from harness.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_experiment.yaml"


@pytest.fixture
def stand_in_slurm(tmp_path, monkeypatch):
    """sbatch/srun present; squeue lists every asked job as RUNNING; sacct, scontrol know nothing; scancel
    accepts. Each call is appended to ``calls.log`` (one line per call: the command and its arguments)."""
    bin_dir, log = tmp_path / "slurm-bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    record = f'echo "$(basename "$0") $*" >> {log}\n'
    scripts = {
        "sbatch": "exit 1\n",
        "srun": "exit 1\n",
        "sacct": "exit 0\n",
        "scontrol": "exit 0\n",
        "scancel": "exit 0\n",
        # -j ID,ID,...: print "ID RUNNING" for each
        "squeue": 'while [ $# -gt 0 ]; do if [ "$1" = -j ]; then shift; tr , "\\n" <<< "$1" | '
        'sed "s/$/ RUNNING/"; fi; shift; done\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + record + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _calls(log: Path, command: str):
    return [line for line in log.read_text().splitlines() if line.split()[0] == command] if log.exists() else []


def _argv(tmp_path, *extra, experiment=TINY):
    return [str(experiment), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), *extra]


def _many_rows(tmp_path, n_per_axis=10) -> Path:
    """An experiment of n**3 rows (axes), each a queued job in the store."""
    values = list(range(1, n_per_axis + 1))
    text = TINY.read_text().split("rows:")[0] + textwrap.dedent(f"""\
        rows: []
        axes:
          model.enc_n_points: {values}
          model.dec_n_points: {values}
          train.seed: {values}
        """)
    path = tmp_path / "many.yaml"
    path.write_text(text)
    return path


def test_overrides_rename_runs_and_are_checked(tmp_path, capsys):
    plain = expand(load_experiment(str(TINY), rows=["K=1"]))[0]
    overridden = expand(load_experiment(str(TINY), rows=["K=1"], overrides=["model.enc_n_points=3"]))[0]
    assert overridden.config.model.enc_n_points == 3 and overridden.run_id != plain.run_id
    assert cli.main(_argv(tmp_path, "model.enc_n_points=3", "--rows", "1", "--dry-run", "--executor", "local")) == 0
    out = capsys.readouterr().out
    assert overridden.run_id in out and plain.run_id not in out
    assert cli.main(_argv(tmp_path, "model.enc_n_pionts=3", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "command line: model.enc_n_pionts" in err and "did you mean 'enc_n_points'" in err
    assert cli.main(_argv(tmp_path, "train.epochs=0", "--dry-run")) == 2
    assert "command line: train.epochs: got 0" in capsys.readouterr().err


def test_experiment_by_name_and_rows_by_index(tmp_path, capsys):
    assert cli.main(["table2", "--smoke", "--rows", "2", "--results", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "single scale, K=1" in out and "MS inputs, K=4" not in out
    assert cli.main(["table9", "--dry-run"]) == 2
    assert "table1, table2, table3" in capsys.readouterr().err


def test_a_copy_that_keeps_the_name_is_refused(tmp_path, capsys):
    copy = tmp_path / "mine.yaml"
    copy.write_text((ROOT / "experiments" / "table2.yaml").read_text())
    assert cli.main([str(copy), "--status", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "table2.yaml" in err and "name of its own" in err


def test_status_asks_slurm_once_for_a_thousand_rows(stand_in_slurm, tmp_path, capsys):
    path = _many_rows(tmp_path)
    experiment = load_experiment(str(path))
    specs = expand(experiment)
    assert len(specs) == 1000
    store = ResultsStore(tmp_path / "results")
    for i, spec in enumerate(specs):
        store.mark_queued(spec.run_id, job_id=f"{5000 + i}")
    store.mark_running(specs[0].run_id, job_id="5000")
    store.append_log(specs[0].run_id, {"epoch": 0, "AP": 12.5, "epoch_time_s": 60.0})
    start = time.perf_counter()
    assert cli.main(_argv(tmp_path, "--status", experiment=path)) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert len(_calls(stand_in_slurm, "squeue")) == 1  # one batched query for 1000 jobs
    assert not _calls(stand_in_slurm, "sacct") and not _calls(stand_in_slurm, "scontrol")
    assert "1/3  AP 12.5  1.0 min/epoch  ETA 2 min" in out
    assert "5000_0_log.out" in out and out.count("queued") == 999
    print(f"--status of 1000 rows: {seconds:.2f} s")

    assert cli.main(_argv(tmp_path, "--dry-run", experiment=path)) == 0
    assert len(_calls(stand_in_slurm, "squeue")) == 2  # and one for the dry run


def test_cancel_marks_runs_and_a_later_submit_resumes_them(stand_in_slurm, tmp_path, capsys):
    experiment = load_experiment(str(TINY))
    store = ResultsStore(tmp_path / "results")
    specs = expand(experiment)
    for i, spec in enumerate(specs):
        store.mark_queued(spec.run_id, job_id=str(700 + i))
    assert cli.main(_argv(tmp_path, "--cancel", "--rows", "K=1")) == 0
    assert "cancelled 'K=1'" in capsys.readouterr().out
    assert _calls(stand_in_slurm, "scancel") == ["scancel 701"]
    states = {s.label: store.read_status(s.run_id).state for s in specs}
    assert states == {"K=2": "queued", "K=1": "cancelled"}
    entry = store.plan([specs[1]])[0]
    assert (entry.state, entry.action) == ("cancelled", "run") and "resumes" in entry.reason


def test_logs_prints_the_tail_of_a_rows_job_log(tmp_path, capsys):
    spec = expand(load_experiment(str(TINY), rows=["K=2"]))[0]
    store = ResultsStore(tmp_path / "results")
    store.mark_queued(spec.run_id, job_id="42")
    log_dir = tmp_path / "results" / "tiny" / ".submitit"
    log_dir.mkdir(parents=True)
    (log_dir / "42_0_log.out").write_text("".join(f"line {i}\n" for i in range(100)))
    assert cli.main(_argv(tmp_path, "--logs", "0")) == 0
    out = capsys.readouterr().out
    assert "line 99" in out and "line 59" not in out and "42_0_log.out" in out


def test_dry_run_checks_what_a_submission_needs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COCO_ROOT", str(fake_coco(tmp_path / "coco")))
    table1 = ROOT / "experiments" / "table1.yaml"
    assert cli.main([str(table1), "--results", str(tmp_path), "--dry-run", "--executor", "local"]) == 2
    assert "launcher.nodes=1" in capsys.readouterr().err  # local cannot run 2 nodes: says what to change
    assert (
        cli.main([str(table1), "--results", str(tmp_path), "--dry-run", "--executor", "local", "launcher.nodes=1"]) == 0
    )
    out = capsys.readouterr().out
    assert "executor local (asked for)" in out and "gpus_per_node=8" in out
    assert (
        cli.main([str(table1), "--results", str(tmp_path), "--dry-run", "launcher.gpus_per_node=0", "launcher.nodes=1"])
        == 0
    )
    assert "warning: launcher.gpus_per_node is 0: a COCO training (109 epochs)" in capsys.readouterr().out
    assert cli.main([str(table1), "--results", str(tmp_path), "--dry-run", "eval.checkpoint=/no/such.pth"]) == 2
    assert "/no/such.pth' does not exist" in capsys.readouterr().err
    assert (
        cli.main(
            [
                str(table1),
                "--results",
                str(tmp_path),
                "--dry-run",
                "--executor",
                "local",
                "launcher.nodes=1",
                "train.lr_drop=400",
            ]
        )
        == 0
    )
    assert "learning rate never drops" in capsys.readouterr().out


def test_runs_without_git(tmp_path):
    """An unpacked release archive (no .git): snapshots copy the packages, and the main command runs."""
    unpacked = tmp_path / "release"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("harness", "model", "experiments"):
        shutil.copytree(ROOT / name, unpacked / name, ignore=ignore)
    shutil.copy(ROOT / "run_experiment.py", unpacked)
    snap = snapshot.snapshot_code(tmp_path / "snapshots", repo_root=unpacked)
    assert (snap / "harness" / "cli.py").is_file() and (snap / "model" / "ops" / "csrc").is_dir()
    assert json.loads((snap / snapshot.SNAPSHOT_INFO).read_text())["commit"] is None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "run_experiment.py", "table2", "--smoke", "--dry-run"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "table2 (smoke scale" in out.stdout


def test_backbone_weights_are_fetched_at_submission(tmp_path, capsys, monkeypatch):
    """A node without network cannot get the ImageNet weights: the submission stops, naming the file, and
    nothing is queued (instead of a job that dies after hours in the queue)."""
    import model.backbone as backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(weights):
        calls.append(weights)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(backbone, "_download", offline)
    argv = _argv(tmp_path, "model.pretrained_backbone=true", "--rows", "K=1", "--executor", "local")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing submitted" in err and "resnet50-0676ba61.pth" in err and str(tmp_path / "torch") in err
    assert len(calls) == 1
    spec = expand(load_experiment(str(TINY), rows=["K=1"], overrides=["model.pretrained_backbone=true"]))[0]
    assert ResultsStore(tmp_path / "results").read_status(spec.run_id) is None


def test_import_the_evaluation_servers_scores(tmp_path, capsys):
    """A test-dev row's numbers come from the COCO server: imported into its evaluation record."""
    table3 = ROOT / "experiments" / "table3.yaml"
    row = "Deformable DETR, ResNet-50"
    scores = tmp_path / "scores.json"
    scores.write_text(
        json.dumps(
            {"AP": 0.469, "AP50": 0.662, "AP75": 0.507, "AP_small": 0.280, "AP_medium": 0.496, "AP_large": 0.610}
        )
    )
    argv = [str(table3), "--results", str(tmp_path / "results"), "--rows", row, "--scores-unit", "fraction"]
    spec = expand(load_experiment(str(table3), rows=[row], check_data=False))[0]
    store = ResultsStore(tmp_path / "results")
    for key in (spec.run_id, spec.eval_key):  # trained, and its detections written for the server
        store.prepare(spec, key)
        store.complete(key, {})
    assert cli.main(argv + ["--import-server", str(scores)]) == 0
    assert "AP 46.9 from the evaluation server" in capsys.readouterr().out
    spec = expand(load_experiment(str(table3), rows=[row], check_data=False))[0]
    record = ResultsStore(tmp_path / "results").read_metrics(spec.eval_key)
    assert record["source"] == "evaluation server" and record["APs"] == 28.0 and record["split"] == "test-dev2017"
    scores.write_text('{"AP": 46.9}')
    assert cli.main(argv + ["--import-server", str(scores)]) == 2
    assert "no number for AP50" in capsys.readouterr().err
    assert cli.main(argv[:3] + ["--reports", str(tmp_path / "reports"), "--report"]) == 0
    report = (tmp_path / "reports" / "table3.md").read_text()
    assert "46.9" in report and "AP: evaluation server" in report
