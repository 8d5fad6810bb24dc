"""DeepSpeed ZeRO 1/2/3 with DP=2, and TP=2 x DP=2 with ZeRO 1/2/3, follow the single-process loss
trajectory (fp32). Gradient clipping is active in every step (grad_clip 0.1 < the gradient norm), which is where
DeepSpeed's ZeRO-2/3 + TP combination used to go wrong (replicated parameters counted once per TP rank);
with deepspeed 0.19.8 and megatron-core's `tensor_model_parallel` attributes it is exact, so it is supported.

ZeRO-1 (the default stage) at DP=2 and at TP=2 x DP=2, with the same clipping, is proven equal to one process by
tests/test_l2e_training.py (layouts dp2_acc2 and tp2_dp2_acc2, with L2E and MEmeL on top): here only stages 2 and
3, which partition gradients and parameters."""

from __future__ import annotations

import pytest

from tests.conftest import pretrain_losses, small_run_overrides
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow  # 2- and 4-rank training runs (the fast tier's: tests/test_l2e_training.py)

STEPS = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> list[float]:
    out = tmp_path_factory.mktemp("ref")
    losses = run_distributed(pretrain_losses, 1, small_run_overrides(out, data_cache))[0]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0]  # it trains
    return losses


def _assert_same(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference)
    for step, (got, want) in enumerate(zip(losses, reference), start=1):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), f"step {step}: {got} != {want}"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_dp2_matches_single_process(stage, reference, tmp_path, data_cache):
    overrides = small_run_overrides(tmp_path, data_cache, **{"deepspeed.zero_stage": stage})
    per_rank = run_distributed(pretrain_losses, 2, overrides)
    _assert_same(per_rank[0], reference)


@pytest.mark.parametrize("stage", [2, 3])
def test_tp2_dp2_matches_single_process(stage, reference, tmp_path, data_cache):
    overrides = small_run_overrides(
        tmp_path, data_cache, **{"deepspeed.zero_stage": stage, "parallel.tensor_parallel": 2}
    )
    per_rank = run_distributed(pretrain_losses, 4, overrides)
    _assert_same(per_rank[0], reference)
