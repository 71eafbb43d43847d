"""The self-check: before an implementation that needs it (the GPU kernels) is trusted on a device, it runs a
handful of small cases against the pure-PyTorch reference, forward and the three gradients, in float64 and in
the dtype in use. The cases have odd level shapes, channel counts that are not powers of two and points
outside the map. Then, at the shape the model launches (its heads M, channels D, levels L and points P, taken
from the op's first call: :class:`Shape`), the op in the dtype in use (float32; bfloat16 under autocast, with
float32 locations) once per launch configuration the implementation picks at a training's sizes (the Triton
tile sizes of both presets, forced on small inputs), forward and backward. The check process has a time limit
(``DEFORMABLE_DETR_OPS_SELF_CHECK_TIMEOUT``, default 900 s; lower under DDP: see :mod:`model.ops.distributed`).

The check runs in a child process (``python -m model.ops.selfcheck``), so that a kernel that crashes (an
illegal memory access poisons the CUDA context for good) cannot take the training down with it. The verdict
is stored beside the build, keyed by the build, the device name, the driver, the torch version, the dtype and
the model's shape: it is
computed once per node and kind of GPU, then read from disk. ``DEFORMABLE_DETR_OPS_SELF_CHECK=0`` skips it.

Only a verdict of a comparison that ran is stored: passed, or a result (or an error of the kernel itself)
that differs from the reference. When the check could not run for a reason of the environment -- the child
killed by a signal (the out-of-memory killer, a pre-empted job), CUDA out of memory, GPUs in exclusive-process
mode or busy, a time-out -- the verdict says so (``environment``: the cause), this process does not use the
implementation, and the next process checks again. Where nothing can be written (a read-only cache, a lock
file that cannot be created, a filesystem without flock) the check runs unlocked and its verdict is kept in
memory: a cache problem never makes ``impl="auto"`` raise.

    python -m model.ops.selfcheck --impl cuda --device cuda:0 --dtype bfloat16 --shape 8,32,4,4 --json verdict.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from . import implementations
from .environment import device_name, driver_version
from .reference import ms_deform_attn_pytorch
from .testing import forward_and_grads, make_inputs, max_relative_error

# (name, spatial shapes, heads M, channels D, points P, batch N, queries Lq)
CASES = [
    ("odd_levels_d12", [(5, 7), (3, 1), (1, 4)], 2, 12, 3, 2, 9),
    ("d71_two_levels", [(6, 5), (2, 3)], 1, 71, 2, 1, 7),
    ("four_levels_d32", [(9, 11), (5, 6), (3, 2), (1, 4)], 3, 32, 4, 2, 11),
    ("d300_one_level", [(4, 3)], 1, 300, 2, 1, 3),  # several rounds of a full group
]
# the same, with logits and the fused softmax
SOFTMAX_CASES = [
    ("four_levels_d32_softmax", [(9, 11), (5, 6), (3, 2), (1, 4)], 3, 32, 4, 2, 11),
    ("d300_one_level_softmax", [(4, 3)], 1, 300, 2, 1, 3),  # the logits' gradients after several rounds
]
# Levels of the cases at a model's shape: odd sizes, a one-pixel-wide level; one more per level past five.
MODEL_LEVELS = [(13, 17), (7, 9), (4, 5), (3, 1), (1, 2)]


class Shape(NamedTuple):
    """What a model's attention launches: heads M, channels per head D, levels L, points per level P, and whether
    with the fused softmax. The self-check of an implementation for a shape also runs the op at that shape, with
    every launch configuration (tile sizes) the implementation picks for it at a training's sizes
    (:meth:`Implementation.launch_configs`)."""

    M: int
    D: int
    L: int
    P: int
    softmax: bool = False

    @classmethod
    def of(cls, value: torch.Tensor, sampling_locations: torch.Tensor, softmax: bool = False) -> "Shape":
        return cls(
            int(value.shape[2]),
            int(value.shape[3]),
            int(sampling_locations.shape[3]),
            int(sampling_locations.shape[4]),
            bool(softmax),
        )

    @classmethod
    def parse(cls, text: str) -> "Shape":
        numbers = [int(x) for x in text.split(",")]
        return cls(*numbers[:4], *(bool(x) for x in numbers[4:5]))

    def tag(self) -> str:
        return f"M{self.M}_D{self.D}_L{self.L}_P{self.P}" + ("_softmax" if self.softmax else "")

    def __str__(self) -> str:
        return f"{self.M},{self.D},{self.L},{self.P}" + (",1" if self.softmax else "")


# dtype -> largest relative error accepted against the float64 reference
TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
RESULTS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
TIMEOUT_S = 900  # a first Triton compilation of every case takes a few minutes
VERDICT_FORMAT = 2  # part of the key: verdicts of older code (which cached environment failures) are not read
# Errors that say the check could not run here and now, not that the kernel is wrong: their verdicts are not
# cached. (text in the error, the cause reported)
ENVIRONMENT_ERRORS = (
    ("out of memory", "out of memory"),
    ("busy or unavailable", "the GPU is busy or unavailable (exclusive-process compute mode, or in use)"),
    ("exclusive", "the GPU is in exclusive-process compute mode and in use by another process"),
    ("cudaErrorDevicesUnavailable", "the GPU is busy or unavailable (exclusive-process compute mode)"),
    ("MemoryError", "out of memory"),
    ("CUDA driver initialization failed", "the CUDA driver could not be initialised"),
    ("no CUDA GPUs are available", "no GPU is visible to the check process"),
    ("system not yet initialized", "the GPU is not ready (system not yet initialised)"),
    ("ECC error", "an uncorrectable ECC error of the GPU"),
    ("the launch timed out", "the display watchdog stopped the kernel"),
)

_verdicts: dict[tuple, dict] = {}  # (implementation, device, dtype) -> verdict, in this process


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checked_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    return [torch.float64] + ([dtype] if dtype != torch.float64 else [])


def environment_cause(text: str) -> str | None:
    """The environment problem an error message names (out of memory, a busy or exclusive GPU...), else None."""
    for needle, cause in ENVIRONMENT_ERRORS:
        if needle.lower() in text.lower():
            return cause
    return None


def _cases(impl, device: torch.device, dtype: torch.dtype, shape: Shape | None):
    """(label, inputs factory, launch configuration) of every case of a check, in order."""
    for dt in checked_dtypes(dtype):
        for cases, softmax in ((CASES, False), (SOFTMAX_CASES, True)):
            for name, shapes, M, D, P, N, Lq in cases:
                label = f"{name} (N={N}, Lq={Lq}, M={M}, D={D}, P={P}, levels {shapes}), {dtype_name(dt)}"
                yield (
                    label,
                    dt,
                    (
                        lambda shapes=shapes, M=M, D=D, P=P, N=N, Lq=Lq, dt=dt, softmax=softmax: make_inputs(
                            shapes, M=M, D=D, P=P, N=N, Lq=Lq, dtype=dt, device=device, logits=softmax
                        )
                    ),
                    None,
                    softmax,
                )
    if shape is None:
        return
    levels = (MODEL_LEVELS + [(1, 1)] * shape.L)[: shape.L]
    N = 2
    for config in impl.launch_configs(shape.D, dtype, device):
        # enough (query, head) groups for 2-3 programs of the largest tile, and a last one partly empty
        block = max(
            [1]
            + [
                v[0]
                for v in (config or {}).values()  # groups per program, of a tile configuration
                if isinstance(v, (tuple, list)) and v and isinstance(v[0], int)
            ]
        )
        Lq = max(3, -(-5 * block // (2 * N * shape.M))) | 1
        label = f"model shape {shape.tag()} (N={N}, Lq={Lq}, levels {levels}), {dtype_name(dtype)}" + (
            f", launch {config}" if config else ""
        )

        def inputs(Lq=Lq):
            value, shapes, starts, loc, attn = make_inputs(
                levels, M=shape.M, D=shape.D, P=shape.P, N=N, Lq=Lq, dtype=dtype, device=device, logits=shape.softmax
            )
            if dtype in (torch.float16, torch.bfloat16):
                loc = loc.float()  # as under autocast: reference points in float32
            return value, shapes, starts, loc, attn

        yield label, dtype, inputs, config, shape.softmax


def run_cases(
    impl: implementations.Implementation, device: torch.device, dtype: torch.dtype, shape: Shape | None = None
) -> dict:
    """Run every case here, in this process: the fixed cases in float64 and ``dtype``; with a ``shape``, the op at
    that shape in ``dtype`` once per launch configuration. Forward and the three gradients, against the
    reference in float64 on the same (rounded) inputs. A verdict: ``ok``, and for a failure the ``case`` and the
    ``error``; ``max_errors`` per dtype; ``compared`` (False when an error of the environment stopped the
    comparison: ``environment`` then names it); ``cases``, how many ran."""
    max_errors: dict[str, float] = {}
    count = 0
    for case, dt, make, config, softmax in _cases(impl, device, dtype, shape):
        print(f"case: {case}", flush=True)  # the last one printed names the case if this process dies
        try:
            inputs = make()
            expected = forward_and_grads(
                lambda *a: ms_deform_attn_pytorch(*a, softmax=softmax),
                [t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs],
            )
            with impl.launch_context(config) if config is not None else contextlib.nullcontext():
                actual = forward_and_grads(lambda *a: impl.forward(*a, softmax=softmax), inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - the verdict reports it
            error = f"{type(e).__name__}: {e}".strip()
            cause = environment_cause(error)
            return {
                "ok": False,
                "case": case,
                "error": error,
                "max_errors": max_errors,
                "cases": count,
                "compared": cause is None,
                "environment": cause,
            }
        count += 1
        for what, a, e in zip(RESULTS, actual, expected):
            bad_type = a is None or a.shape != e.shape or a.device != device
            error = float("inf") if bad_type else max_relative_error(a, e)
            if not error <= TOLERANCES[dt]:  # also for NaN
                detail = (
                    f"{what} has shape {None if a is None else tuple(a.shape)} on {None if a is None else a.device}"
                    if bad_type
                    else f"{what} differs from the reference by {error:.2e} (relative; accepted: {TOLERANCES[dt]:.0e})"
                )
                return {
                    "ok": False,
                    "case": case,
                    "error": detail,
                    "max_errors": max_errors,
                    "cases": count,
                    "compared": True,
                    "environment": None,
                }
            max_errors[dtype_name(dt)] = max(max_errors.get(dtype_name(dt), 0.0), error)
    return {
        "ok": True,
        "case": None,
        "error": None,
        "max_errors": max_errors,
        "cases": count,
        "compared": True,
        "environment": None,
    }


def verdict_key(impl: implementations.Implementation, device: torch.device) -> dict:
    return {
        "implementation": impl.name,
        "build": impl.build_id(),
        "device": device_name(device),
        "driver": driver_version(),
        "torch": torch.__version__,
        "format": VERDICT_FORMAT,
    }


def verdict_path(
    impl: implementations.Implementation, device: torch.device, dtype: torch.dtype, shape: Shape | None = None
) -> Path:
    digest = hashlib.sha256(json.dumps(verdict_key(impl, device), sort_keys=True).encode()).hexdigest()[:16]
    return impl.verdict_dir() / f"{digest}_{dtype_name(dtype)}{'' if shape is None else '_' + shape.tag()}.json"


SIGNALS = {
    6: "SIGABRT: the process aborted (a crash of the kernel, the driver or the runtime)",
    11: "SIGSEGV: the process crashed",
    9: "SIGKILL: the out-of-memory killer, or the job was pre-empted or cancelled",
    15: "SIGTERM: the job was pre-empted or cancelled",
    2: "SIGINT: interrupted",
    1: "SIGHUP: the terminal or job went away",
    24: "SIGXCPU: the job ran out of CPU time",
}


def timeout_s() -> float:
    """How long the check process may take: TIMEOUT_S, or DEFORMABLE_DETR_OPS_SELF_CHECK_TIMEOUT (seconds)."""
    text = os.environ.get("DEFORMABLE_DETR_OPS_SELF_CHECK_TIMEOUT")
    try:
        return float(text) if text else TIMEOUT_S
    except ValueError:
        return TIMEOUT_S


def _run_child(
    impl: implementations.Implementation,
    device: torch.device,
    dtype: torch.dtype,
    shape: Shape | None = None,
    timeout: float | None = None,
) -> dict:
    """The verdict of a check run in a child process. ``compared`` False, ``environment`` the cause, when the
    child did not finish a comparison for a reason of the environment (killed by a signal, out of memory, a
    busy GPU, the time-out) or left no verdict."""
    timeout = timeout_s() if timeout is None else timeout
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding model/
    env = dict(
        os.environ,
        DEFORMABLE_DETR_OPS_NO_BUILD="1",  # the parent built (or failed to build) already
        DEFORMABLE_DETR_OPS_IN_SELF_CHECK="1",
        PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "verdict.json"
        command = [
            sys.executable,
            "-m",
            "model.ops.selfcheck",
            "--impl",
            impl.spec,
            "--device",
            str(device),
            "--dtype",
            dtype_name(dtype),
            "--json",
            str(out),
        ] + ([] if shape is None else ["--shape", str(shape)])
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            cases = [line[len("case: ") :] for line in stdout.splitlines() if line.startswith("case: ")]
            return {
                "ok": False,
                "case": cases[-1] if cases else None,
                "compared": False,
                "environment": f"time-out: the check process did not finish in {timeout:g} s",
                "error": f"the check process did not finish in {timeout:g} s",
                "output": stdout[-2000:],
            }
        if result.returncode == 0 and out.exists():
            try:
                return json.loads(out.read_text())
            except ValueError:
                pass
    cases = [line[len("case: ") :] for line in result.stdout.splitlines() if line.startswith("case: ")]
    code = result.returncode
    tail = "\n".join(result.stderr.strip().splitlines()[-6:])
    if code < 0:
        signal_name = SIGNALS.get(-code, f"signal {-code}")
        how = f"was killed by signal {-code}"
        cause = f"the check process was killed by signal {-code} ({signal_name})"
    else:
        how = f"exited with status {code}"
        cause = environment_cause(result.stderr) or f"the check process {how} before a comparison finished"
    return {
        "ok": False,
        "case": cases[-1] if cases else None,
        "error": f"the check process {how}: {tail}",
        "compared": False,
        "environment": cause,
    }


def _read_verdict(path: Path) -> dict | None:
    """A cached verdict, or None (absent, unreadable, or not a finished comparison)."""
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(verdict, dict) or "ok" not in verdict or verdict.get("compared") is False:
        return None
    return verdict


def _write_verdict(path: Path, verdict: dict) -> str | None:
    """Stores a verdict atomically; None, or why it could not be stored."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(verdict, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return f"cannot write {path}: {e.strerror or e}"
    return None


