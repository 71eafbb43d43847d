#!/usr/bin/env bash
# The test command (README "Two commands"; .ci/run runs it in a fresh virtual environment): install the
# project with its dev and hf extras (the comparison with transformers) into the active Python environment,
# check lint and format, run every test.
#   bash tools/test.sh                 everything (about 25 minutes on 2 cores)
#   bash tools/test.sh -m "not slow"   the quick loop (pytest arguments pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev,hf]"
ruff check .
ruff format --check .
python -m pytest -q --durations=20 "$@"
