"""Multi-node launching on a real two-node SLURM (tests/conftest_slurm.py: ``nodea`` and ``nodeb``, two slurmd on
this host, node names that do not resolve), through run_experiment.py (cli.main), one task per node, gloo on CPU.

* a smoke row with ``launcher.nodes=2`` trains, evaluates and lands in the report; its final weights equal
  the same row's on one node with two tasks (the rendezvous found rank 0's node through SLURM's NodeAddr);
* one rank raising mid-training: the job fails promptly and ``--status`` names that rank, its node and its
  error (not rank 0's consequent "connection closed");
* two two-node jobs at once get different rendezvous ports.
"""
from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

from harness import cli, launch  # noqa: E402
from harness.grid import expand, load_experiment  # noqa: E402
from harness.store import ResultsStore  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny_experiment.yaml"
TWO_NODES = ["launcher.nodes=2", "launcher.tasks_per_node=1", "train.batch_size_per_gpu=2"]
ONE_NODE = ["launcher.nodes=1", "launcher.tasks_per_node=2", "train.batch_size_per_gpu=2"]


def _argv(root: Path, *extra: str):
    return [str(TINY), "--results", str(root / "results"), "--reports", str(root / "reports"), "--rows", "K=2",
            "--executor", "slurm", *extra]


def _final_weights(run_dir: Path):
    return torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]


@pytest.fixture
def bounded(monkeypatch):
    """Short limits for the jobs (sbatch passes the environment on): a rendezvous or a collective that cannot
    complete fails in a minute, not in half an hour."""
    monkeypatch.setenv("HARNESS_RENDEZVOUS_TIMEOUT_S", "120")
    monkeypatch.setenv("HARNESS_COLLECTIVE_TIMEOUT_S", "90")


def test_node_names_do_not_resolve(slurm_two_nodes):
    assert slurm_two_nodes.nodes == ("nodea", "nodeb")
    for node in slurm_two_nodes.nodes:
        with pytest.raises(OSError):
            socket.getaddrinfo(node, None)
        assert "NodeAddr=127.0.0.1" in slurm_two_nodes.scontrol("-o", "show", "node", node)


def test_two_nodes_train_evaluate_report_and_equal_one_node(slurm_two_nodes, bounded, tmp_path, capsys):
    spec = expand(load_experiment(str(TINY), rows=["K=2"], overrides=TWO_NODES))[0]
    assert spec.run_id == expand(load_experiment(str(TINY), rows=["K=2"], overrides=ONE_NODE))[0].run_id

    dry = cli.main(_argv(tmp_path / "two", "--dry-run", *TWO_NODES))
    shown = capsys.readouterr().out
    assert dry == 0 and "2 node(s) x 1 task(s) = 2 rank(s)" in shown and "#SBATCH --nodes=2" in shown, shown

    start = time.monotonic()
    rc = cli.main(_argv(tmp_path / "two", "--wait", *TWO_NODES))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert time.monotonic() - start < 600
    two = ResultsStore(tmp_path / "two" / "results")
    assert two.read_metrics(spec.run_id)["world_size"] == 2
    assert two.read_status(spec.eval_key).state == "done" and "AP" in two.read_metrics(spec.eval_key)
    # one task on each node: the tasks' logs name both nodes, and rank 1 met rank 0 at nodea's NodeAddr
    job_id = two.read_status(spec.run_id).job_ids[-1]
    log_dir = two.root / "tiny" / ".submitit"
    assert launch.log_paths(log_dir, job_id, task=1)[0].is_file()
    assert cli.main(_argv(tmp_path / "two", "--report")) == 0
    report = (tmp_path / "two" / "reports" / "tiny.md").read_text()
    assert f"{two.read_metrics(spec.eval_key)['AP']:.1f}" in report

    # the same row on one node with two tasks (the same cluster, one node's two CPUs)
    rc = cli.main(_argv(tmp_path / "one", "--wait", *ONE_NODE))
    assert rc == 0, capsys.readouterr().out
    one = ResultsStore(tmp_path / "one" / "results")
    assert one.read_metrics(spec.run_id)["world_size"] == 2
    weights_two, weights_one = _final_weights(two.record_dir(spec.run_id)), _final_weights(one.record_dir(spec.run_id))
    assert weights_two.keys() == weights_one.keys()
    for k in weights_two:
        assert torch.equal(weights_two[k], weights_one[k]), k
    assert two.read_metrics(spec.eval_key)["AP"] == one.read_metrics(spec.eval_key)["AP"]


