"""Compiling and loading the CPU and CUDA kernels of ``deformable_detr::ms_deform_attn`` (sources in model/ops/csrc/,
shipped with the package).

Ahead of time (on a login node, once per environment; a cluster job then only loads the libraries)::

    python -m model.ops.build                        # CPU kernel, and the CUDA kernel when nvcc is found
    python -m model.ops.build --cpu                  # CPU kernel only
    python -m model.ops.build --cuda --arch "7.5;8.0;9.0"   # CUDA kernel for these GPUs (no GPU needed)

Otherwise the kernels are compiled on first use. Libraries go to ``$DEFORMABLE_DETR_OPS_CACHE``
(default ``${XDG_CACHE_HOME:-~/.cache}/deformable_detr/ops``) in a folder named by the hash of the
sources, the flags, the Python and PyTorch versions: a changed source builds a new library, an unchanged
one is loaded without running a compiler. A file lock serialises the build when several processes (SLURM
tasks) start at once; the others wait and then load the result. ``DEFORMABLE_DETR_OPS_NO_BUILD=1`` forbids
compiling (a missing library is then an error, which ``impl="auto"`` turns into the pure-PyTorch fallback).

CUDA architectures: ``--arch``, else ``TORCH_CUDA_ARCH_LIST``, else 7.0 (where the CUDA toolkit still
supports it: CUDA 13 dropped sm_70), 7.5, 8.0 and 9.0 with PTX for 9.0, which newer GPUs compile at load. At run
time a library built ahead of time with ``--arch`` is found by the GPU's compute capability
(:func:`find_prebuilt`: same sources, flags, torch and Python, architectures that run on the GPU), whatever the
job's ``TORCH_CUDA_ARCH_LIST``. Where the cache folder or its locks cannot be written, a build runs unlocked (or
fails with a BuildError that names the folder), and loading a built library needs no lock.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("ms_deform_attn.h", "ms_deform_attn_group.h", "ms_deform_attn_launch.h", "ms_deform_attn_atomic.h")
# The CPU library also holds the host emulator of the CUDA kernels (the test-only op ms_deform_attn_emulated).
SOURCES = {"cpu": ("ms_deform_attn_cpu.cpp", "ms_deform_attn_emulator.cpp"), "cuda": ("ms_deform_attn_cuda.cu",)}
BUILD_MINUTES = {"cpu": "about a minute", "cuda": "several minutes"}
DEVICE_TYPES = tuple(SOURCES)

CPU_CFLAGS = ("-O3", "-fopenmp")  # at::parallel_for is OpenMP code inlined from the ATen headers
CPU_LDFLAGS = ("-fopenmp",)
CUDA_CFLAGS = ("-O3",)
CUDA_NVCC_FLAGS = ("-O3", "-lineinfo")


class BuildError(RuntimeError):
    """A kernel library could not be built or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("DEFORMABLE_DETR_OPS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "deformable_detr" / "ops"


def default_cuda_arch_list() -> list[str]:
    """Compute capabilities compiled when neither --arch nor TORCH_CUDA_ARCH_LIST says otherwise."""
    archs = ["7.0", "7.5", "8.0", "9.0+PTX"]
    cuda = torch.version.cuda
    if cuda is not None and int(cuda.split(".")[0]) >= 13:
        archs.remove("7.0")  # CUDA 13 compiles for compute capability 7.5 and newer only
    return archs


def cuda_arch_list(arch_list: list[str] | None = None) -> list[str]:
    """The CUDA architectures a build is for: ``arch_list``, else TORCH_CUDA_ARCH_LIST, else the default."""
    if arch_list is not None:
        return arch_list
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return parse_arch_list(env) if env else default_cuda_arch_list()


def parse_arch_list(text: str) -> list[str]:
    archs = [a.strip() for a in text.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    for arch in archs:
        number = arch.removesuffix("+PTX")
        major, _, minor = number.partition(".")
        if not (major.isdigit() and minor.rstrip("af").isdigit()):
            raise ValueError(f"bad CUDA architecture {arch!r} (expected e.g. '8.0' or '9.0+PTX')")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


@dataclass(frozen=True)
class ExtensionSpec:
    """Everything that determines one compiled library."""

    device_type: str
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.sources) + [CSRC / name for name in HEADERS]:
            h.update(path.name.encode())
            h.update(path.read_bytes())
        for part in (self.cflags, self.cuda_cflags, self.ldflags):
            h.update(repr(part).encode())
        h.update(torch.__version__.encode())
        h.update(str(torch.version.cuda).encode())
        h.update((sysconfig.get_config_var("SOABI") or sys.version).encode())
        return h.hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"deformable_detr_{self.device_type}_{self.digest}"

    @property
    def directory(self) -> Path:
        return cache_dir() / self.name


def extension_spec(device_type: str, arch_list: list[str] | None = None) -> ExtensionSpec:
    if device_type == "cpu":
        return ExtensionSpec("cpu", tuple(CSRC / s for s in SOURCES["cpu"]), CPU_CFLAGS, (), CPU_LDFLAGS)
    if device_type == "cuda":
        nvcc_flags = CUDA_NVCC_FLAGS + tuple(gencode_flags(cuda_arch_list(arch_list)))
        return ExtensionSpec("cuda", tuple(CSRC / s for s in SOURCES["cuda"]), CUDA_CFLAGS, nvcc_flags, ())
    raise ValueError(f"no compiled kernel for device type {device_type!r} (have {', '.join(DEVICE_TYPES)})")


@contextlib.contextmanager
def _file_lock(path: Path, waiting_message: str):
    """Holds an exclusive lock on ``path``; prints ``waiting_message`` (stderr) when another process has it."""
    with try_file_lock(path, waiting_message, required=True):
        yield


def _open_lock_file(path: Path):
    """The lock file, opened for flock: for appending (created if missing), else read-only (an existing lock
    file that this user cannot write still takes a lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError:
        if path.exists():
            return open(path, "r")
        raise


@contextlib.contextmanager
def try_file_lock(path: Path, waiting_message: str, *, required: bool = False):
    """An exclusive lock on ``path`` where the filesystem allows one; yields None when locked, else the reason
    why no lock could be taken (a read-only folder, a filesystem without flock: ENOLCK, EOPNOTSUPP), and the
    caller goes on unlocked. ``required``: raise that error instead. Prints ``waiting_message`` (stderr) while
    another process holds the lock (released by the kernel if that process dies)."""
    f, reason = None, None
    try:
        f = _open_lock_file(path)
    except OSError as e:
        if required:
            raise
        reason = f"cannot create the lock file {path}: {e.strerror or e}"
    if f is not None:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(waiting_message, file=sys.stderr, flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            f.close()
            f = None
            if required:
                raise
            reason = f"cannot lock {path} ({e.strerror or e}; this filesystem may not support flock)"
    try:
        yield reason
    finally:
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).resolve().parents[1], Path(nvcc).parents[1]]
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        # /usr/local/bin/nvcc may be a wrapper: the toolkit is where the headers are
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


def _cpp_extension():
    """torch.utils.cpp_extension, with CUDA_HOME pointing at a complete CUDA toolkit when one is found."""
    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch.utils.cpp_extension as cpp_extension

    if cuda_home is not None and cpp_extension.CUDA_HOME != cuda_home:
        # torch guesses CUDA_HOME once, at import, from the first nvcc on PATH (possibly a wrapper script)
        cpp_extension.CUDA_HOME = cuda_home
    return cpp_extension


def _compile(spec: ExtensionSpec, verbose: bool) -> Path:
    if spec.device_type == "cuda":
        if torch.version.cuda is None:
            raise BuildError("this PyTorch build has no CUDA support")
        if _find_cuda_home() is None:
            raise BuildError("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    if shutil.which("ninja") is None:
        raise BuildError("ninja is not installed (pip install ninja)")
    cpp_extension = _cpp_extension()
    try:
        spec.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(
            f"cannot create the build folder {spec.directory}: {e.strerror or e} (set "
            f"DEFORMABLE_DETR_OPS_CACHE to a writable folder)"
        ) from e
    start = time.time()
    try:
        path = cpp_extension.load(
            name=spec.name,
            sources=[str(s) for s in spec.sources],
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags),
            extra_include_paths=[str(CSRC)],
            build_directory=str(spec.directory),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise BuildError(f"building the {spec.device_type} kernel failed: {e}") from e
    info = {
        "name": spec.name,
        "device_type": spec.device_type,
        "library": Path(path).name,
        "cflags": spec.cflags,
        "cuda_cflags": spec.cuda_cflags,
        "arch_list": spec_arch_list(spec) if spec.device_type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build_seconds": round(time.time() - start, 1),
    }
    tmp = spec.directory / "BUILT.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(spec.directory / "BUILT")  # the library is complete once this file exists
    return Path(path)


_LOADED: dict[str, Path] = {}  # spec name -> library path, loaded in this process
_ACTIVE: dict[str, ExtensionSpec] = {}  # device type -> the spec of the library loaded for it in this process


def loaded_spec(device_type: str) -> ExtensionSpec | None:
    """The library of ``device_type`` loaded in this process (None before :func:`load`)."""
    return _ACTIVE.get(device_type)


def _built_info(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "BUILT").read_text())
    except (OSError, ValueError):
        return None


def find_prebuilt(device_type: str, capability: tuple[int, int] | None = None) -> ExtensionSpec | None:
    """A library of ``device_type`` built ahead of time for other architectures (``--arch``) from these very
    sources, flags, torch and Python, with code for a GPU of compute ``capability`` (any, when None): machine
    code preferred to PTX, then the newest build."""
    from .environment import runs_on

    found = []
    root = cache_dir()
    try:
        directories = sorted(
            root.glob(f"deformable_detr_{device_type}_*"), key=lambda p: p.stat().st_mtime, reverse=True
        )
    except OSError:
        return None
    for directory in directories:
        info = _built_info(directory)
        if not info or not isinstance(info.get("arch_list"), list):
            continue
        try:
            spec = extension_spec(device_type, [str(a) for a in info["arch_list"]])
        except ValueError:
            continue
        if spec.name != directory.name:
            continue  # other sources, flags, torch or Python
        if capability is None:
            found.append((0, spec))
            continue
        ok, how = runs_on(spec_arch_list(spec), capability)
        if ok:
            found.append((0 if how.startswith("machine code") else 1, spec))
    found.sort(key=lambda item: item[0])  # stable: newest first within a kind
    return found[0][1] if found else None


def spec_arch_list(spec: ExtensionSpec) -> list[str]:
    """The CUDA architectures of a spec, read back from its -gencode flags ("8.0", "9.0+PTX")."""
    archs: list[str] = []
    for flag in spec.cuda_cflags:
        if not flag.startswith("-gencode=arch=compute_"):
            continue
        compute, _, code = flag.removeprefix("-gencode=arch=compute_").partition(",code=")
        number = f"{compute[:-1]}.{compute[-1]}" if compute[-1:].isdigit() else f"{compute[:-2]}.{compute[-2:]}"
        if code.startswith("sm_"):
            archs.append(number)
        elif code.startswith("compute_"):
            if number in archs:
                archs[archs.index(number)] = number + "+PTX"
            else:
                archs.append(number + "+PTX")
    return archs


def load(
    device_type: str,
    *,
    arch_list: list[str] | None = None,
    verbose: bool = False,
    capability: tuple[int, int] | None = None,
) -> Path:
    """Load the kernel library for ``device_type`` ("cpu" or "cuda"), compiling it first if needed.

    CUDA without an explicit ``arch_list``: the library for the default architectures (TORCH_CUDA_ARCH_LIST or
    the default list) when it is built and has code for a GPU of compute ``capability``, else a library built
    ahead of time with ``--arch`` that has (:func:`find_prebuilt`), else the default one, built now.

    Raises :class:`BuildError` when it can be neither found nor built.
    """
    spec = extension_spec(device_type, arch_list)
    active = _ACTIVE.get(device_type)
    if active is not None and active.name in _LOADED and (arch_list is None or active.name == spec.name):
        return _LOADED[active.name]  # one library per device type and process
    if spec.name in _LOADED:
        return _LOADED[spec.name]
    if device_type == "cuda" and arch_list is None:
        from .environment import runs_on

        default_fits = (spec.directory / "BUILT").exists() and (
            capability is None or runs_on(spec_arch_list(spec), capability)[0]
        )
        if not default_fits:
            prebuilt = find_prebuilt(device_type, capability)
            if prebuilt is not None:
                spec = prebuilt
    path = _load_spec(spec, verbose)
    _LOADED[spec.name] = path
    _ACTIVE[device_type] = spec
    return path


def _load_spec(spec: ExtensionSpec, verbose: bool) -> Path:
    device_type = spec.device_type
    built = spec.directory / "BUILT"
    if built.exists():
        path = spec.directory / json.loads(built.read_text())["library"]
        _load_library(path)
        return path
    if os.environ.get("DEFORMABLE_DETR_OPS_NO_BUILD", "0") not in ("", "0"):
        raise BuildError(
            f"the {device_type} kernel is not built in {cache_dir()} and DEFORMABLE_DETR_OPS_NO_BUILD is set "
            f"(build it with: python -m model.ops.build --{device_type})"
        )
    lock = cache_dir() / f"{spec.name}.lock"
    with try_file_lock(
        lock, f"ms_deform_attn: waiting for another process building the {device_type} kernel {spec.name} (lock {lock})"
    ) as no_lock:
        if built.exists():  # another process built it while this one waited
            path = spec.directory / json.loads(built.read_text())["library"]
            _load_library(path)
            return path
        # A first build is silent for minutes: say what it is, so that a job does not look hung.
        waiting = f"other processes that need it wait on {lock}" if no_lock is None else f"without a lock: {no_lock}"
        print(
            f"ms_deform_attn: compiling the {device_type} kernel {spec.name} into {spec.directory} "
            f"({BUILD_MINUTES[device_type]}, once per environment); {waiting}",
            file=sys.stderr,
            flush=True,
        )
        return _compile(spec, verbose)  # also loads it


def _load_library(path: Path) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise BuildError(f"loading {path} failed: {e}") from e


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.ops.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="build the CPU kernel")
    parser.add_argument("--cuda", action="store_true", help="build the CUDA kernel (needs nvcc, not a GPU)")
    parser.add_argument(
        "--arch",
        help='CUDA compute capabilities, e.g. "7.5;8.0;9.0+PTX" '
        f"(default: TORCH_CUDA_ARCH_LIST or {';'.join(default_cuda_arch_list())})",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    targets = [d for d in DEVICE_TYPES if getattr(args, d)]
    if not targets:
        targets = ["cpu"] + (["cuda"] if torch.version.cuda and _find_cuda_home() else [])
    arch_list = parse_arch_list(args.arch) if args.arch else None
    print(f"cache: {cache_dir()}")
    failed = False
    for device_type in targets:
        spec = extension_spec(device_type, arch_list if device_type == "cuda" else None)
        detail = " ".join(f for f in spec.cuda_cflags if f.startswith("-gencode")) if device_type == "cuda" else ""
        print(f"{device_type}: building {spec.name} {detail}".rstrip(), flush=True)
        start = time.time()
        try:
            path = load(device_type, arch_list=arch_list, verbose=args.verbose)
        except BuildError as e:
            print(f"{device_type}: FAILED\n{e}", file=sys.stderr)
            failed = True
            continue
        print(f"{device_type}: ok ({time.time() - start:.0f} s) {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
