"""Optimizer, schedule and the DeepSpeed config the trainer derives from the run config."""

from __future__ import annotations

import pytest
import torch

from l2e_dist.config import load_config
from l2e_dist.training.optim import (
    build_optimizer,
    deepspeed_config,
    effective_zero_stage,
    lr_multiplier,
)
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_fused_adamw_matches_the_reference_update_and_skips_decay_on_biases_and_norms():
    cfg = load_config([TINY], ["optimizer.weight_decay=0.1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    decay, no_decay = fused.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and {p.ndim for p in no_decay["params"]} == {1}
    plain = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.ndim == 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, foreach=False,
    )
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((model, fused), (reference, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model[0].weight, torch.nn.Linear(8, 16).weight)  # it moved


def test_warmup_then_cosine_to_min_lr():
    cfg = load_config([TINY], ["train.train_iters=100", "optimizer.warmup_fraction=0.1",
                               "optimizer.min_lr_ratio=0.1"])
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)  # half-way through the decay
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(("stage", "precision", "dp", "runs"), [
    (1, "fp32", 1, 0), (2, "fp32", 1, 0), (3, "fp32", 1, 3), (1, "fp32", 2, 1), (2, "fp32", 2, 2),
    (1, "bf16", 1, 1), (0, "fp32", 1, 0),
])
def test_zero_stage_that_runs(stage, precision, dp, runs):
    # fp32 at DP=1: stages 1/2 partition nothing and only add a master copy, so the engine runs stage 0.
    cfg = load_config([TINY], [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                               "train.global_batch_size=16", "train.micro_batch_size=8"])
    assert effective_zero_stage(cfg, dp) == runs
    assert deepspeed_config(cfg, dp)["zero_optimization"]["stage"] == runs
