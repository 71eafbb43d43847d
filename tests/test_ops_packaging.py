"""A non-editable install ships the kernel sources: a wheel built from this checkout, installed into a fresh
virtual environment (torch from the system site-packages, nothing downloaded) and imported from another
folder, compiles and runs the CPU kernel and its host emulator from the installed package.

Slow: builds a wheel and compiles the CPU library (a minute or two).
"""

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

USE_INSTALLED = """
import sys, torch
import model.ops as ops
from model.ops import build, ms_deform_attn, ms_deform_attn_pytorch
from model.ops.testing import CASES, make_inputs
venv = sys.argv[1]
assert ops.__file__.startswith(venv), ops.__file__
assert str(build.CSRC).startswith(venv) and (build.CSRC / "ms_deform_attn_cpu.cpp").exists(), build.CSRC
inputs = make_inputs(CASES[3][1], M=2, D=32, P=4)
expected = ms_deform_attn_pytorch(*inputs)
torch.testing.assert_close(ms_deform_attn(*inputs, impl="cpu"), expected)
torch.testing.assert_close(torch.ops.deformable_detr.ms_deform_attn_emulated(*inputs), expected)
info = ops.implementation_info("cpu", torch.float64)
assert info["impl"] == "cpu", info
print("installed kernel ok:", info["build"])
"""


@pytest.mark.slow
def test_wheel_ships_and_builds_the_kernel(tmp_path):
    source = tmp_path / "source"  # a copy: building a wheel writes build/ and *.egg-info/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("model", "harness"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            "-q",
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch and the other dependencies from this interpreter's environment, behind the venv's own packages.
    # Not --system-site-packages: inside a venv or a conda environment that means the base Python's, which
    # has no torch.
    venv_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(venv_site) / "test-environment.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, capture_output=True
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DEFORMABLE_DETR_OPS_CACHE": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        [python, "-c", USE_INSTALLED, str(venv)], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "installed kernel ok" in result.stdout
    assert "compiling the cpu kernel" in result.stderr  # from the installed sources, into the given cache
