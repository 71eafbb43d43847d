"""Job logs in the terminal: ``--logs ROW [--lines N] [--follow]``, and the log of a local job printed while the
submission waits for it (a local job's output goes to its log file, as a SLURM job's does; without this a
``--smoke`` run would say nothing until its rows were done).

Following reads what was appended to a file since the last look (complete lines only; a file that shrank, a
requeued job's log written anew, is read again from its start), like ``tail -f``. Nothing here imports torch.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from harness.grid import expand, unique_runs
from harness.launch.follow import LOG_LINES, run_log_paths
from harness.store import tail_text

ALIVE = ("queued", "running")  # a record whose job may still write to its log


class FileFollower:
    """New complete lines of some files, each printed to its stream (``write(text)``)."""

    def __init__(self, files: Sequence[Tuple[Path, Callable[[str], None]]] = (), from_start: bool = True):
        self.files: List[Tuple[Path, Callable[[str], None]]] = []
        self.offsets: Dict[Path, int] = {}
        self.partial: Dict[Path, str] = {}
        for path, write in files:
            self.add(path, write, from_start)

    def add(self, path, write: Callable[[str], None], from_start: bool = True) -> None:
        path = Path(path)
        self.files.append((path, write))
        self.offsets[path] = 0 if from_start or not path.is_file() else path.stat().st_size
        self.partial[path] = ""

    def poll(self, final: bool = False) -> bool:
        """Print what the files gained; ``final``: an unfinished last line too. True when anything was new."""
        new = False
        for path, write in self.files:
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size < self.offsets[path]:  # written anew (a requeued job): from its start again
                self.offsets[path], self.partial[path] = 0, ""
            if size == self.offsets[path] and not (final and self.partial[path]):
                continue
            with open(path, "rb") as f:
                f.seek(self.offsets[path])
                data = f.read(size - self.offsets[path])
            self.offsets[path] += len(data)
            text = self.partial[path] + data.decode("utf-8", errors="replace")
            complete, _, rest = text.rpartition("\n")
            if final and rest:
                complete, rest = (complete + "\n" if complete else "") + rest, ""
            self.partial[path] = rest
            if complete:
                write(complete + "\n")
                new = True
        return new


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


@contextmanager
def printing_logs(log_files: Sequence[Tuple[Path, Path]], poll_s: float = 0.5) -> Iterator[FileFollower]:
    """While inside: the (stdout, stderr) logs of running jobs printed as they grow, stdout's to this stdout,
    stderr's to this stderr (a thread; what is left is printed on the way out)."""
    follower = FileFollower([(Path(p), w) for out, err in log_files for p, w in ((out, _stdout), (err, _stderr))])
    stop = threading.Event()

    def loop():
        while not stop.wait(poll_s):
            follower.poll()

    thread = threading.Thread(target=loop, name="job-log-follower", daemon=True)
    thread.start()
    try:
        yield follower
    finally:
        stop.set()
        thread.join(timeout=5)
        follower.poll(final=True)


# ------------------------------------------------------------------------------------- --logs ROW


def _row_entries(experiment, store, row: str):
    label = experiment.selected[0] if experiment.selected else row
    specs = [s for s in unique_runs(expand(experiment)) if s.label == label]
    return label, store.plan(specs)


def _status(store, entry):
    return store.read_status(entry.key) or store.read_status(entry.spec.run_id)


def logs_text(experiment, store, row: str, lines: int = LOG_LINES) -> str:
    """The last ``lines`` lines of the newest job log of ``row`` (and of its stderr), or why there is none."""
    label, entries = _row_entries(experiment, store, row)
    out = []
    for entry in entries:
        status = _status(store, entry)
        if status is None or not status.job_ids:
            out.append(f"{label} ({entry.key}): no job has run it yet")
            continue
        stdout, stderr = run_log_paths(store, entry.spec, status)
        for path in (stdout, stderr):
            text = tail_text(path, lines) if path.is_file() else ""
            out.append(f"==> {path} <==\n{text or '(empty or not written yet)'}")
        if status.state == "failed" and status.log_tail and not stdout.is_file():
            out.append(f"==> the failure, as recorded in status.json <==\n{status.log_tail}")
    return "\n".join(out)


def follow_logs(
    experiment,
    store,
    row: str,
    lines: int = LOG_LINES,
    poll_s: float = 1.0,
    state_every_s: float = 3.0,
    write: Callable[[str], None] = _stdout,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """``--logs ROW --follow``: the last ``lines`` lines of the row's job log, then what the job writes, until
    its record is no longer queued or running (returns the state it ended in) or Ctrl-C (KeyboardInterrupt,
    for the caller). A newer job of the run (resubmitted) is followed from its start. A job seen running must
    be seen ended twice in a row (its training done, the record of its evaluation is marked running a moment
    later)."""
    label, entries = _row_entries(experiment, store, row)
    if not entries:
        write(f"{row}: no run to follow\n")
        return "none"
    entry = ([e for e in entries if e.state in ALIVE] or entries)[0]
    if len(entries) > 1:
        write(f"following {entry.key} ({len(entries)} runs for {label!r}: one per seed)\n")
    follower, job, checked, seen_alive, ended = None, None, None, False, 0
    while True:
        if checked is None or clock() - checked >= state_every_s:
            checked = clock()
            entry = store.plan_one(entry.spec)
            status = _status(store, entry)
            newest = status.job_ids[-1] if status is not None and status.job_ids else None
            if newest is not None and newest != job:
                if follower is not None:
                    follower.poll(final=True)
                job = newest
                stdout, stderr = run_log_paths(store, entry.spec, status)
                write(f"==> job {job}: {stdout} <==\n")
                tail = tail_text(stdout, lines) if stdout.is_file() else ""
                write(tail + "\n" if tail else "")
                follower = FileFollower([(stdout, write), (stderr, _stderr)], from_start=False)
            elif newest is None and job is None:
                write(f"{label} ({entry.key}): {entry.state}, no job has run it yet\n")
                job = ""
            alive = entry.state in ALIVE
            seen_alive |= alive
            ended = 0 if alive else ended + 1
            if ended >= (2 if seen_alive else 1):
                if follower is not None:
                    follower.poll(final=True)
                write(f"==> {entry.key}: {entry.state}{f' ({entry.reason})' if entry.reason else ''} <==\n")
                return entry.state
        if follower is not None:
            follower.poll()
        time.sleep(poll_s)


__all__ = ["FileFollower", "follow_logs", "logs_text", "printing_logs"]
