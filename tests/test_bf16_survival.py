"""benchmarks/l2e_bf16_survival.py measures the layer's OWN regularizer gradient (issue #14 item 5's figure).

The regularizer node passes z through, so the gradient at its output holds the LM loss and the later layers'
terms, not this layer's: an earlier version measured that and reported the last inhibited layer as selecting
nothing. Here the measured g_own must sit exactly on the selected pairs of every inhibited layer, survive bf16
whole when it dominates (lambda 1e-3) and mostly vanish when it is far below bf16's resolution (lambda 1e-14).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _survival(reg_lambda: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "l2e_bf16_survival.py"), "--config", "configs/tiny.yaml",
         "--steps", "14", "--set", f"l2e.reg_lambda={reg_lambda}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["reg_lambda"] == reg_lambda
    return report["layers"]


@pytest.mark.slow
def test_bf16_survival_measures_each_layers_own_regularizer_gradient():
    strong, faint = _survival(1e-3), _survival(1e-14)
    assert sorted(strong) == sorted(faint) == ["1", "2"]  # tiny's two middle layers
    for layers in (strong, faint):
        for row in layers.values():
            assert row["selected"] > 0
            assert row["own_off_selected"] == 0.0
    for row in strong.values():
        assert row["own_over_upstream_on_selected"] > 10
        assert abs(row["surviving_projection"] - 1) < 0.01 and row["changed_pairs"] > 0.99
    for row in faint.values():
        assert row["own_over_upstream_on_selected"] < 1e-6
        assert row["surviving_projection"] < 0.5 and row["changed_pairs"] < 0.5