# rank 1 raises at its 4th collective of the engine (mid-training): a hook the jobs load at start-up
FAILING_RANK_HOOK = textwrap.dedent('''
    import os
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and os.environ.get("SLURM_PROCID") == "1" \\
            and os.environ.get("HARNESS_TEST_FAIL_RANK") == "1":
        from harness.run import distributed as _d
        _calls = [0]

        def _failing(original):
            def wrapped(*args, **kwargs):
                _calls[0] += 1
                if _calls[0] >= 4:
                    raise ValueError("injected failure on rank 1")
                return original(*args, **kwargs)
            return wrapped

        _d.reduce_mean = _failing(_d.reduce_mean)
        _d.reduce_sum_tensor = _failing(_d.reduce_sum_tensor)
''')


def test_one_rank_raising_fails_the_job_promptly_with_its_error(slurm_two_nodes, bounded, tmp_path, monkeypatch,
                                                                 capsys):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAILING_RANK_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HARNESS_TEST_FAIL_RANK", "1")
    spec = expand(load_experiment(str(TINY), rows=["K=2"], overrides=TWO_NODES))[0]

    start = time.monotonic()
    rc = cli.main(_argv(tmp_path, "--wait", *TWO_NODES))
    took = time.monotonic() - start
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAILED 'K=2'" in out
    assert took < 300, f"the failed job took {took:.0f} s to end"       # not the collective timeout's hang
    store = ResultsStore(tmp_path / "results")
    assert store.read_status(spec.run_id).state == "failed"

    assert cli.main(_argv(tmp_path, "--status")) == 0
    status = capsys.readouterr().out
    assert "rank 1 of 2 on node" in status and "ValueError: injected failure on rank 1" in status, status


def test_two_two_node_jobs_at_once_use_different_ports(slurm_two_nodes, tmp_path):
    """Two jobs on the same two nodes (one CPU of each per job): each meets at its own port, both succeed."""
    from harness.config import LauncherConfig
    from harness.launch.check import expected_state, toy_train

    cfg = LauncherConfig(nodes=2, tasks_per_node=1, gpus_per_node=0, cpus_per_task=1, timeout_min=10)
    specs = [{"out_dir": str(tmp_path / f"run{i}"), "epochs": 3, "seed": i, "sleep_s": 1.0} for i in range(2)]
    jobs = launch.submit(specs, toy_train, cfg, tmp_path / "logs", executor="slurm", job_name="test-ports")
    try:
        outcomes = launch.wait(jobs, timeout_s=300, poll_s=0.5)
    except BaseException:
        slurm_two_nodes.cancel_all([j.job_id for j in jobs])
        raise
    for spec, (status, value) in zip(specs, outcomes):
        assert status == "success", value
        assert value["world_size"] == 2
        assert value["state"] == pytest.approx(expected_state(spec["seed"], 3, 2), abs=1e-12)
    # one array of two tasks, each its own SLURM job id, hence its own port; rank 0 on nodea, met at its NodeAddr
    results = [job.results() for job in jobs]
    masters = {r[0]["master"] for r in results}
    assert len(masters) == 2 and all(m.startswith("127.0.0.1:") for m in masters), masters
    assert all(sorted(t["node"] for t in r) == ["nodea", "nodeb"] for r in results), results
