"""Multi-node launching on a real two-node SLURM (tests/conftest_slurm.py: ``nodea`` and ``nodeb``, two slurmd on
this host, node names that do not resolve), through run_experiment.py (cli.main), one task per node, gloo on CPU.

* a smoke row with ``launcher.nodes=2`` trains, evaluates and lands in the report; its final weights equal
  the same row's on one node with two tasks (the rendezvous found rank 0's node through SLURM's NodeAddr);
* ``scontrol requeue`` in the middle of an epoch: the requeued job resumes at the iteration, final weights equal;
* a node lost at a random iteration (its slurmd killed, the job's processes there frozen): the job ends within
  ``launcher.collective_timeout_min`` with the reason in ``--status``, SLURM requeues it, and once the node is
  back it resumes from the last checkpoint to the same final weights;
* a rank that never starts the rendezvous: rank 0 fails within ``launcher.rendezvous_timeout_min``, naming the
  address and port;
* one rank raising mid-training: the job fails promptly and ``--status`` names that rank, its node and its
  error (not rank 0's consequent "connection closed");
* two two-node jobs at once get different rendezvous ports.

The time limits' precedence (the launcher's setting, a shell's variable over it) and a rendezvous failing in
its bound are also checked in-process, without SLURM.
"""

from __future__ import annotations

import os
import random
import re
import socket
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")
torch = pytest.importorskip("torch")

from harness import cli, launch  # noqa: E402
from harness.grid import expand, load_experiment  # noqa: E402
from harness.launch.slurm import rank_errors  # noqa: E402
from harness.run import distributed  # noqa: E402
from harness.store import ResultsStore  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny_experiment.yaml"
TWO_NODES = ["launcher.nodes=2", "launcher.tasks_per_node=1", "train.batch_size_per_gpu=2"]
ONE_NODE = ["launcher.nodes=1", "launcher.tasks_per_node=2", "train.batch_size_per_gpu=2"]
# the interrupted runs: 32 training images, 8 iterations per epoch on each of the two ranks, so that a stop
# asked for at one iteration lands inside the epoch
LONGER_IMAGES, LONGER_ITERS = 32, 8


def _on_two_nodes(test):
    """A test that runs jobs on the two-node SLURM (minutes)."""
    return pytest.mark.slurm(pytest.mark.slow(test))


def _argv(root: Path, *extra: str, experiment: Path = TINY):
    return [
        str(experiment),
        "--results",
        str(root / "results"),
        "--reports",
        str(root / "reports"),
        "--rows",
        "K=2",
        "--executor",
        "slurm",
        *extra,
    ]


def _final_weights(run_dir: Path):
    return torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _submitted(root: Path, spec, experiment: Path, *overrides: str):
    """Submit the row through run_experiment.py without waiting: (its store, SLURM job id, rank 0's stdout)."""
    assert cli.main(_argv(root, *overrides, experiment=experiment)) == 0
    store = ResultsStore(root / "results")
    job_id = store.read_status(spec.run_id).job_ids[-1]
    return store, job_id, launch.log_paths(store.root / "tiny" / ".submitit", job_id)[0]


def _state(store: ResultsStore, key: str) -> str:
    status = store.read_status(key)
    return status.state if status is not None else "none"


def _wait_until_done(cluster, store: ResultsStore, spec, timeout_s: float) -> None:
    """Until the row's training, evaluation and measurement are done; one failing in a later attempt than those
    it had when the wait began fails the test at once (a record failed before stays so until it runs again)."""
    keys = (spec.run_id, spec.eval_key, spec.measure_key)
    attempts = {key: getattr(store.read_status(key), "attempts", 0) for key in keys}

    def done() -> bool:
        for key in keys:
            status = store.read_status(key)
            assert not (status and status.state == "failed" and status.attempts > attempts[key]), status
        return all(_state(store, key) == "done" for key in keys)

    cluster.wait_for(done, timeout_s, f"{spec.run_id} and its records to be done", poll_s=1)


