"""The CUDA sources compile (no GPU needed): runs `python -m model.ops.build --cuda` where a CUDA toolkit is
installed, for the default architectures (sm_75, sm_80, sm_90 and PTX with CUDA 13, which no longer compiles
for sm_70; sm_70 too with CUDA 12).

The first run compiles for several minutes; the library is cached (DEFORMABLE_DETR_OPS_CACHE), so later
runs, and the GPU tests, reuse it.
"""
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
    result = subprocess.run([sys.executable, "-m", "model.ops.build", "--cuda"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    for arch in build.default_cuda_arch_list():
        number = arch.removesuffix("+PTX").replace(".", "")
        assert f"code=sm_{number}" in result.stdout
