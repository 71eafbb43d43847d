"""The CUDA sources compile (no GPU needed): runs `python -m model.ops.build --cuda` where a CUDA toolkit is
installed, for the default architectures (sm_75, sm_80, sm_90 and PTX with CUDA 13, which no longer compiles
for sm_70; sm_70 too with CUDA 12).

The first run compiles for several minutes; the library is cached (DEFORMABLE_DETR_OPS_CACHE), so later
runs, and the GPU tests, reuse it.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.ops import build

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.version.cuda is None, reason="this PyTorch has no CUDA support")
@pytest.mark.skipif(build._find_cuda_home() is None, reason="no CUDA toolkit (nvcc) installed")
@pytest.mark.slow
def test_cuda_sources_compile():
    # a separate process: it loads the library it builds, which this process need not do
    result = subprocess.run(
        [sys.executable, "-m", "model.ops.build", "--cuda"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    for arch in build.default_cuda_arch_list():
        number = arch.removesuffix("+PTX").replace(".", "")
        assert f"code=sm_{number}" in result.stdout


KERNEL = """
#include "ms_deform_attn_atomic.h"
__global__ void add(float* dst, const float* src) {
  float v[4] = {src[0], src[1], src[2], src[3]};
  deformable_detr::atomic_add_pack<4>(dst + 4 * threadIdx.x, v);
}
"""


@pytest.mark.skipif(build._find_cuda_home() is None, reason="no CUDA toolkit (nvcc) installed")
@pytest.mark.parametrize(
    "arch,cuda_version,vector",
    [
        ("sm_90", None, True),  # this toolkit (CUDA >= 12.1): one atom.global.add.v4.f32 per pack
        ("sm_90", "12010", True),  # CUDA 12.1, which introduced the float4 atomicAdd
        ("sm_90", "12000", False),  # CUDA 12.0: the scalar loop
        ("sm_90", "11080", False),  # CUDA 11.8 (torch's cu118 builds): the scalar loop
        ("sm_80", None, False),  # no vector atomics before sm_90
    ],
)
def test_vector_atomic_only_where_the_toolkit_has_it(tmp_path, arch, cuda_version, vector):
    """The grad_value atomics of the CUDA kernel (ms_deform_attn_atomic.h) compiled to PTX as an older toolkit
    would (DEFORMABLE_DETR_CUDA_VERSION stands in for its CUDART_VERSION): float4 atomics on sm_90 with CUDA 12.1
    and newer, four scalar ones otherwise (seconds: a kernel without torch's headers)."""
    source = tmp_path / "atomic.cu"
    source.write_text(KERNEL)
    nvcc = str(Path(build._find_cuda_home()) / "bin" / "nvcc")
    command = [nvcc, f"-arch={arch}", "--ptx", f"-I{build.CSRC}", str(source), "-o", str(tmp_path / "out.ptx")]
    if cuda_version:
        command.insert(1, f"-DDEFORMABLE_DETR_CUDA_VERSION={cuda_version}")
    subprocess.run(command, check=True, capture_output=True)
    ptx = (tmp_path / "out.ptx").read_text()
    atomics = re.findall(r"(?:atom|red)\.global\.add((?:\.v\d)?)\.f32", ptx)
    assert atomics == ([".v4"] if vector else [""] * 4)
