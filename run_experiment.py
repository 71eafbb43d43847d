#!/usr/bin/env python3
"""Regenerate the Deformable DETR paper's tables: ``python run_experiment.py experiments/table2.yaml [--smoke]``."""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
