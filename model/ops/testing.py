"""Inputs and comparisons for checking multi-scale deformable attention (tests, doctor, benchmark)."""

from __future__ import annotations

import torch

# (name, spatial shapes, heads M, channels D, points P)
CASES = [
    ("one_level", [(5, 7)], 2, 8, 1),
    ("one_level_p4_d32", [(6, 3)], 3, 32, 4),
    ("four_levels_p1", [(9, 11), (5, 6), (3, 2), (1, 4)], 2, 8, 1),
    ("four_levels_p4_d32", [(9, 11), (5, 6), (3, 2), (1, 4)], 2, 32, 4),
]


def make_inputs(spatial_shapes, M=2, D=8, P=4, N=2, Lq=13, dtype=torch.float64, device="cpu", seed=0, logits=False):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights.

    Locations are drawn in [-0.3, 1.3] (so some points are partly or wholly outside their map) and a few are
    set far outside. ``logits``: attention logits (for the fused softmax: N(0, 2), a few large), else weights
    normalised over the L * P points of each (batch, query, head).
    """
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spatial_shapes, dtype=torch.long)
    level_start_index = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S, L = int((shapes[:, 0] * shapes[:, 1]).sum()), len(spatial_shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    sampling_locations = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if Lq > 0:
        sampling_locations[:, 0, 0] = torch.tensor([-2.0, 3.0], dtype=torch.float64)  # far outside
        sampling_locations[:, -1, -1, :, :, 1] = 1.01  # just below the bottom edge: half the corners outside
    attention_weights = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    if logits:
        attention_weights = 2 * torch.randn(N, Lq, M, L, P, generator=g, dtype=torch.float64)
        if attention_weights.numel():
            attention_weights.view(-1)[::7] += 8.0  # some dominant points, as a trained model has
    else:
        attention_weights = attention_weights / attention_weights.flatten(-2).sum(-1)[..., None, None]
    tensors = [value, sampling_locations, attention_weights]
    value, sampling_locations, attention_weights = (t.to(device=device, dtype=dtype) for t in tensors)
    return value, shapes.to(device), level_start_index.to(device), sampling_locations, attention_weights


def forward_and_grads(fn, inputs, grad_output=None):
    """Output and the gradients of (value, sampling_locations, attention_weights) for a fixed grad_output (fn takes
    the five op arguments; for the fused softmax, a lambda passing softmax=True)."""
    value, shapes, starts, loc, attn = (t.detach().clone() for t in inputs)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_output.to(device=out.device, dtype=out.dtype))
    return out.detach(), value.grad, loc.grad, attn.grad


def max_relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def misaligned(t):
    """The same values as ``t`` in a view whose data starts one element past a 16-byte boundary (the CUDA
    kernel then cannot read 16-byte packs and falls back to one element per pack)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


# Implementations for tests of the self-check and of impl="auto" (see model.ops.implementations). They run on
# CPU tensors and ask for the self-check as the GPU kernels do; a child process finds them by
# "model.ops.testing:<name>".
from .implementations import Implementation, Reference  # noqa: E402


class EmulatedCudaKernel(Implementation):
    """The CUDA kernels' code run on the host (the test-only op deformable_detr::ms_deform_attn_emulated)."""

    name = "emulated"
    spec = "model.ops.testing:EMULATED"
    description = "emulated CUDA kernel"
    device_types = ("cpu",)
    needs_self_check = True

    def prepare(self, device):
        from . import build

        build.load("cpu")  # the emulator is built with the CPU kernel

    def forward(self, *args, softmax=False):
        return torch.ops.deformable_detr.ms_deform_attn_emulated(*args, softmax)

    def build_id(self):
        from . import build

        return "emulated_" + build.extension_spec("cpu").name


class WrongKernel(Reference):
    """A kernel made wrong on purpose: it samples every point half a pixel too far right."""

    name = "wrong"
    spec = "model.ops.testing:WRONG"
    description = "deliberately wrong kernel"
    device_types = ("cpu",)
    needs_self_check = True

    def supports(self, device, dtype):
        return device.type == "cpu" and dtype.is_floating_point

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
        shift = torch.zeros_like(sampling_locations)
        shift[..., 0] = 0.5 / spatial_shapes[:, 1].to(sampling_locations)[None, None, None, :, None]
        return Reference.forward(
            self, value, spatial_shapes, level_start_index, sampling_locations + shift, attention_weights, softmax
        )


class CrashingKernel(WrongKernel):
    """A kernel that kills its process, as an illegal memory access kills a CUDA context."""

    name = "crashing"
    spec = "model.ops.testing:CRASHING"
    description = "crashing kernel"

    def forward(self, *args, softmax=False):
        import os

        os.abort()


