#!/usr/bin/env bash
# The test command (README, .ci/run): install, lint, run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
# DeepSpeed JIT-builds a small CPU comm op once per machine; keep it in a stable cache.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
python3 -m ruff check .
python3 -m pytest -q -p no:warnings "$@"
