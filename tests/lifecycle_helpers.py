"""Helpers for the lifecycle tests (a helpers module, not a test module): a local run submitted by a real
``run_experiment.py`` process, and a hook that holds the job's tasks at a chosen call (a checkpoint write, an
evaluation batch, an optimiser step) so a signal lands exactly there.

The hook is a ``sitecustomize`` on the job's PYTHONPATH: in a task of a local job (``SUBMITIT_LOCAL_GLOBALID``
set) it wraps ``module:attribute`` when the module is imported; the ``call``-th call writes
``<marker>.<rank>`` and sleeps ``sleep`` seconds before doing its work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_experiment.yaml"
# two epochs of 2 iterations per task (2 tasks, gloo), 4 evaluation batches per task; no FLOPs/FPS
OVERRIDES = [
    "train.epochs=2",
    "train.eval_every=1",
    "data.synthetic_val_images=8",
    "eval.batch_size_per_gpu=1",
    "benchmark.flops=false",
    "benchmark.fps=false",
]

SITECUSTOMIZE = r"""
import json, os, sys, time
import importlib.abc, importlib.util

_cfg = os.environ.get("HARNESS_TEST_HOOK")
if _cfg and os.environ.get("SUBMITIT_LOCAL_GLOBALID") is not None:
    _cfg = json.loads(_cfg)
    _module, _attr = _cfg["target"].split(":")

    def _wrap(fn):
        calls = [0]

        def held(*args, **kwargs):
            calls[0] += 1
            if calls[0] == _cfg["call"]:
                open(_cfg["marker"] + "." + os.environ["SUBMITIT_LOCAL_GLOBALID"], "w").close()
                time.sleep(_cfg["sleep"])
            return fn(*args, **kwargs)
        return held

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _module:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                setattr(module, _attr, _wrap(getattr(module, _attr)))
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
"""


def argv(root: Path, *extra: str):
    return [
        str(TINY),
        "--results",
        str(root / "results"),
        "--reports",
        str(root / "reports"),
        "--rows",
        "K=1",
        "--executor",
        "local",
        *OVERRIDES,
        *extra,
    ]


def environment(tmp_path: Path, hook: dict = None, path_prefix: str = None) -> dict:
    """The environment of a submission: one thread per task, the hook (if any) on PYTHONPATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if hook is not None:
        folder = tmp_path / "hook"
        folder.mkdir(exist_ok=True)
        (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(folder), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["HARNESS_TEST_HOOK"] = json.dumps(hook)
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    return env


def start_submission(root: Path, env: dict, *extra: str) -> subprocess.Popen:
    """``run_experiment.py`` in a process group of its own, as a terminal's foreground job (Ctrl-C: SIGINT to
    the group)."""
    log = open(root / "submission.log", "ab")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_experiment.py"), *argv(root, *extra)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen = None, log: Path = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the submission ended (rc {proc.returncode}) before {what}:\n"
                + (log.read_text()[-4000:] if log and log.exists() else "")
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}:\n" + (log.read_text()[-4000:] if log and log.exists() else "")
            )
        time.sleep(0.2)
