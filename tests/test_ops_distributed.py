"""impl="auto" under DDP (model/ops/distributed.py), with 2 gloo ranks on the CPU: one self-check per node, by its
leader, the other rank waiting for it; every rank uses the same implementation, also when the leader's check
times out (it is not rerun rank after rank); the waits stay below the process group's time-out.

The ranks are two processes on this machine (one node); the kernel at the head of the chain is a test kernel
whose self-check is slow (model/ops/testing.py). Each test starts the ranks, which import torch and run a check
process: about 20 s.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RANK = r"""
import json, os, sys, time, warnings
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
import model.ops as ops
from model.ops import build, distributed, implementations, ms_deform_attn, selfcheck, testing
from model.ops.testing import CASES, make_inputs

out, verdicts, chain = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
build.load("cpu")
for impl in testing.TEST_KERNELS:
    impl.verdict_dir = lambda impl=impl: verdicts / impl.name
    implementations.REGISTRY[impl.name] = impl
implementations.CHAINS["cpu"] = tuple(chain)
dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ["PG_TIMEOUT"])))
rank = dist.get_rank()
inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32)
start = time.time()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ms_deform_attn(*inputs)
seconds = time.time() - start
info = ops.implementation_info("cpu", torch.float32)
group = distributed.group()
# a first all-reduce, as DDP's: every rank arrives after the decision
dist.all_reduce(torch.ones(1))
out.joinpath(f"rank{rank}.json").write_text(json.dumps({
    "impl": info["impl"], "self_check": info["self_check"], "seconds": seconds, "leader": group.leader,
    "warnings": [str(w.message) for w in caught], "pg_timeout": group.pg_timeout,
    "wait": distributed.wait_timeout(group.pg_timeout), "check": distributed.check_timeout(group.pg_timeout)}))
dist.destroy_process_group()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, chain, **env):
    out, verdicts, marks = tmp_path / "out", tmp_path / "verdicts", tmp_path / "marks"
    for folder in (out, verdicts, marks):
        folder.mkdir(exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(2):
        rank_env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DEFORMABLE_DETR_OPS_TEST_MARKS=str(marks),
            PG_TIMEOUT="120",
            PYTHONPATH=str(REPO),
            **env,
        )
        rank_env.pop("DEFORMABLE_DETR_OPS_SELF_CHECK", None)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK, str(out), str(verdicts), ",".join(chain)],
                cwd=REPO,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    logs = [p.communicate(timeout=300) for p in processes]
    for p, (stdout, stderr) in zip(processes, logs):
        assert p.returncode == 0, stdout + stderr[-4000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    checks = {path.name.split(".")[1] for path in marks.glob("*")}  # the processes that ran the slow kernel
    return results, [stderr for _, stderr in logs], checks


def test_one_check_per_node_and_one_decision(tmp_path):
    results, stderr, checks = run_ranks(tmp_path, ["slow", "cpu", "pytorch"], DEFORMABLE_DETR_OPS_TEST_SLEEP="0.5")
    assert [r["impl"] for r in results] == ["slow", "slow"]
    assert [r["leader"] for r in results] == [True, False]
    assert len(checks) == 1  # one check process, the leader's (rank 1's own forward calls mark nothing: no sleep)
    assert "ms_deform_attn: self-check of the slow test kernel" in stderr[0]
    assert "ms_deform_attn: self-check of" not in stderr[1]
    assert "rank 1 waits for the self-check of the slow test kernel (slow) by rank 0" in stderr[1]
    assert results[1]["seconds"] > 2  # rank 1 waited for the leader's check (4 cases of 0.5 s and more)
    assert all(not r["warnings"] for r in results)
    # the waits stay below the process group's time-out (120 s here), the leader's check below the waits
    for r in results:
        assert r["pg_timeout"] == 120 and r["check"] <= 60 < r["wait"] < 120


def test_a_timed_out_check_sends_every_rank_to_the_same_fallback(tmp_path):
    """The leader's check times out (the environment, not cached): every rank falls back to the same next
    implementation at once; the check is not rerun by the other rank."""
    results, stderr, checks = run_ranks(
        tmp_path,
        ["slow", "cpu", "pytorch"],
        DEFORMABLE_DETR_OPS_TEST_SLEEP="60",
        DEFORMABLE_DETR_OPS_SELF_CHECK_TIMEOUT="8",
    )
    assert [r["impl"] for r in results] == ["cpu", "cpu"]
    assert len(checks) <= 1 and "ms_deform_attn: self-check of" not in stderr[1]
    for r in results:
        (message,) = [w for w in r["warnings"] if "slow test kernel" in w]
        assert "time-out" in message and "on rank 0 (the leader of node" in message
        assert "the same implementation runs on every rank" in message
    assert not list((tmp_path / "verdicts").rglob("*.json"))  # a time-out is not cached


class FakeStore:
    """The key-value store of a process group, for one rank's view: other ranks' results given up front."""

    def __init__(self, data):
        self.data = dict(data)

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)

    def wait(self, keys, timeout):
        if not self.check(keys):
            raise RuntimeError(f"Socket Timeout after {timeout}")


def fake_group(rank, leader, others):
    from model.ops import distributed

    group = distributed.Group.__new__(distributed.Group)
    group.rank, group.world_size, group.leader, group.leader_rank, group.node = rank, 3, leader, 0, "n"
    group.pg_timeout = 100.0
    group.store = FakeStore(others)
    return group


def test_agreement_takes_the_first_candidate_every_rank_accepts():
    """Rank 1 (not a leader) of 3: the leader of the other node refuses "cuda"; everyone accepts "triton"."""
    others = {
        "d/cuda/0": json.dumps({"reason": None, "leader": True, "node": "a"}),
        "d/cuda/2": json.dumps({"reason": "FAILED its self-check", "leader": True, "node": "b"}),
        "d/triton/0": json.dumps({"reason": None, "leader": True, "node": "a"}),
        "d/triton/2": json.dumps({"reason": None, "leader": True, "node": "b"}),
    }
    group = fake_group(1, False, others)
    checked = []
    name, passed_over = group.agree(
        "d",
        ["cuda", "triton", "pytorch"],
        leader_check=lambda n: pytest.fail("leader"),
        follower_check=lambda n: checked.append(n),
    )
    assert name == "triton" and checked == ["cuda", "triton"]
    assert passed_over == [("cuda", "on rank 2 (the leader of node b): FAILED its self-check")]


def test_a_rank_that_never_reports_is_named_after_the_wait():
    group = fake_group(0, True, {"d/cuda/1": json.dumps({"reason": None, "leader": False, "node": "a"})})
    with pytest.raises(RuntimeError, match=r"rank 0 waited 80 s for the verdict on the cuda .* missing: d/cuda/2"):
        group.agree("d", ["cuda"], leader_check=lambda n: None, follower_check=lambda n: None)
