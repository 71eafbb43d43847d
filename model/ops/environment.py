"""The machine an implementation runs on: device names, driver version, and whether a CUDA build has code for
a GPU's compute capability. Used to key self-check verdicts and to record what ran where."""

from __future__ import annotations

import ctypes
import platform
from functools import lru_cache

import torch


def device_name(device) -> str:
    """ "NVIDIA H100 80GB HBM3", or "CPU (<model name>, <n> threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name}, {torch.get_num_threads()} threads)"


@lru_cache(maxsize=None)
def driver_version() -> str | None:
    """The NVIDIA driver ("550.54.15, CUDA 12.4"), None without one."""
    release = None
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar 5 ..."
            words = f.readline().split()
            release = next((w for w in words if w[:1].isdigit() and "." in w), None)
    except OSError:
        pass
    api = None
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            api = f"CUDA {version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    parts = [p for p in (release, api) if p]
    return ", ".join(parts) if parts else None


def versions() -> dict:
    """torch, CUDA (of the torch build), Triton and driver versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "driver": driver_version(),
    }


def _arch_number(arch: str) -> tuple[int, int, str]:
    """ "9.0a" -> (9, 0, "a"); "8.6" -> (8, 6, "")."""
    major, _, minor = arch.partition(".")
    suffix = minor.lstrip("0123456789")
    return int(major), int(minor[: len(minor) - len(suffix)]), suffix


def runs_on(arch_list: list[str], capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether a CUDA library built for ``arch_list`` ("8.0", "9.0+PTX", "9.0a") has code for a GPU of compute
    ``capability``, and which: machine code runs on GPUs of its major version and an equal or newer minor one
    (the "a" variants only on their exact one); PTX is compiled by the driver for equal or newer GPUs."""
    cap = tuple(capability)
    for arch in arch_list:
        major, minor, suffix = _arch_number(arch.removesuffix("+PTX"))
        if suffix == "a" and (major, minor) == cap or suffix != "a" and major == cap[0] and minor <= cap[1]:
            return True, f"machine code for sm_{major}{minor}{suffix}"
    for arch in arch_list:
        major, minor, suffix = _arch_number(arch.removesuffix("+PTX"))
        if arch.endswith("+PTX") and (major, minor) <= cap:
            return True, f"PTX of compute_{major}{minor}{suffix}, compiled by the driver at load"
    return False, (
        f"the build has code for {';'.join(arch_list)} only, this GPU is sm_{cap[0]}{cap[1]}: rebuild with "
        f'python -m model.ops.build --cuda --arch "{";".join(arch_list)};{cap[0]}.{cap[1]}"'
    )
