"""Training checkpoints: atomic writes, corruption detected, fall back to the previous good one.

A checkpoint is a plain ``torch.save`` dict in the official layout (``model``, ``optimizer``,
``lr_scheduler``, ``epoch``) plus ``rng`` (torch, CUDA, NumPy and Python generator states), ``sampler``
(its epoch and seed), ``config``, and the ``checksum`` of :mod:`model.checkpoint`, which reads this format
and the official one alike.

Writing: the new file goes to ``<name>.tmp``, is fsynced and renamed over ``checkpoint.pth``; the
file it replaces is kept as ``checkpoint_prev.pth``. At every moment at least one complete
checkpoint is on disk. A hard stop (a second Ctrl-C) that arrives while a checkpoint is written waits until it
is renamed into place (:func:`harness.launch.wrapper.stop_deferred`). Reading (:func:`load_latest`) tries
``checkpoint.pth`` then
``checkpoint_prev.pth``, saying which one was unusable and why; if files exist but none is usable it
raises :class:`CheckpointError` rather than silently starting from scratch.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from harness.launch.wrapper import stop_deferred
from harness.store.files import fsync_dir, probe_writable
from harness.store.planner import CHECKPOINT
from model.checkpoint import CheckpointError, checksum, read_file

PREVIOUS = "checkpoint_prev.pth"
REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch")
FORMAT = 1

__all__ = [
    "CHECKPOINT",
    "PREVIOUS",
    "CheckpointError",
    "load_latest",
    "read_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict:
    """Every generator a training step draws from (NumPy's as a tensor, so the file loads weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str, state: dict, name: str = CHECKPOINT, keep_previous: bool = True) -> str:
    """Write ``state`` (+ format and checksum) atomically to ``output_dir/name``; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    state = dict(state, format=FORMAT)
    state["checksum"] = checksum(state)
    tmp = path + ".tmp"
    with stop_deferred():  # never cut in half: a hard stop waits for the rename
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and name == CHECKPOINT and os.path.isfile(path):
            prev, prev_tmp = os.path.join(output_dir, PREVIOUS), os.path.join(output_dir, PREVIOUS + ".tmp")
            if os.path.exists(prev_tmp):
                os.remove(prev_tmp)
            try:
                os.link(path, prev_tmp)  # no copy, and checkpoint.pth never disappears
            except OSError:
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        fsync_dir(output_dir)
    return path


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and verify one of our training checkpoints; :class:`CheckpointError` if it is missing, truncated,
    corrupt, or not a training checkpoint of this project (a bare or official one)."""
    state = read_file(path, map_location)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(path, f"not a training checkpoint of this harness: no {', '.join(missing)}")
    if "checksum" not in state:
        raise CheckpointError(path, "no checksum: not written by this harness, or written incompletely")
    return state


def load_latest(output_dir: str, map_location="cpu", log=print) -> Optional[Tuple[dict, str]]:
    """The newest usable checkpoint in ``output_dir`` as ``(state, path)``; None when there is none."""
    candidates = [os.path.join(output_dir, n) for n in (CHECKPOINT, PREVIOUS)]
    present = [p for p in candidates if os.path.isfile(p)]
    if not present:
        return None
    problems = []
    for path in present:
        try:
            state = read_checkpoint(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            message = f"{e}; falling back to the previous one" if path != present[-1] else str(e)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            if log is not None:
                log(f"WARNING: {message}")
            continue
        if problems and log is not None:
            log(f"resuming from {path} (epoch {state['epoch']}) instead")
        return state, path
    raise CheckpointError(
        output_dir, "no usable checkpoint; " + "; ".join(problems) + ". Remove the files to start again from scratch."
    )


def check_output_dir(output_dir: str, model: Optional[torch.nn.Module] = None) -> None:
    """A clear error now, not after an epoch, for an unwritable folder or one without room for checkpoints."""
    try:
        probe_writable(output_dir)
    except OSError as e:
        raise OSError(f"results folder {output_dir} is not writable: {e}") from None
    if model is not None:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        need = 2 * 3 * params + (64 << 20)  # two checkpoints of weights + two Adam moments, and slack
        free = shutil.disk_usage(output_dir).free
        if free < need:
            raise OSError(
                f"not enough disk space in {output_dir}: {free / 2**20:.0f} MiB free, checkpoints need "
                f"about {need / 2**20:.0f} MiB"
            )