def _status(verdict: dict) -> str:
    if verdict.get("compared") is False:
        return f"could not run: {verdict.get('environment')} (not cached: the next process checks again)"
    return "passed" if verdict["ok"] else "FAILED"


def self_check(
    impl: implementations.Implementation,
    device,
    dtype: torch.dtype,
    shape: Shape | None = None,
    timeout: float | None = None,
) -> dict:
    """The verdict on ``impl`` for tensors of ``dtype`` on ``device`` (and a model's ``shape``: see
    :func:`run_cases`): from this process's memory, else from the cache beside the build, else computed by a
    child process within ``timeout`` seconds (default :func:`timeout_s`), and then cached when the comparison
    ran.

    ``status``: "passed", "FAILED", "passed (cached: ...)", "could not run: <cause> (not cached...)", with
    "(not cached: <why>)" where the cache could not be written; ``file``: the verdict's path."""
    device = torch.device(device)
    key = (impl.name, impl.spec, device, dtype, shape)
    if key in _verdicts:
        return _verdicts[key]
    if os.environ.get("DEFORMABLE_DETR_OPS_SELF_CHECK", "1") == "0":
        verdict = {"ok": True, "status": "skipped (DEFORMABLE_DETR_OPS_SELF_CHECK=0)"}
        _verdicts[key] = verdict
        return verdict
    path = verdict_path(impl, device, dtype, shape)
    verdict = _read_verdict(path)
    if verdict is not None:
        verdict["status"] = f"{'passed' if verdict['ok'] else 'FAILED'} (cached: {path})"
    else:
        from .build import try_file_lock  # one check per key at a time: simultaneous processes wait, then read it

        with try_file_lock(
            path.with_suffix(".lock"),
            f"ms_deform_attn: waiting for another process's self-check "
            f"of {impl.name} on {device_name(device)} ({path})",
        ) as no_lock:
            verdict = _read_verdict(path)  # written by the process this one waited for
            if verdict is not None:
                verdict["status"] = f"{'passed' if verdict['ok'] else 'FAILED'} (cached: {path})"
            else:
                verdict = _check(impl, device, dtype, shape, timeout, path, no_lock)
    verdict["file"] = str(path)
    _verdicts[key] = verdict
    return verdict


