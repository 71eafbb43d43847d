"""Files that are complete or absent: atomic writes, JSON reads that detect truncation, log tails.

A write goes to a temporary file in the same folder, is fsynced and renamed over the target, so a reader
sees the old file or the new one, never a part. A read that finds a truncated or corrupt file raises
:class:`CorruptFileError` naming it, instead of loading it silently.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional


class ResultsError(Exception):
    """A problem with the results folder; names the path."""

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = str(path), message


class CorruptFileError(ResultsError):
    """A truncated or corrupt results file (never loaded silently)."""


def probe_writable(folder) -> None:
    """Create ``folder`` if needed and write, sync and remove a small file in it: an ``OSError`` now, not after
    an epoch, for a folder this process cannot write (permissions, a read-only or full file system)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.unlink(probe)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path) -> Optional[dict]:
    """The JSON object at ``path``; None if absent; :class:`CorruptFileError` if truncated or corrupt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise CorruptFileError(path, "corrupt: not UTF-8 text") from None
    if not text.strip():
        raise CorruptFileError(path, "corrupt: the file is empty (truncated write?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            path, f"truncated or corrupt JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(data, dict):
        raise CorruptFileError(path, f"corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def tail_text(path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a (log) file, for status.json of a failed run."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def fsync_dir(path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_jsonl(path, record: dict) -> None:
    """Append ``record`` as one JSON line, fsynced; a line cut short by a crash is closed off first, so
    it never merges with the next record (the one writer of log.jsonl files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
