"""FKR wired into real training: the trainer hands each micro-batch's per-token feature labels (the data's
`feature_labels`, shifted like the inputs) to L2E, so a DP=2 x accumulation-2 run logs the same FKR figures and
ends in the same L2E state as one process taking the whole global batch as one micro-batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import pretrain_result, small_run_overrides
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
STEPS = 6
FKR_RUN = {
    "l2e.method": "l2e",
    "l2e.fkr": True,
    "l2e.num_features": 0,  # the data's label count
    "l2e.forget_steps": 1,
    "l2e.late_start": 1,
    "train.global_batch_size": GLOBAL_BATCH,
    "train.train_iters": STEPS,
}


def _fkr_figures(out: Path) -> dict[tuple[int, str], float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in records for k, v in r.items() if k.startswith("l2e/") and k.endswith("/fkr")}


def test_fkr_figures_and_state_match_one_process_on_dp2(tmp_path, data_cache):
    reference_dir, split_dir = tmp_path / "one", tmp_path / "dp2"
    reference = run_distributed(pretrain_result, 1, small_run_overrides(
        reference_dir, data_cache, **FKR_RUN, **{"train.micro_batch_size": GLOBAL_BATCH}))[0]
    split = run_distributed(pretrain_result, 2, small_run_overrides(
        split_dir, data_cache, **FKR_RUN, **{"train.micro_batch_size": 2}))

    want = _fkr_figures(reference_dir)
    # FKR is logged for every inhibited layer once thresholds select pairs: labels reached the engine.
    assert len({key for _, key in want}) >= 2 and len(want) >= 2 * (STEPS - 2), want
    assert all(0.0 <= value <= 1.0 and math.isfinite(value) for value in want.values()), want
    got = _fkr_figures(split_dir)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for result in split:
        assert result.losses == pytest.approx(reference.losses, rel=1e-5)
        for layer, state in reference.l2e_state["layers"].items():
            for name, value in state.items():
                mine = result.l2e_state["layers"][layer][name]
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(mine, value, rtol=1e-4, atol=1e-6, msg=name)
                else:
                    assert mine == value, name
