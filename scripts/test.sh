#!/usr/bin/env bash
# The test command (README, .ci/run): install everything the tests need (Python packages and the system
# tools: Open MPI, Slurm, munge, PMIx), lint, run the whole suite on CPU. Nothing may be skipped for a
# missing tool: L2E_NO_SKIPS=1 makes any skipped test fail the run (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/local_slurm.sh install
export OMP_NUM_THREADS=1 L2E_NO_SKIPS=1
python3 -m ruff check .
python3 -m pytest -q -p no:warnings --durations=30 "$@"  # the slowest 30: where the suite's time goes
