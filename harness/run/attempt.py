"""A job's hold on its records while it works: the claim (taken once the submission lets go of it, kept alive
by a heartbeat) and the attempt it is making at each record (attempts.jsonl: its GPU time)."""

from __future__ import annotations

import threading
import time
from typing import List, Optional

from harness.launch.wrapper import stop_requested
from harness.store import ResultsStore

HEARTBEAT_S = 60
CLAIM_WAIT_S = 300  # how long a job waits for the submission that queued it to release the record


class RunClaimedElsewhere(RuntimeError):
    pass


def claim_when_free(
    store: ResultsStore, key: str, job_id: Optional[str], wait_s: float = CLAIM_WAIT_S, poll_s: float = 2.0
):
    """Claim the record for this job. A submission still holding it (an array task that started before the
    submission released its claim) is waited for, up to ``wait_s``; a live job holding it is not. None: held
    elsewhere."""
    deadline = time.monotonic() + wait_s
    while True:
        claim = store.claim(key, job_id=job_id)
        if claim is not None or not store.claimed_by_submission(key) or time.monotonic() > deadline or stop_requested():
            return claim
        time.sleep(poll_s)


class Attempt:
    """The attempt this job is making at one record (its key), recorded in that record's attempts.jsonl when it
    opens, on every heartbeat and when it closes, so each record's GPU-hours are its own."""

    def __init__(self, store: ResultsStore, job_id: Optional[str] = None):
        self.store, self.job_id = store, job_id
        self.key: Optional[str] = None
        self.gpus = 0
        self.lock = threading.Lock()

    def open(self, key: str, attempt, gpus: int) -> None:
        with self.lock:
            self.key, self.attempt, self.gpus, self.started = key, str(attempt), int(gpus), time.time()
        self._record("start")

    def beat(self) -> None:
        self._record("beat")

    def _record(self, event: str) -> None:
        with self.lock:
            if self.key is not None:
                self.store.record_attempt(self.key, self.attempt, self.started, self.gpus, event, self.job_id)

    def close(self) -> None:
        self._record("end")
        with self.lock:
            self.key = None

    def gpu_hours(self, key: str) -> Optional[float]:
        """The record's GPU-hours over all its attempts (None for a record made without GPUs)."""
        return round(self.store.gpu_hours(key), 4) if self.gpus else None


class Heartbeat(threading.Thread):
    """Keeps the claims alive and the open attempt's GPU time recorded while the job works."""

    def __init__(self, store, claims: List, on_beat=None, period_s=HEARTBEAT_S):
        super().__init__(daemon=True)
        self.store, self.claims, self.on_beat, self.period_s = store, claims, on_beat, period_s
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.period_s):
            if self.on_beat is not None:
                self.on_beat()
            for claim in list(self.claims):
                self.store.heartbeat(claim)
