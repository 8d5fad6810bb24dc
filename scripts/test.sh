#!/usr/bin/env bash
# The test command (README, .ci/run): install, lint, run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
python3 -m ruff check .
python3 -m pytest -q -p no:warnings "$@"
