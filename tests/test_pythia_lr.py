"""Pythia's learning rate: gpt-neox d36f623 AnnealingLR (optimizer.schedule=annealing_lr_d36f623, which every
configs/pythia-*.yaml uses), against the formula written out here from its source, at the steps that matter;
at a branch; and with fp16-overflow skipped steps, which do not advance the update count (DeepSpeed's engine
does not step the scheduler on a skipped step, as DeeperSpeed did not for Pythia)."""

from __future__ import annotations

import math

import pytest
import torch

from l2e_dist.config import load_config
from l2e_dist.training.optim import build_scheduler, lr_multiplier
from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed

PYTHIA_70M = str(ROOT / "configs" / "pythia-70m.yaml")
TINY = str(ROOT / "configs" / "tiny.yaml")


def pythia_lr(n: int, lr: float, min_lr: float, total: int = 143000, warmup: float = 1430.0) -> float:
    """gpt-neox d36f623 megatron/learning_rates.py get_lr, cosine, n = AnnealingLR.num_iters."""
    n_clipped = min(n, total - warmup)
    if warmup > 0 and n <= warmup:
        return lr * n_clipped / warmup
    decayed = lr / 2.0 * (math.cos(math.pi * (n_clipped - warmup) / total) + 1)
    return max(decayed, min_lr)


STEPS = (0, 1, 1429, 1430, 13000, 50000, 115139, 142999)


def test_every_pythia_config_runs_annealing_lr():
    for path in sorted((ROOT / "configs").glob("pythia-*.yaml")):
        opt = load_config([str(path)]).optimizer
        assert (opt.schedule, opt.decay_style, opt.lr_decay_iters, opt.warmup_fraction) == (
            "annealing_lr_d36f623", "cosine", 143000, 0.01), path.name


@pytest.mark.parametrize("step", STEPS)
def test_pythia_lr_is_annealing_lr_d36f623(step):
    cfg = load_config([PYTHIA_70M])
    lr, min_lr = cfg.optimizer.lr, cfg.optimizer.lr * cfg.optimizer.min_lr_ratio
    assert (lr, min_lr) == pytest.approx((1e-3, 1e-4))
    assert lr * lr_multiplier(step, cfg) == pytest.approx(pythia_lr(step, lr, min_lr), rel=1e-12, abs=1e-18)


def test_known_values_of_the_formula():
    """Spot values by hand: the first update has lr 0, the peak at the end of the warm-up, min_lr from update 115139 on."""
    cfg = load_config([PYTHIA_70M])
    lr = cfg.optimizer.lr
    assert lr * lr_multiplier(0, cfg) == 0.0
    assert lr * lr_multiplier(1, cfg) == pytest.approx(1e-3 / 1430)
    assert lr * lr_multiplier(1430, cfg) == pytest.approx(1e-3)
    assert lr * lr_multiplier(1431, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 143000)))
    # cos(pi x) = -0.8 at x = 0.795167...: the cosine reaches min_lr (0.1 lr) at n = w + 0.795167 T
    crossing = 1430 + math.acos(-0.8) / math.pi * 143000
    assert 115138 < crossing < 115139
    assert lr_multiplier(115138, cfg) > 0.1 and lr_multiplier(115139, cfg) == 0.1
    assert lr_multiplier(142999, cfg) == 0.1


def test_the_later_formula_stays_available_and_differs_as_documented():
    pythia = load_config([PYTHIA_70M])
    later = load_config([PYTHIA_70M], ["optimizer.schedule=warmup_decay"])
    ratio = {n: lr_multiplier(n, later) / lr_multiplier(n, pythia) for n in (50000, 71500, 100000, 115000)}
    assert ratio[50000] == pytest.approx(1.03, abs=0.01)
    assert ratio[71500] == pytest.approx(1.08, abs=0.01)
    assert ratio[100000] == pytest.approx(1.32, abs=0.01)
    assert ratio[115000] == pytest.approx(1.82, abs=0.01)
    assert lr_multiplier(0, later) == pytest.approx(1 / 1430)  # its warm-up: (n + 1) / w


