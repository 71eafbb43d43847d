"""The implementations of multi-scale deformable attention, and the order in which ``impl="auto"`` tries them.

    CHAINS = {"cuda": ("cuda", "triton", "pytorch"), "cpu": ("cpu", "pytorch")}

An implementation says on which devices and dtypes it runs, how it is made ready on a device (built, loaded,
imported; checked against the GPU's compute capability), whether it must pass the self-check
(:mod:`model.ops.selfcheck`) before it is trusted there, and what identifies its build (the key of the cached
verdict). A new implementation is one subclass and one entry in ``REGISTRY`` (and in ``CHAINS`` for ``auto``).

Implementations are named in a child process by their registry name or by ``"module:attribute"`` (how tests
hand the self-check an implementation of their own).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from pathlib import Path

import torch

from . import build
from .environment import runs_on
from .reference import ms_deform_attn_pytorch

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Errors of a kernel that did not start (nothing ran, the CUDA context is intact): auto moves on to the next
# implementation. Errors of a kernel that ran (an illegal address) are the self-check's to find.
LAUNCH_FAILURES = (
    "no kernel image is available",
    "invalid device function",
    "unsupported toolchain",
    "PTX JIT compil",
    "too many resources requested for launch",
    "named symbol not found",
)


class Unavailable(RuntimeError):
    """An implementation cannot run on a device (not built, no code for its architecture, not installed)."""


class Implementation:
    name: str
    description: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    needs_self_check = False
    spec: str  # how a child process finds it: a REGISTRY name or "module:attribute"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.device_types and dtype in self.dtypes

    def prepare(self, device: torch.device) -> None:
        """Build / load / import what is needed to run on ``device``; raise :class:`Unavailable` (or the build's
        own error) when it cannot. Nothing is launched."""

    def availability_key(self, device: torch.device) -> tuple:
        """What :meth:`prepare`'s outcome depends on: the dispatcher remembers it per key, once per process."""
        return (self.name, device)

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
        """The op; ``softmax``: attention_weights are logits, normalised over the L * P points inside."""
        raise NotImplementedError

    def build_id(self) -> str:
        """Changes whenever the code that runs changes: part of the self-check verdict's key."""
        return self.name

    def verdict_dir(self) -> Path:
        return build.cache_dir() / "self_check" / self.build_id()

    def launch_failure(self, error: BaseException) -> bool:
        return any(text in str(error) for text in LAUNCH_FAILURES)

    def launch_configs(self, D: int, dtype: torch.dtype, device: torch.device) -> list[dict | None]:
        """The launch configurations (tile sizes...) this implementation picks on ``device`` for D channels in
        ``dtype`` at the sizes of a training; the self-check runs each, forced by :meth:`launch_context`. One
        (None: the implementation's own choice) where the choice does not depend on the problem size."""
        return [None]

    def launch_context(self, config: dict | None):
        """A context in which launches use ``config`` (one of :meth:`launch_configs`)."""
        return contextlib.nullcontext()


class CompiledKernel(Implementation):
    """The compiled dispatcher op ``deformable_detr::ms_deform_attn`` of one device type (model/ops/csrc/)."""

    def __init__(self, device_type: str, dtypes: tuple[torch.dtype, ...]):
        self.name = self.spec = device_type
        self.device_types = (device_type,)
        self.dtypes = dtypes
        self.needs_self_check = device_type == "cuda"
        self.description = f"compiled {device_type} kernel"

    def prepare(self, device):
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        build.load(self.name, capability=capability)  # BuildError: not built and cannot be
        if device.type == "cuda":
            ok, reason = runs_on(build.spec_arch_list(self._spec()), capability)
            if not ok:
                raise Unavailable(f"{torch.cuda.get_device_name(device)}: {reason}")

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
        return torch.ops.deformable_detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax
        )

    def _spec(self) -> build.ExtensionSpec:
        """The library loaded in this process (a build made ahead of time for the GPU), else the default one."""
        return build.loaded_spec(self.name) or build.extension_spec(self.name)

    def build_id(self):
        return self._spec().name

    def verdict_dir(self):
        return self._spec().directory / "self_check"


class Reference(Implementation):
    name = spec = "pytorch"
    description = "pure-PyTorch reference (grid_sample)"
    device_types = ("cpu", "cuda", "mps", "xpu")

    def supports(self, device, dtype):
        return dtype.is_floating_point

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax
        )


class TritonKernel(Implementation):
    """The Triton kernels of :mod:`model.ops.triton_kernel` (forward / backward with the compiled ops' arguments);
    on CPU tensors too when TRITON_INTERPRET=1 (Triton's interpreter)."""

    name = spec = "triton"
    description = "Triton kernel"
    device_types = ("cuda", "cpu")
    needs_self_check = True
    MODULES = ("triton_kernel.py", "triton_jit.py")

    def availability_key(self, device):
        # on CPU tensors the kernels run only in Triton's interpreter, which TRITON_INTERPRET switches on
        interpreted = os.environ.get("TRITON_INTERPRET", "") if device.type == "cpu" else ""
        return (self.name, device, interpreted)

    def prepare(self, device):
        try:
            from . import triton_kernel
        except ImportError as e:
            raise Unavailable(f"the Triton implementation cannot be imported: {e}") from e
        ok, reason = triton_kernel.available(device)
        if not ok:
            raise Unavailable(reason)

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax=False):
        # the dispatcher op's Triton twin (model/ops/library.py): the same fake implementation (torch.compile sees
        # an opaque op), autograd and FLOP handle; its kernels are registered by importing triton_kernel (prepare)
        return torch.ops.deformable_detr.ms_deform_attn_triton(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax
        )

    def launch_configs(self, D, dtype, device):
        from . import triton_kernel

        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        return triton_kernel.launch_configs(D, dtype, num_sms)

    def launch_context(self, config):
        from . import triton_kernel

        return triton_kernel.forced_blocks(config)

    def build_id(self):
        h = hashlib.sha256()
        for name in self.MODULES:
            path = Path(__file__).with_name(name)
            h.update(path.read_bytes() if path.exists() else b"")
        try:
            import triton

            version = triton.__version__
        except ImportError:
            version = "none"
        return f"triton_{version}_{h.hexdigest()[:12]}"


REGISTRY: dict[str, Implementation] = {
    "cuda": CompiledKernel("cuda", ALL_DTYPES),
    "triton": TritonKernel(),
    "cpu": CompiledKernel("cpu", (torch.float32, torch.float64)),
    "pytorch": Reference(),
}
# What impl="auto" tries, in order, on tensors of each device type: the first that is available, supports the
# dtype and passes its self-check runs.
CHAINS: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "pytorch"), "cpu": ("cpu", "pytorch")}
DEFAULT_CHAIN = ("pytorch",)


def get(spec: str) -> Implementation:
    """An implementation by registry name or ``"module:attribute"``."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    module, sep, attribute = spec.partition(":")
    if not sep:
        raise ValueError(f"unknown ms_deform_attn implementation {spec!r}; choose one of {('auto',) + tuple(REGISTRY)}")
    return getattr(importlib.import_module(module), attribute)


def chain(device_type: str) -> tuple[str, ...]:
    return CHAINS.get(device_type, DEFAULT_CHAIN)