@pytest.fixture
def bounded(monkeypatch):
    """Short limits for the jobs (sbatch passes the environment on): a rendezvous or a collective that cannot
    complete fails in a minute, not in half an hour."""
    monkeypatch.setenv("HARNESS_RENDEZVOUS_TIMEOUT_S", "120")
    monkeypatch.setenv("HARNESS_COLLECTIVE_TIMEOUT_S", "90")


@_on_two_nodes
def test_node_names_do_not_resolve(slurm_two_nodes):
    assert slurm_two_nodes.nodes == ("nodea", "nodeb")
    for node in slurm_two_nodes.nodes:
        with pytest.raises(OSError):
            socket.getaddrinfo(node, None)
        assert "NodeAddr=127.0.0.1" in slurm_two_nodes.scontrol("-o", "show", "node", node)


@_on_two_nodes
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
    _assert_same_weights(_final_weights(two.record_dir(spec.run_id)), _final_weights(one.record_dir(spec.run_id)))
    assert two.read_metrics(spec.eval_key)["AP"] == one.read_metrics(spec.eval_key)["AP"]


# rank 1 raises at its 4th collective of the engine (mid-training): a hook the jobs load at start-up
FAILING_RANK_HOOK = textwrap.dedent("""
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
""")


@_on_two_nodes
def test_one_rank_raising_fails_the_job_promptly_with_its_error(
    slurm_two_nodes, bounded, tmp_path, monkeypatch, capsys
):
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
    assert took < 300, f"the failed job took {took:.0f} s to end"  # not the collective timeout's hang
    store = ResultsStore(tmp_path / "results")
    assert store.read_status(spec.run_id).state == "failed"

    assert cli.main(_argv(tmp_path, "--status")) == 0
    status = capsys.readouterr().out
    assert "rank 1 of 2 on node" in status and "ValueError: injected failure on rank 1" in status, status


@_on_two_nodes
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


# -- interrupted two-node jobs: requeued mid-epoch, a node lost --------------------------------------------------


@pytest.fixture(scope="module")
def longer(tmp_path_factory) -> Path:
    """The tiny experiment with LONGER_IMAGES training images (LONGER_ITERS iterations per epoch and rank)."""
    path = tmp_path_factory.mktemp("longer") / "tiny.yaml"
    path.write_text(TINY.read_text().replace("synthetic_train_images: 8", f"synthetic_train_images: {LONGER_IMAGES}"))
    return path


@pytest.fixture(scope="module")
def uninterrupted(_two_node_cluster, longer, tmp_path_factory) -> dict:
    """The final weights of the longer row trained on the two nodes without interruption (once per module)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURM_CONF", _two_node_cluster.conf)
        assert cli.main(_argv(root, "--wait", *TWO_NODES, experiment=longer)) == 0
    spec = expand(load_experiment(str(longer), rows=["K=2"], overrides=TWO_NODES))[0]
    return _final_weights(ResultsStore(root / "results").record_dir(spec.run_id))


@_on_two_nodes
def test_two_node_requeue_mid_epoch_resumes_at_the_iteration(slurm_two_nodes, longer, uninterrupted, tmp_path):
    """``scontrol requeue`` in the middle of an epoch: both ranks stop at the next optimiser step with a mid-epoch
    checkpoint, the requeued job resumes at that iteration, and its final weights equal the uninterrupted run's."""
    spec = expand(load_experiment(str(longer), rows=["K=2"], overrides=TWO_NODES))[0]
    store, job_id, stdout = _submitted(tmp_path, spec, longer, *TWO_NODES)
    try:
        slurm_two_nodes.wait_for(
            lambda: f"epoch 1/3 [2/{LONGER_ITERS}]" in _text(stdout), 300, "the second iteration of the second epoch"
        )
        slurm_two_nodes.requeue(job_id)
        slurm_two_nodes.start_when_requeued(job_id)
        _wait_until_done(slurm_two_nodes, store, spec, 400)
    except BaseException:
        slurm_two_nodes.cancel_all([job_id])
        raise
    assert slurm_two_nodes.restarts(job_id) >= 1
    log = _text(stdout)
    stopped = re.search(r"stopped at epoch 1, iteration (\d+): checkpoint saved", log)
    resumed = re.search(r"resumed from \S+ at epoch 1, iteration (\d+)", log)
    assert stopped and resumed, log[-3000:]
    assert resumed.group(1) == stopped.group(1) and 2 <= int(resumed.group(1)) < LONGER_ITERS  # mid-epoch
    assert store.read_status(spec.run_id).attempts >= 2
    assert [r["epoch"] for r in store.read_log(spec.run_id)] == [0, 1, 2]  # the stopped epoch logged once
    _assert_same_weights(_final_weights(store.record_dir(spec.run_id)), uninterrupted)


