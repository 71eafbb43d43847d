"""tools/gpu_check.py without a GPU: it says so and exits non-zero, writing nothing."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run the checks")
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "gpu_check: no GPU" in result.stderr and "nothing was checked" in result.stderr
    assert not out.exists()
