import os
import sys
from pathlib import Path

import pytest

# tests import their shared helpers (tests/golden.py) and the project from a plain checkout
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
os.environ.setdefault("MPLBACKEND", "Agg")

# the localhost SLURM cluster fixture (slurm_cluster), for the tests that need one
pytest_plugins = ["conftest_slurm"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    results that do not depend on the machine's core count, and no oversubscription beside other tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Set by .ci/run: where the system packages were installed (tools/install_system_packages.sh), a test that
# finds them missing fails instead of skipping, so CI cannot pass by skipping the SLURM and LaTeX tests.
REQUIRE_SYSTEM = "HARNESS_TESTS_REQUIRE_SYSTEM"


def missing_system_package(what: str) -> None:
    """Skip (fail under HARNESS_TESTS_REQUIRE_SYSTEM=1) a test whose system package ``what`` is missing."""
    reason = f"{what} is missing: install it with `bash tools/install_system_packages.sh` (as root)"
    if os.environ.get(REQUIRE_SYSTEM) == "1":
        pytest.fail(f"{reason}; {REQUIRE_SYSTEM}=1 requires it", pytrace=False)
    pytest.skip(reason)