@pytest.mark.parametrize("branch", [1, 1429, 1430, 13000, 115139])
def test_a_branch_starts_at_the_formula_for_n_equal_branch_step(branch):
    cfg = load_config([PYTHIA_70M], [f"train.branch_step={branch}", "train.init_from=ckpt"])
    lr, min_lr = cfg.optimizer.lr, cfg.optimizer.lr * cfg.optimizer.min_lr_ratio
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = build_scheduler(optimizer, cfg)
    for n in range(branch, branch + 3):  # the lr of the branch's first three updates
        assert optimizer.param_groups[0]["lr"] == pytest.approx(pythia_lr(n, lr, min_lr), rel=1e-12), n
        optimizer.step()
        scheduler.step()


def test_branch_rewarmup_multiplies_annealing_lr():
    """optimizer.branch_warmup_iters ramps the schedule's own value over the branch's first updates."""
    cfg = load_config([PYTHIA_70M], ["train.branch_step=13000", "train.init_from=ckpt",
                                     "optimizer.branch_warmup_iters=4"])
    base = load_config([PYTHIA_70M])
    for offset, ramp in enumerate((0.25, 0.5, 0.75, 1.0, 1.0)):
        step = 13000 + offset
        assert lr_multiplier(step, cfg) == pytest.approx(ramp * lr_multiplier(step, base), rel=1e-12)


def _lr_per_update(overrides: list[str], nan_steps: list[int]) -> dict:
    """pretrain() in fp16 whose loss is NaN on the given (1-based) steps (DeepSpeed skips their update); the lr
    in the optimizer when each step's first micro-batch runs, and which steps DeepSpeed applied."""
    from deepspeed.accelerator import get_accelerator

    import l2e_dist.training.trainer as trainer
    from l2e_dist.model import gpt_neox
    from tests.conftest import pretrain_result

    type(get_accelerator()).is_fp16_supported = lambda self: True  # this spawned worker only (see test_gpu_path)
    lrs: list[float] = []
    applied: list[bool] = []
    calls = {"micro": 0}
    gas = 4  # global 8 / micro 2 at DP 1
    original_micro, original_end = trainer.train_micro_batch, trainer.end_l2e_step
    forward = gpt_neox.GPTNeoX.forward

    def recording_micro(engine, inhibitor, tokens, *rest):
        if calls["micro"] % gas == 0:
            lrs.append(engine.get_lr()[0])
        calls["micro"] += 1
        return original_micro(engine, inhibitor, tokens, *rest)

    def recording_end(engine, inhibitor, step):
        applied.append(engine.was_step_applied())
        return original_end(engine, inhibitor, step)

    def forward_with_nan(self, tokens, labels=None, reduction="none"):
        out = forward(self, tokens, labels, reduction)
        if labels is None or not self.training:
            return out
        step = (calls["micro"] - 1) // gas + 1
        return out * float("nan") if step in nan_steps else out

    trainer.train_micro_batch, trainer.end_l2e_step = recording_micro, recording_end
    gpt_neox.GPTNeoX.forward = forward_with_nan
    pretrain_result(overrides)
    return {"lrs": lrs, "applied": applied}


@pytest.mark.slow
def test_fp16_skipped_steps_do_not_advance_the_update_count(tmp_path, data_cache):
    nan_steps = [3, 4]
    overrides = small_run_overrides(tmp_path / "run", data_cache, **{
        "train.train_iters": 8, "deepspeed.precision": "fp16", "deepspeed.initial_scale_power": 8,
        "train.nonfinite_patience": 5, "optimizer.schedule": "annealing_lr_d36f623",
        "optimizer.lr_decay_iters": 10, "optimizer.warmup_fraction": 0.4, "optimizer.min_lr_ratio": 0.1,
        "optimizer.lr": 1e-3})
    (run,) = run_distributed(_lr_per_update, 1, overrides, nan_steps)
    assert run["applied"] == [step not in nan_steps for step in range(1, 9)]
    updates_before = [sum(run["applied"][:i]) for i in range(8)]  # n when step i + 1 runs
    assert updates_before == [0, 1, 2, 2, 2, 3, 4, 5]
    expected = [pythia_lr(n, 1e-3, 1e-4, total=10, warmup=4.0) for n in updates_before]
    assert run["lrs"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
