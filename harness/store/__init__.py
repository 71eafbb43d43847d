"""The results store: run folders whose files are complete or absent, claims, and the plan of what to run.

files.py    atomic writes, JSON reads that detect truncation
jobs.py     job ids that carry their executor; is a local job's process alive (pid and start time)
claims.py   one live holder per run
attempts.py attempts.jsonl: every attempt's time and GPUs, append-only
status.py   status.json and the rule run / leave alone
store.py    ResultsStore: results/runs/<run_id>/, shared by every experiment
plan.py     --dry-run's text
server_scores.py  the COCO evaluation server's test-dev scores, into a row's evaluation record
"""

from harness.store.claims import Claim
from harness.store.files import (
    CorruptFileError,
    ResultsError,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    read_json,
    tail_text,
)
from harness.store.plan import dry_run_plan
from harness.store.status import STATES, PlanEntry, Status, decide
from harness.store.store import ResultsStore

__all__ = [
    "Claim",
    "CorruptFileError",
    "PlanEntry",
    "ResultsError",
    "ResultsStore",
    "STATES",
    "Status",
    "atomic_write_json",
    "atomic_write_text",
    "decide",
    "dry_run_plan",
    "fsync_dir",
    "read_json",
    "tail_text",
]
