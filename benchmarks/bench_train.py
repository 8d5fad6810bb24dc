"""Training-step benchmark (same as `l2e-bench` / `python -m launcher.bench`; see its --help).

Our step with method none / l2e / memel and transformers' GPTNeoXForCausalLM with a plain torch AdamW loop,
same weights and batch, interleaved in one process; medians, tokens/s, collectives per step, memory, ratios.

    python benchmarks/bench_train.py --config configs/tiny.yaml --rounds 40 --out runs/bench/tiny.json
    python benchmarks/bench_train.py --config configs/pythia-70m.yaml --out runs/bench/70m.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