def _check(impl, device, dtype, shape, timeout, path: Path, no_lock: str | None) -> dict:
    at_shape = "" if shape is None else f", at the model's shape {shape.tag()} with every launch configuration"
    print(
        f"ms_deform_attn: self-check of the {impl.description} on {device_name(device)} "
        f"({', '.join(dtype_name(d) for d in checked_dtypes(dtype))}{at_shape}) against the reference, once per "
        f"build and device",
        file=sys.stderr,
        flush=True,
    )
    start = time.time()
    verdict = _run_child(impl, device, dtype, shape, timeout)
    verdict.update(
        verdict_key(impl, device),
        dtypes=[dtype_name(d) for d in checked_dtypes(dtype)],
        shape=None if shape is None else shape._asdict(),
        seconds=round(time.time() - start, 1),
    )
    verdict.setdefault("compared", True)
    status = _status(verdict)
    if verdict["compared"]:
        not_written = _write_verdict(path, verdict)
        if not_written is not None:
            status += f" (not cached: {not_written})"
    if no_lock is not None:
        verdict["lock"] = f"checked without a lock: {no_lock}"
    verdict["status"] = status
    return verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.ops.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", required=True, help="registry name (cuda, triton, ...) or module:attribute")
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", default="float32", choices=[dtype_name(d) for d in TOLERANCES])
    parser.add_argument(
        "--shape", type=Shape.parse, help="a model's M,D,L,P[,1 for the fused softmax]: also run the op at that shape"
    )
    parser.add_argument("--json", type=Path, help="write the verdict here")
    args = parser.parse_args(argv)
    impl, device, dtype = implementations.get(args.impl), torch.device(args.device), getattr(torch, args.dtype)
    impl.prepare(device)
    verdict = run_cases(impl, device, dtype, args.shape)
    text = json.dumps(verdict, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
