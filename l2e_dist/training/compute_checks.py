"""Start-up checks of the compute settings, before any step runs: the attention backend has a kernel for the run,
the L2E backend suits the device, and a half-precision L2E run whose regularizer gradient would mostly round away
says so.

Why L2E's gradient can vanish in bf16/fp16: the regularizer's backward adds its gradient g_own into the bf16
gradient g_up already at the MLP activation (the LM loss and later layers). A part of g_own smaller than half a
unit in the last place of g_up is rounded off and never reaches the weights. The ratio r = |g_own| / |g_up| on the
selected pairs follows from the loss definitions, up to one model-dependent factor C (the regularizer's derivative
over the per-token LM gradient at the activation): the LM loss is a mean over the step's T tokens, so
|g_up| ~ g_token / T, and the regularizer is lambda x SUM (reduction "sum": |g_own| = lambda x its derivative) or
lambda x MEAN (reduction "mean": / T). Hence r = lambda x T x C ("sum") or lambda x C ("mean"), independent of
DP, accumulation and TP.

C and the ratio at which half of the term survives come from `benchmarks/l2e_bf16_survival.py --config
configs/tiny.yaml` (docs/benchmarks.md, "L2E's gradient in bf16"): at lambda 1e-9 and 2048 tokens per step the
ratio was 2.8e-3 on the less favourable of tiny's two layers (0.87 of the term survived), at 1e-10 it was 3e-4
(0.16 survived); half survives near r = 1e-3, about 2^-10, i.e. a quarter of bf16's relative resolution. fp16 has
3 more significand bits, so its threshold is 8x lower. The model factor C is the tiny model's: run the benchmark
on your own shape before trusting a small lambda (the GPU check measures 160m and 410m).
"""

from __future__ import annotations

import torch

from l2e_dist.config import RunConfig
from l2e_dist.config_utils import ConfigError
from l2e_dist.console import log_event
from l2e_dist.model.attention_backend import check_attention_backend

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The survival benchmark's figures on configs/tiny.yaml (see the module docstring).
CALIBRATION_LAMBDA, CALIBRATION_TOKENS_PER_STEP, CALIBRATION_RATIO = 1e-9, 16 * 128, 2.8e-3
MODEL_FACTOR = CALIBRATION_RATIO / (CALIBRATION_LAMBDA * CALIBRATION_TOKENS_PER_STEP)  # C
# |g_own| / |g_up| on the selected pairs below which most of the term rounds away.
HALF_SURVIVES_RATIO = {"bf16": 1e-3, "fp16": 1e-3 / 8}


def estimated_l2e_gradient_ratio(cfg: RunConfig) -> float:
    """r = |g_own| / |g_up| on the selected pairs, estimated from lambda, the tokens per step and the reduction."""
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    per_token_lambda = cfg.l2e.reg_lambda * (tokens_per_step if cfg.l2e.reduction == "sum" else 1)
    return per_token_lambda * MODEL_FACTOR


def l2e_rounding_warning(cfg: RunConfig) -> str | None:
    """One line when a half-precision L2E run's regularizer gradient would mostly round away, else None."""
    precision = cfg.deepspeed.precision
    if cfg.l2e.method != "l2e" or precision not in HALF_SURVIVES_RATIO or cfg.l2e.reg_lambda == 0:
        return None
    if cfg.l2e.grad_precision == "fp32":  # the regularizer's gradient reaches the fp32 gradients apart
        return None
    ratio = estimated_l2e_gradient_ratio(cfg)
    if ratio >= HALF_SURVIVES_RATIO[precision]:
        return None
    needed = cfg.l2e.reg_lambda * HALF_SURVIVES_RATIO[precision] / ratio
    return (
        f"warning: l2e.reg_lambda={cfg.l2e.reg_lambda:g} in {precision} would mostly round away: its gradient is "
        f"estimated at {ratio:.1g} of the LM gradient it is added to (about half survives at "
        f"{HALF_SURVIVES_RATIO[precision]:.1g}); "
        + ("set l2e.grad_precision=fp32 (ZeRO 0/1), " if precision == "bf16" else "")
        + f"raise l2e.reg_lambda to >= {needed:.1g}, train in deepspeed.precision=fp32, or measure your shape "
        "with benchmarks/l2e_bf16_survival.py"
    )


def check_compute_settings(cfg: RunConfig, device: torch.device, tensor_parallel: int) -> None:
    """At start-up, before data and engine are used: a config error for an attention backend without a kernel
    for this run or for the CPU L2E backend on an accelerator; one warning line for an L2E lambda that half
    precision would round away."""
    heads = cfg.model.num_attention_heads // tensor_parallel
    check_attention_backend(cfg.model.attention_backend, device, PRECISION_DTYPES[cfg.deepspeed.precision], heads,
                            cfg.model.head_dim)
    if cfg.l2e.enabled and cfg.l2e.backend == "cpu" and device.type != "cpu":
        raise ConfigError("l2e.backend", f"'cpu' runs on CPU activations, this run's are on {device.type}; set "
                          "l2e.backend to auto, dense or compiled")
    warning = l2e_rounding_warning(cfg)
    if warning is not None:
        log_event(warning)
