"""Real SLURM clusters on localhost for the tests (``tests/slurm/start.sh`` / ``stop.sh``).

* ``slurm_cluster``: one node (this host's name), ``/etc/slurm/slurm.conf``, the standard ports.
* ``slurm_two_nodes``: two nodes ``nodea`` and ``nodeb`` on this one host (a slurmd each, ``-N <name>``, a
  port each, NodeAddr 127.0.0.1); their names do not resolve, as on clusters whose node names are not in
  DNS. Its config lives in its own state directory (never in /etc/slurm) and other ports, so it runs beside
  the one-node cluster; a test that takes the fixture talks to it through ``SLURM_CONF`` (set for that test
  only). It is stopped and its state and config removed at the end of the session. A test may lose a node in
  the middle of a job (``lose_node``: its slurmd killed, the job's processes there frozen or killed); the
  fixture brings it back (``restore_node``) after the test.

Tests take a fixture as an argument (tests/conftest.py lists this module in ``pytest_plugins``). Each cluster
is started once per session and stopped at the end if the session started it. Nothing is installed here
(``tools/install_system_packages.sh`` does that): the tests skip, with the reason, where SLURM is missing (and
fail under HARNESS_TESTS_REQUIRE_SYSTEM=1, as in CI) or cannot run here (not root, a real cluster's
``slurm.conf`` in place); a cluster that does not come up is a test error.

``SLURM_LOCAL_KEEP=1`` leaves the cluster running after the session (faster reruns while developing).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from conftest import missing_system_package

SLURM_DIR = Path(__file__).resolve().parent / "slurm"
START = SLURM_DIR / "start.sh"
STOP = SLURM_DIR / "stop.sh"
# exit codes of start.sh that mean "SLURM cannot run here" (skip) rather than "it broke" (error)
CANNOT_RUN = {
    3: "SLURM (slurmctld, slurmd, munge)",
    4: "a slurm.conf not written by tests/slurm/start.sh is in place (a real cluster); left alone",
}


# the two-node cluster: names that do not resolve, its own config, state, pid files and ports
TWO_NODES = ("nodea", "nodeb")
TWO_NODE_STATE = "/var/lib/slurm-local-two"
TWO_NODE_ENV = {
    "SLURM_LOCAL_NODES": " ".join(TWO_NODES),
    "SLURM_LOCAL_STATE": TWO_NODE_STATE,
    "SLURM_LOCAL_CONF": f"{TWO_NODE_STATE}/slurm.conf",
    "SLURM_LOCAL_PORT": "6917",
    "SLURM_LOCAL_CPUS": "2",
}


def _cluster_env(script_env: Optional[dict]) -> dict:
    """The environment of start.sh/stop.sh and of the clients that ask a cluster whether it is up."""
    env = dict(os.environ)
    if script_env:
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_LOCAL_")}
        env.update(script_env, SLURM_CONF=script_env["SLURM_LOCAL_CONF"])
    elif env.get("SLURM_CONF") == TWO_NODE_ENV["SLURM_LOCAL_CONF"]:
        env.pop("SLURM_CONF")
    return env


def cluster_is_up(script_env: Optional[dict] = None) -> bool:
    if shutil.which("sinfo") is None:
        return False
    if script_env and not Path(script_env["SLURM_LOCAL_CONF"]).is_file():
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10, env=_cluster_env(script_env)
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = out.stdout.split()
    wanted = len(script_env["SLURM_LOCAL_NODES"].split()) if script_env else 1
    return out.returncode == 0 and sum(s.startswith(("idle", "mixed", "alloc")) for s in states) >= wanted


@dataclasses.dataclass
class SlurmCluster:
    """Handles for tests: the node's name and a few scontrol/squeue wrappers."""

    node: str
    started_here: bool
    nodes: Tuple[str, ...] = ()
    conf: Optional[str] = None  # SLURM_CONF of a cluster whose config is not /etc/slurm/slurm.conf
    script_env: Optional[dict] = None  # the SLURM_LOCAL_* variables start.sh/stop.sh got
    lost: Dict[str, List[int]] = dataclasses.field(default_factory=dict)  # node -> its job's pids (lose_node)

    @staticmethod
    def state(job_id: str) -> Optional[str]:
        from harness.launch import slurm_job_state

        return slurm_job_state(job_id)

    @staticmethod
    def scontrol(*args: str) -> str:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def requeue(self, job_id: str) -> None:
        """``scontrol requeue``: SLURM kills the job (SIGTERM, SIGKILL after KillWait) and queues it again."""
        self.scontrol("requeue", job_id)

    def start_when_requeued(self, job_id: str, timeout_s: float = 60) -> None:
        """A requeued job waits ~2 minutes (its BeginTime) before it may start; start it now instead.

        Only once the requeue is complete: the job is PENDING as soon as it is requeued, while its old batch
        script may still be exiting (slurmctld would count that late exit status against the new instance: it
        ends FAILED at once) and while the controller is still clearing the old allocation (pending with reason
        None, before BeginTime; started then, after a node failure, its new batch script found its step refused
        on the node that came back: "Requested nodes are busy", for good). So: PENDING for its BeginTime, with no
        process of the job left. The BeginTime delay is what keeps real clusters clear of both."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (
                (self.state(job_id) or "").startswith("PENDING")
                and self.reason(job_id) == "BeginTime"
                and not self.steps_alive(job_id)
            ):
                self.scontrol("update", f"jobid={job_id}", "StartTime=now")
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"job {job_id} did not wait for its BeginTime with no process left within {timeout_s} s "
            f"(state {self.state(job_id)}, reason {self.reason(job_id)}, "
            f"{self.steps_alive(job_id)} step(s) alive)"
        )

    def reason(self, job_id: str) -> str:
        """Why a pending job waits (``scontrol show job``'s Reason: BeginTime, Resources, None...)."""
        text = self.scontrol("-o", "show", "job", job_id)
        return next((f.split("=", 1)[1] for f in text.split() if f.startswith("Reason=")), "")

    def native_id(self, job_id: str) -> str:
        """SLURM's own id of a job (an array task ``123_4`` has one of its own: ``SLURM_JOB_ID`` in its tasks)."""
        for field in self.scontrol("-o", "show", "job", job_id).split():
            if field.startswith("JobId="):
                return field.split("=", 1)[1]
        return job_id

    def steps_alive(self, job_id: str) -> int:
        """How many ``slurmstepd`` of the job still run on this host (every node of these clusters is this host)."""
        title = f"slurmstepd: [{self.native_id(job_id)}.".encode()
        alive = 0
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                alive += cmdline.read_bytes().startswith(title)
            except OSError:  # the process ended while being read
                pass
        return alive

    def restarts(self, job_id: str) -> int:
        text = self.scontrol("-o", "show", "job", job_id)
        for field in text.split():
            if field.startswith("Restarts="):
                return int(field.split("=", 1)[1])
        return 0

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(poll_s)

    @staticmethod
    def cancel_all(job_ids: List[str]) -> None:
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)

    # -- losing a node (a multi-node cluster: every node's slurmd is a process of this host) ---------------------

    def _slurmd_pid_file(self, node: str) -> Path:
        port = (self.script_env or {}).get("SLURM_LOCAL_PORT", "6817")
        return Path("/run/slurm-local" if port == "6817" else f"/run/slurm-local-{port}") / f"slurmd-{node}.pid"

    def job_processes_on(self, node: str, job_id: str) -> List[int]:
        """The job's processes on ``node``: its tasks there (``SLURMD_NODENAME`` and ``SLURM_JOB_ID`` in their
        environment, which their children inherit) and the ``slurmstepd`` above them; step daemons first."""
        wanted = {f"SLURMD_NODENAME={node}".encode(), f"SLURM_JOB_ID={self.native_id(job_id)}".encode()}
        tasks = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if wanted <= set(environ.read_bytes().split(b"\0")):
                    tasks.append(int(environ.parent.name))
            except OSError:  # the process ended, or is not ours to read
                pass
        steps = set()
        for pid in tasks:
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if Path(f"/proc/{parent}/cmdline").read_bytes().startswith(b"slurmstepd:"):
                    steps.add(parent)
            except (OSError, ValueError, IndexError):
                pass
        return sorted(steps) + sorted(set(tasks) - steps)

    def lose_node(self, node: str, job_id: str, how: str = "frozen") -> List[int]:
        """``node`` lost in the middle of ``job_id``: its slurmd is killed (the controller stops hearing from it)
        and the job's processes there are ``frozen`` (SIGSTOP: they neither answer nor close their connections,
        which is how a node that lost its power or network looks to its peers) or ``killed`` (SIGKILL: their
        connections close, and their peers fail at once). Returns their pids; :meth:`restore_node` brings the
        node back."""
        lost = self.job_processes_on(node, job_id)
        if not lost:
            raise RuntimeError(f"job {job_id} has no process on {node} to lose")
        for pid in lost:
            os.kill(pid, {"frozen": signal.SIGSTOP, "killed": signal.SIGKILL}[how])
        self.lost.setdefault(node, []).extend(lost)
        os.kill(int(self._slurmd_pid_file(node).read_text()), signal.SIGKILL)
        return lost

    def node_state(self, node: str) -> str:
        text = self.scontrol("-o", "show", "node", node)
        return next((f.split("=", 1)[1] for f in text.split() if f.startswith("State=")), "")

    def restore_node(self, node: str, timeout_s: float = 60) -> None:
        """A lost node back as after a reboot: the job's processes lost with it gone (killed if frozen), its slurmd
        started again and its state resumed; returns once the controller sees it usable (idle, mixed, allocated)."""
        lost = self.lost.pop(node, [])
        for pid in lost:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in lost), 30, f"the lost processes of {node} to end"
        )
        pid_file = self._slurmd_pid_file(node)
        alive = pid_file.is_file() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
        if not alive:
            subprocess.run(
                ["slurmd", "-f", self.conf or "/etc/slurm/slurm.conf", "-N", node],
                check=True,
                capture_output=True,
                timeout=60,
                env=_cluster_env(self.script_env),
            )

        def usable() -> bool:
            state = self.node_state(node).upper()
            if state.startswith(("DOWN", "DRAIN", "FAIL")) and "NOT_RESPONDING" not in state:
                self.scontrol("update", f"nodename={node}", "state=resume")
            return state.startswith(("IDLE", "MIXED", "ALLOCATED")) and "NOT_RESPONDING" not in state

        self.wait_for(usable, timeout_s, f"{node} to be usable again", poll_s=1)


