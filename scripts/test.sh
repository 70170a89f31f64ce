#!/usr/bin/env bash
# Set up (with Slurm and munge for the real-Slurm tests) and run the default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow, or scripts/test.sh tests/test_model.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
if (($#)); then
  exec .venv/bin/python -m pytest "$@"
fi
# Two workers, one test file each at a time: the slow files mostly wait on subprocesses and Slurm.
exec .venv/bin/python -m pytest -m "not slow" -n "${TEST_WORKERS:-2}" --dist loadfile --durations=20
