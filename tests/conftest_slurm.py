"""A real one-node SLURM cluster on localhost for the tests (``tests/slurm/start.sh`` / ``stop.sh``).

Tests take the ``slurm_cluster`` fixture as an argument (tests/conftest.py lists this module in
``pytest_plugins``). It starts the cluster once per session (installing Debian's ``slurm-wlm`` +
``munge`` if needed, as root) and stops it at the end if it started it. The tests are skipped, with
the reason, only where SLURM cannot be installed or run here (not root, no apt, a real cluster's
``slurm.conf`` in place); a cluster that installs but does not come up is a test error.

``SLURM_LOCAL_KEEP=1`` leaves the cluster running after the session (faster reruns while developing).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest

SLURM_DIR = Path(__file__).resolve().parent / "slurm"
START = SLURM_DIR / "start.sh"
STOP = SLURM_DIR / "stop.sh"
# exit codes of start.sh that mean "SLURM cannot run here" (skip) rather than "it broke" (error)
CANNOT_RUN = {3: "SLURM is not installed and cannot be installed here",
              4: "a slurm.conf not written by tests/slurm/start.sh is in place (a real cluster); left alone"}


def cluster_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


@dataclasses.dataclass
class SlurmCluster:
    """Handles for tests: the node's name and a few scontrol/squeue wrappers."""
    node: str
    started_here: bool

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
        """A requeued job waits ~2 minutes (its BeginTime) before it may start; start it now instead."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (self.state(job_id) or "").startswith("PENDING"):
                self.scontrol("update", f"jobid={job_id}", "StartTime=now")
                return
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not return to PENDING within {timeout_s} s "
                           f"(state {self.state(job_id)})")

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


def start_cluster() -> SlurmCluster:
    was_up = cluster_is_up()
    if os.geteuid() != 0 and not was_up:
        pytest.skip("the localhost SLURM cluster needs root to install and start (tests/slurm/start.sh)")
    if not was_up:
        out = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
        if out.returncode in CANNOT_RUN:
            pytest.skip(f"{CANNOT_RUN[out.returncode]}: {out.stderr.strip()[-500:]}")
        if out.returncode != 0:
            pytest.fail(f"tests/slurm/start.sh failed (exit {out.returncode}):\n{out.stderr[-4000:]}",
                        pytrace=False)
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.split()[0]
    return SlurmCluster(node=node, started_here=not was_up)


def stop_cluster(cluster: SlurmCluster) -> None:
    if cluster.started_here and os.environ.get("SLURM_LOCAL_KEEP") != "1":
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM (partition ``debug``, this machine's CPUs); stopped after the session."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