def start_cluster(script_env: Optional[dict] = None) -> SlurmCluster:
    env = _cluster_env(script_env)
    was_up = cluster_is_up(script_env)
    if os.geteuid() != 0 and not was_up:
        pytest.skip("the localhost SLURM cluster needs root to start (tests/slurm/start.sh)")
    if not was_up:
        out = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900, env=env)
        if out.returncode == 3:
            missing_system_package(CANNOT_RUN[3])
        if out.returncode in CANNOT_RUN:
            pytest.skip(f"{CANNOT_RUN[out.returncode]}: {out.stderr.strip()[-500:]}")
        if out.returncode != 0:
            pytest.fail(f"tests/slurm/start.sh failed (exit {out.returncode}):\n{out.stderr[-4000:]}", pytrace=False)
    listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, env=env).stdout.split()
    nodes = tuple(dict.fromkeys(listed))
    return SlurmCluster(
        node=nodes[0],
        started_here=not was_up,
        nodes=nodes,
        conf=script_env["SLURM_LOCAL_CONF"] if script_env else None,
        script_env=script_env,
    )


def stop_cluster(cluster: SlurmCluster) -> None:
    if cluster.started_here and os.environ.get("SLURM_LOCAL_KEEP") != "1":
        # a cluster the tests started leaves no config or state behind (stop.sh purges only a config that
        # start.sh wrote, never a site's own /etc/slurm/slurm.conf)
        subprocess.run(
            ["bash", str(STOP), "--purge"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_cluster_env(cluster.script_env),
        )


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM (partition ``debug``, this machine's CPUs); stopped after the session."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture(scope="session")
def _two_node_cluster():
    cluster = start_cluster(TWO_NODE_ENV)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture
def slurm_two_nodes(_two_node_cluster, monkeypatch):
    """A running two-node SLURM (``nodea``, ``nodeb``: names that do not resolve; 2 CPUs each, partition
    ``debug``); SLURM's clients in this test (and the jobs it submits) talk to it through ``SLURM_CONF``. A node
    the test lost (:meth:`SlurmCluster.lose_node`) is back and usable after it, for the tests that follow."""
    monkeypatch.setenv("SLURM_CONF", _two_node_cluster.conf)
    try:
        yield _two_node_cluster
    finally:
        for node in list(_two_node_cluster.lost):
            _two_node_cluster.restore_node(node)
