#!/usr/bin/env bash
# The test command (README, .ci/run): install everything the tests need (Python packages and the system
# tools: Open MPI, Slurm, munge, PMIx), lint, run the whole suite on CPU. Nothing may be skipped for a
# missing tool: L2E_NO_SKIPS=1 makes any skipped test fail the run (tests/conftest.py).
#
#   bash scripts/test.sh                  everything (CI): every test, the slow ones included
#   bash scripts/test.sh --fast           the fast tier (-m "not slow and not gpu"): unit tests of every package, one
#                                         multi-process equality test, one resume; a few minutes on 2 cores
#   bash scripts/test.sh [--fast] ARGS    ARGS go to pytest (a file, -k EXPR, -x, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
args=()
for arg in "$@"; do
  if [[ $arg == --fast ]]; then
    tier=(-m "not slow and not gpu")  # replaces pyproject's -m 'not gpu' (the last -m wins), so keep it
  else
    args+=("$arg")
  fi
done
bash scripts/setup.sh
bash scripts/local_slurm.sh install
export OMP_NUM_THREADS=1 L2E_NO_SKIPS=1
python3 -m ruff check .
python3 -m pytest -q -p no:warnings --durations=30 ${tier[@]+"${tier[@]}"} ${args[@]+"${args[@]}"}  # the slowest 30: where the time goes