def _loss_moment(rng: random.Random):
    """(epoch, iteration, delay in s): a random iteration after the first epoch's checkpoint and before the last
    two of the training (after which rank 0 works on alone), and a random delay after its progress line."""
    moments = [
        (epoch, it) for epoch in (1, 2) for it in range(1, LONGER_ITERS + 1) if (epoch, it) < (2, LONGER_ITERS - 1)
    ]
    epoch, it = rng.choice(moments)
    return epoch, it, rng.uniform(0.0, 1.0)


COLLECTIVE_TIMEOUT_S = 30


@_on_two_nodes
@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_lost_node_ends_the_job_with_its_reason_then_it_resumes(
    how, slurm_two_nodes, longer, uninterrupted, tmp_path, monkeypatch, capsys
):
    """nodeb lost at a random iteration, its slurmd killed and the job's processes there ``frozen`` (no peer sees
    a connection close: rank 0's next collective times out after ``launcher.collective_timeout_min``) or
    ``killed`` (rank 0 fails at once): the record is failed with the reason and ``--status`` names the silent rank
    and its node; SLURM, hearing nothing from nodeb, sets it down and requeues the job, which resumes from the
    last checkpoint once the node is back and ends with the uninterrupted run's weights.
    ``HARNESS_TEST_SEED`` replays a moment."""
    seed = int(os.environ.get("HARNESS_TEST_SEED") or time.time_ns() % 2**32)
    epoch, it, delay = _loss_moment(random.Random(seed))
    moment = f"{delay:.2f} s after 'epoch {epoch}/3 [{it}/{LONGER_ITERS}]' (HARNESS_TEST_SEED={seed})"
    monkeypatch.delenv(distributed.COLLECTIVE_TIMEOUT_ENV, raising=False)  # the launcher's setting is the limit
    overrides = [*TWO_NODES, f"launcher.collective_timeout_min={COLLECTIVE_TIMEOUT_S / 60:g}"]
    spec = expand(load_experiment(str(longer), rows=["K=2"], overrides=overrides))[0]
    store, job_id, stdout = _submitted(tmp_path, spec, longer, *overrides)
    try:
        slurm_two_nodes.wait_for(
            lambda: f"epoch {epoch}/3 [{it}/{LONGER_ITERS}]" in _text(stdout), 300, f"iteration {it} of epoch {epoch}"
        )
        time.sleep(delay)
        slurm_two_nodes.lose_node("nodeb", job_id, how)
        lost_at = time.monotonic()
        slurm_two_nodes.wait_for(
            lambda: _state(store, spec.run_id) == "failed", COLLECTIVE_TIMEOUT_S + 60, "the job to fail with a reason"
        )
        took = time.monotonic() - lost_at
        last = torch.load(store.record_dir(spec.run_id) / "checkpoint.pth", map_location="cpu", weights_only=False)
        capsys.readouterr()
        assert cli.main(_argv(tmp_path, "--status", *overrides, experiment=longer)) == 0
        status = capsys.readouterr().out

        # SLURM hears nothing from nodeb for SlurmdTimeout (60 s here): it sets the node down, requeues the job
        slurm_two_nodes.wait_for(lambda: slurm_two_nodes.restarts(job_id) >= 1, 240, "SLURM to requeue the job")
        slurm_two_nodes.restore_node("nodeb")
        slurm_two_nodes.start_when_requeued(job_id)
        _wait_until_done(slurm_two_nodes, store, spec, 400)
    except BaseException:
        slurm_two_nodes.cancel_all([job_id])
        raise
    reason = next((line for line in status.splitlines() if line.startswith("failed (1): ")), status)
    print(f"nodeb {how} {moment}; the record failed {took:.1f} s later: {reason}; resumed after epoch {last['epoch']}")
    assert "rank 1 of 2 on nodeb reported neither a result nor an error" in reason, status
    assert "has not ended (SLURM may requeue it)" in reason, status  # a submission then would not run it twice
    assert "(rank 0: " not in reason, status  # rank 0's note is the record's reason: said once
    if how == "frozen":
        # (rank 0 may have been waiting for rank 1 already: its collective started up to an iteration earlier)
        assert COLLECTIVE_TIMEOUT_S - 5 <= took < COLLECTIVE_TIMEOUT_S + 20, took
        # gloo's words for its timeout: the pending operation's own, or, when another operation's timeout closed
        # the connection first, "Application timeout caused pair closure"
        timed_out = (f"Timed out waiting {COLLECTIVE_TIMEOUT_S * 1000}ms", "Application timeout caused pair closure")
        assert any(words in reason for words in timed_out), status
    else:
        assert took < 20, took
    # the last checkpoint before the loss: the end of the epoch before, or of this one when it was being saved
    assert "partial" not in last and last["epoch"] in (epoch - 1, epoch)
    assert f"at the end of epoch {last['epoch']}" in _text(stdout).split("resumed from")[-1].splitlines()[0]
    assert store.read_status(spec.run_id).attempts >= 2
    assert [r["epoch"] for r in store.read_log(spec.run_id)] == [0, 1, 2]
    _assert_same_weights(_final_weights(store.record_dir(spec.run_id)), uninterrupted)


