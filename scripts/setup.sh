#!/usr/bin/env bash
# Install l2e-dist and its pinned dependencies into the current Python (3.11). Idempotent: fast when done.
# torch is installed first and pinned exactly: on the CPU machines torch==2.13.0 is a local CPU wheel, and
# any other version (or an unpinned torch pulled in by another package) downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 is required (megatron-core 0.16 + the CPU torch wheel); found $("$PY" --version)" >&2
  exit 1
fi
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c 'import l2e_dist, deepspeed, megatron.core, pytest, ruff, lm_eval' 2>/dev/null \
   || [ pyproject.toml -nt .cache/.installed ]; then
  "$PY" -m pip install -q -e ".[dev,eval]"
  mkdir -p .cache && touch .cache/.installed
fi
# DeepSpeed JIT-compiles a small shared-memory comm op on first use on CPU (~45 s); do it once here so that
# the first training run does not pay for it (cached under ~/.cache/torch_extensions).
"$PY" - <<'PYEOF' >/dev/null 2>&1 || echo "setup: warning: could not pre-build DeepSpeed's CPU comm op (it will build on first use)" >&2
import warnings
warnings.filterwarnings("ignore")
from deepspeed.comm.torch import build_shm_op
build_shm_op()
PYEOF
# Likewise L2E's fused CPU threshold scan (l2e_dist/l2e/cpu_scan.py, ~1 min to build; the eager path runs
# without it).
"$PY" - <<'PYEOF' >/dev/null 2>&1 || echo "setup: warning: could not pre-build L2E's CPU scan kernel (it will build on first use)" >&2
import sys
from l2e_dist.l2e import cpu_scan
sys.exit(0 if cpu_scan.available() else 1)
PYEOF
