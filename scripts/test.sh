#!/usr/bin/env bash
# Set up (with Slurm and munge for the real-Slurm tests) and run the default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow, or scripts/test.sh tests/test_model.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
if (($#)); then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -m "not slow" --durations=20