class UnlaunchableKernel(WrongKernel):
    """A kernel whose launches fail as on a GPU the build has no code for (it is not self-checked, so that the
    failure shows at the first call)."""

    name = "unlaunchable"
    spec = "model.ops.testing:UNLAUNCHABLE"
    description = "unlaunchable kernel"
    needs_self_check = False

    def forward(self, *args, softmax=False):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


class RightKernel(WrongKernel):
    """The reference, asking for the self-check as a GPU kernel does; DEFORMABLE_DETR_OPS_TEST_MARKS (a folder),
    when set, gets one file per check process that ran it (to count the checks)."""

    name = "right"
    spec = "model.ops.testing:RIGHT"
    description = "correct test kernel"

    def forward(self, *args, softmax=False):
        _mark(self.name)
        return Reference.forward(self, *args, softmax=softmax)


def _mark(name):
    import os

    folder = os.environ.get("DEFORMABLE_DETR_OPS_TEST_MARKS")
    if folder:
        from pathlib import Path

        Path(folder, f"{name}.{os.getpid()}").touch()


class KilledKernel(RightKernel):
    """A correct kernel whose check process is killed mid-check (SIGKILL: the out-of-memory killer, a pre-empted
    job); when DEFORMABLE_DETR_OPS_TEST_KILL is "0" it is not killed."""

    name = "killed"
    spec = "model.ops.testing:KILLED"
    description = "killed test kernel"

    def forward(self, *args, softmax=False):
        import os
        import signal

        _mark(self.name)
        if os.environ.get("DEFORMABLE_DETR_OPS_TEST_KILL", "1") != "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return Reference.forward(self, *args, softmax=softmax)


class EnvironmentErrorKernel(RightKernel):
    """A correct kernel whose check meets an error of the environment, given by DEFORMABLE_DETR_OPS_TEST_ERROR (default:
    the CUDA error of a GPU in exclusive-process mode that another process holds)."""

    name = "busy"
    spec = "model.ops.testing:BUSY"
    description = "test kernel on a busy GPU"
    ERROR = "CUDA error: all CUDA-capable devices are busy or unavailable"

    def forward(self, *args, softmax=False):
        import os

        _mark(self.name)
        raise RuntimeError(os.environ.get("DEFORMABLE_DETR_OPS_TEST_ERROR", self.ERROR))


class SlowKernel(RightKernel):
    """A correct kernel whose every call sleeps DEFORMABLE_DETR_OPS_TEST_SLEEP seconds (default 0.5), in the check
    process only (a slow check), and marks only there."""

    name = "slow"
    spec = "model.ops.testing:SLOW"
    description = "slow test kernel"

    def forward(self, *args, softmax=False):
        import os
        import time

        if os.environ.get("DEFORMABLE_DETR_OPS_IN_SELF_CHECK") == "1":
            _mark(self.name)
            time.sleep(float(os.environ.get("DEFORMABLE_DETR_OPS_TEST_SLEEP", "0.5")))
        return Reference.forward(self, *args, softmax=softmax)


class TiledKernel(RightKernel):
    """A kernel with two launch configurations (as Triton's tile sizes), wrong in the second one, which small
    inputs never pick: only a check that forces every configuration at the model's shape finds it. And wrong
    with 8 heads of 32 channels (the model's shape), which the fixed cases do not have."""

    name = "tiled"
    spec = "model.ops.testing:TILED"
    description = "tiled test kernel"
    tile = "small"
    wrong_at = {"tile": "large"}

    def launch_configs(self, D, dtype, device):
        return [{"tile": "small"}, {"tile": "large"}]

    def launch_context(self, config):
        import contextlib

        @contextlib.contextmanager
        def forced():
            previous, self.tile = self.tile, config["tile"]
            try:
                yield
            finally:
                self.tile = previous

        return forced()

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
        _mark(self.name)
        wrong = self.tile == self.wrong_at.get("tile") or tuple(value.shape[2:]) == self.wrong_at.get("MD")
        impl = WrongKernel.forward if wrong else Reference.forward
        return impl(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax)


class WrongAtModelShape(TiledKernel):
    name = "wrong_at_shape"
    spec = "model.ops.testing:WRONG_AT_SHAPE"
    description = "test kernel wrong at the model's shape"
    wrong_at = {"MD": (8, 32)}


EMULATED, WRONG, CRASHING, UNLAUNCHABLE = EmulatedCudaKernel(), WrongKernel(), CrashingKernel(), UnlaunchableKernel()
RIGHT, KILLED, BUSY, SLOW = RightKernel(), KilledKernel(), EnvironmentErrorKernel(), SlowKernel()
TILED, WRONG_AT_SHAPE = TiledKernel(), WrongAtModelShape()
TEST_KERNELS = (EMULATED, WRONG, CRASHING, UNLAUNCHABLE, RIGHT, KILLED, BUSY, SLOW, TILED, WRONG_AT_SHAPE)