# -- the rendezvous --------------------------------------------------------------------------------------------

# rank 1 starts its rendezvous HARNESS_TEST_LATE_S seconds late (a node stuck before it): a hook the jobs load
LATE_RANK_HOOK = textwrap.dedent("""
    import os
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and os.environ.get("SLURM_PROCID") == "1" \\
            and os.environ.get("HARNESS_TEST_LATE_S"):
        import time
        from harness.run import distributed as _d
        _original = _d.rendezvous_store

        def _late(*args, **kwargs):
            time.sleep(float(os.environ["HARNESS_TEST_LATE_S"]))
            return _original(*args, **kwargs)

        _d.rendezvous_store = _late
""")

RENDEZVOUS_TIMEOUT_S = 15


@_on_two_nodes
def test_a_rank_stuck_before_the_rendezvous_fails_the_job_in_its_bound(slurm_two_nodes, tmp_path, monkeypatch, capsys):
    """Rank 1 is stuck for good before its rendezvous (an hour): rank 0 fails after
    ``launcher.rendezvous_timeout_min`` naming the address and port it served, the record is failed, ``--status``
    names the silent rank, and rank 0 ends the job: it does not hold the nodes until the wall time."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(LATE_RANK_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HARNESS_TEST_LATE_S", "3600")
    monkeypatch.delenv(distributed.RENDEZVOUS_TIMEOUT_ENV, raising=False)
    overrides = [*TWO_NODES, f"launcher.rendezvous_timeout_min={RENDEZVOUS_TIMEOUT_S / 60:g}"]
    spec = expand(load_experiment(str(TINY), rows=["K=2"], overrides=overrides))[0]
    store, job_id, _ = _submitted(tmp_path, spec, TINY, *overrides)
    address = f"127.0.0.1:{launch.master_port_for(job_id)}"
    try:
        slurm_two_nodes.wait_for(lambda: _state(store, spec.run_id) == "failed", 120, "rank 0 to give up")
        failed_at = time.monotonic()
        reason = store.read_status(spec.run_id).reason
        capsys.readouterr()
        assert cli.main(_argv(tmp_path, "--status", *overrides)) == 0
        status = capsys.readouterr().out
        # KillWait is 5 s on the test cluster: rank 1 is killed that long after rank 0's scancel
        slurm_two_nodes.wait_for(
            lambda: (slurm_two_nodes.state(job_id) or "CANCELLED").split()[0] not in launch.ALIVE_STATES,
            45,
            "the job to end",
        )
        ended_after = time.monotonic() - failed_at
    except BaseException:
        slurm_two_nodes.cancel_all([job_id])
        raise
    waited = re.search(
        rf"served the rendezvous at {re.escape(address)} but not all 2 ranks reached it within "
        rf"(\d+) s",
        reason,
    )
    assert waited and RENDEZVOUS_TIMEOUT_S <= int(waited.group(1)) < RENDEZVOUS_TIMEOUT_S + 5, reason
    assert f"the limit is launcher.rendezvous_timeout_min={RENDEZVOUS_TIMEOUT_S / 60:g}" in reason, reason
    assert "rank 1 of 2 on nodeb reported neither a result nor an error" in status and address in status, status
    assert [note["rank"] for note in rank_errors(store.root / "tiny" / ".submitit", job_id)] == [0]
    assert store.read_status(spec.run_id).state == "failed"  # the cancellation did not overwrite the reason
    print(f"the job ended {ended_after:.1f} s after rank 0 recorded the failure")


def test_time_limits_are_the_launchers_and_a_shell_variable_overrides_them(monkeypatch):
    monkeypatch.delenv(distributed.RENDEZVOUS_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(distributed.COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert distributed.rendezvous_limit() == distributed.Limit(600.0, "launcher.rendezvous_timeout_min=10")
    assert distributed.collective_limit(0.5) == distributed.Limit(30.0, "launcher.collective_timeout_min=0.5")
    monkeypatch.setenv(distributed.COLLECTIVE_TIMEOUT_ENV, "12")
    assert distributed.collective_limit(0.5) == distributed.Limit(
        12.0, "HARNESS_COLLECTIVE_TIMEOUT_S=12 (overrides launcher.collective_timeout_min)"
    )
    monkeypatch.setenv(distributed.RENDEZVOUS_TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="must be positive"):
        distributed.rendezvous_limit(1)


@pytest.mark.parametrize(
    "rank, what",
    [(0, "served the rendezvous at {} but not all 2 ranks reached it"), (1, "could not reach the rendezvous at {}")],
    ids=["rank 0 alone", "rank 1 alone"],
)
def test_a_rendezvous_that_cannot_complete_fails_in_its_bound_naming_address_and_port(rank, what):
    """Rank 0 alone serves it (nobody joins), or rank 1 alone tries to reach it (nobody serves it): both give up
    after the limit (torch's own client would take about twice as long), naming the address and the port."""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limit = distributed.Limit(3.0, "launcher.rendezvous_timeout_min=0.05")
    start = time.monotonic()
    with pytest.raises(distributed.RendezvousError) as raised:
        distributed.rendezvous_store("127.0.0.1", port, rank, 2, limit)
    assert limit.seconds <= time.monotonic() - start < limit.seconds + 2
    message = str(raised.value)
    assert what.format(f"127.0.0.1:{port}") in message, message
    assert "the limit is launcher.rendezvous_timeout_min=0.05" in message, message
