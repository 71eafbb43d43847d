import os
import sys
from pathlib import Path

# tests import their shared helpers (tests/golden.py) and the project from a plain checkout
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
os.environ.setdefault("MPLBACKEND", "Agg")

# the localhost SLURM cluster fixture (slurm_cluster), for the tests that need one
pytest_plugins = ["conftest_slurm"]
