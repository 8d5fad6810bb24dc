"""End to end: L2E on vs off, same seed and data. With L2E, fewer held-out (token, neuron) pairs of the
inhibited layers score above a fixed reference (each run measured with its own final statistics), and the LM
loss stays within 2%. "Off" tracks statistics with lambda = 0, which trains exactly like method none."""

from __future__ import annotations

import pytest

from tests.conftest import pretrain_result, small_run_overrides
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow  # a training run long enough for L2E to act

SHAPE = {
    "l2e.method": "l2e",
    "train.train_iters": 80,
    "train.seq_length": 64,
    "model.max_position_embeddings": 64,
    "train.global_batch_size": 16,
    "train.micro_batch_size": 8,
    "train.log_interval": 10,
    "train.eval_interval": 80,
    "train.eval_iters": 8,
    "optimizer.grad_clip": 1.0,
    "optimizer.lr": 2e-3,
}


def _run(tmp_path, data_cache, **extra):
    overrides = small_run_overrides(tmp_path, data_cache, **{**SHAPE, **extra})
    return run_distributed(pretrain_result, 1, overrides)[0]


def test_l2e_lowers_heldout_monosemantic_fraction(tmp_path, data_cache):
    off = _run(tmp_path / "off", data_cache, **{"l2e.reg_lambda": 0.0})
    none = _run(tmp_path / "none", data_cache, **{"l2e.method": "none"})
    on = _run(tmp_path / "on", data_cache, **{"l2e.reg_lambda": 4e-6})
    assert off.losses == none.losses  # statistics-only tracking does not perturb training
    frac = {
        name: sum(v for k, v in r.valid_metrics.items() if k.endswith("frac_above_ref"))
        for name, r in (("off", off), ("on", on))
    }
    assert frac["off"] > 0
    assert frac["on"] < 0.8 * frac["off"], frac
    assert on.valid_metrics["valid/loss"] == pytest.approx(off.valid_metrics["valid/loss"], rel=0.02)
