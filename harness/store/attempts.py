"""attempts.jsonl: every attempt at a record (requeues, resumes), append-only, so GPU-hours and the attempt
number survive a lost or corrupt status.json.

One JSON line per event of an attempt: ``start`` when it opens, ``beat`` on every heartbeat, ``end`` when it
closes, each with the attempt number, when the attempt started, when it was last seen (now), its GPUs and
job id. An attempt is ``(attempt, started)``: its time is its last ``seen`` minus ``started``, so a job
killed without warning loses at most one heartbeat. An attempts.json of an earlier version
(``{attempt: {started, seen, gpus}}``) is read as well. Lines are appended and fsynced
(:func:`~harness.store.files.append_jsonl`); a line cut short by a crash is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from harness.store.files import CorruptFileError, append_jsonl, read_json

ATTEMPTS = "attempts.jsonl"
OLD_ATTEMPTS = "attempts.json"  # written whole by earlier versions: read, never written
EVENTS = ("start", "beat", "end")


def append_attempt(
    folder: Path, attempt, started: float, seen: float, gpus: int, event: str = "beat", job_id: Optional[str] = None
) -> None:
    if event not in EVENTS:
        raise ValueError(f"event {event!r} is not one of {', '.join(EVENTS)}")
    record = {
        "attempt": str(attempt),
        "event": event,
        "started": float(started),
        "seen": float(seen),
        "gpus": int(gpus),
    }
    if job_id is not None:
        record["job_id"] = str(job_id)
    append_jsonl(Path(folder) / ATTEMPTS, record)


def read_attempts(folder: Path) -> Dict[Tuple[str, float], dict]:
    """``{(attempt, started): {attempt, started, seen, gpus}}`` over attempts.jsonl and an old attempts.json;
    ``seen`` is the latest time the attempt was seen alive."""
    out: Dict[Tuple[str, float], dict] = {}

    def add(attempt, started, seen, gpus):
        key = (str(attempt), float(started))
        known = out.get(key)
        if known is None or seen > known["seen"]:
            out[key] = {"attempt": str(attempt), "started": float(started), "seen": float(seen), "gpus": int(gpus)}

    try:
        old = read_json(Path(folder) / OLD_ATTEMPTS) or {}
    except CorruptFileError:
        old = {}
    for attempt, a in old.items():
        if isinstance(a, dict) and {"started", "seen", "gpus"} <= set(a):
            add(attempt, a["started"], a["seen"], a["gpus"])
    for record in _lines(Path(folder) / ATTEMPTS):
        try:
            add(record["attempt"], record["started"], record["seen"], record["gpus"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _lines(path: Path) -> List[dict]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.split("\n"):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:  # cut short by a crash
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def last_attempt(folder: Path) -> int:
    """The highest attempt number recorded (0 when none)."""
    numbers = [int(a["attempt"]) for a in read_attempts(folder).values() if str(a["attempt"]).isdigit()]
    return max(numbers, default=0)


def gpu_hours(folder: Path) -> float:
    """GPU-hours over every attempt (0 for CPU runs)."""
    return sum(max(a["seen"] - a["started"], 0.0) * a["gpus"] for a in read_attempts(folder).values()) / 3600
