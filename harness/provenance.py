"""Where and when a number was measured: the code's commit, the device's name, the date.

Records take these from here: a time is :func:`utc_now` (status.json, claims, attempts), a record's ``date`` is
:func:`utc_date` (training, evaluation and measurement records). torch is
imported inside :func:`device_name` only, so that the torch-free layers (grid, store, launch) can use
the rest without loading it.
"""

from __future__ import annotations

import calendar
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

REPOSITORY = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = REPOSITORY) -> Optional[str]:
    """The checked-out commit (12 hex digits, ``-dirty`` with uncommitted changes to tracked files); None
    outside a git repository (a release archive, an installed package, a code snapshot)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def utc_now(clock: Callable[[], float] = time.time) -> str:
    """``2026-11-25T18:21:06Z``"""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))


def utc_date(clock: Callable[[], float] = time.time) -> str:
    """``2026-11-25``: the UTC day of :func:`utc_now`, a record's ``date`` (the same day on every node)."""
    return utc_now(clock)[:10]


def parse_utc(text: Optional[str]) -> Optional[float]:
    """Seconds since the epoch of a :func:`utc_now` string; None if absent or malformed."""
    if not text:
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def current_device():
    """The device this process computes on: its CUDA device (``init_distributed`` sets it from LOCAL_RANK), else
    the CPU."""
    import torch  # only where a device is used

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device) -> str:
    """``NVIDIA H100 80GB HBM3`` or ``CPU (<model name>, <threads> threads)``: the naming of
    :func:`model.ops.environment.device_name`, which the attention self-check verdicts are keyed by too."""
    from model.ops.environment import device_name as name_of  # loads torch: only where a device is named

    return name_of(device)
