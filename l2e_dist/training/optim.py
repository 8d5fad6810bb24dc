"""Optimizer, learning-rate schedule, the DeepSpeed config derived from the run config, and the engine."""

from __future__ import annotations

import math

import torch

from l2e_dist.config import RunConfig
from l2e_dist.config_utils import ConfigError, deep_merge
from l2e_dist.parallel.batching import accumulation_steps


def lr_multiplier(step: int, cfg: RunConfig) -> float:
    """The lr as a fraction of optimizer.lr after `step` applied updates (0-based, absolute: a run branched at
    step N starts at N), over optimizer.lr_decay_iters (default train.train_iters) steps, by the formula
    optimizer.schedule names; times the optional re-warm-up ramp after train.branch_step."""
    opt = cfg.optimizer
    total = opt.lr_decay_iters or cfg.train.train_iters
    if opt.schedule == "annealing_lr_d36f623":
        value = annealing_lr_d36f623(step, total, opt.warmup_fraction * total, opt.decay_style, opt.min_lr_ratio)
    else:
        value = warmup_decay(step, total, opt.warmup_fraction, opt.decay_style, opt.min_lr_ratio)
    branch = cfg.train.branch_step
    if branch is not None and branch <= step < branch + opt.branch_warmup_iters:
        value *= (step - branch + 1) / opt.branch_warmup_iters
    return value


def warmup_decay(step: int, total: int, warmup_fraction: float, decay_style: str, min_ratio: float) -> float:
    """The later GPT-NeoX form: warm-up (n+1)/w over w = round(fraction x T) steps, then decay from 1 to
    min_ratio over the T - w steps after it (cosine or linear), constant past T."""
    warmup = int(round(warmup_fraction * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay_style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if decay_style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def annealing_lr_d36f623(updates: int, total: int, warmup: float, decay_style: str, min_ratio: float) -> float:
    """gpt-neox d36f623 megatron/learning_rates.py AnnealingLR.get_lr, the schedule Pythia trained with, as a
    fraction of the peak lr. `updates` = the updates applied so far (AnnealingLR.num_iters: the first update
    runs at 0, an fp16-overflow skipped step does not count), `warmup` = warmup x T unrounded, as gpt-neox
    computes warmup_iter. The cosine has period T (not T - w) and no min_lr offset; the result is clamped."""
    clipped = min(updates, total - warmup)
    if warmup > 0 and updates <= warmup:
        return clipped / warmup
    since_warmup = clipped - warmup
    if decay_style == "linear":
        value = (total - since_warmup) / total
    elif decay_style == "cosine":
        value = 0.5 * (math.cos(math.pi * since_warmup / total) + 1.0)
    else:
        value = 1.0
    return max(value, min_ratio)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and LayerNorm weights (GPT-NeoX convention)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "layernorm" in name or "layer_norm" in name else decay).append(param)
    opt = cfg.optimizer
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per parameter tensor for the whole update (CPU and CUDA) instead of ~6 passes with
    # temporaries; the update is the same AdamW (the fused path is checked against the reference in the tests).
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler counts this run's applied updates (DeepSpeed's engine does not step it on an fp16-overflow
    skipped step, as DeeperSpeed did not for Pythia); a branched run's schedule starts at train.branch_step (its
    checkpoints store the count since the branch, so a resume lands on the same absolute step)."""
    first_step = cfg.train.branch_step or 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(first_step + step, cfg))


def effective_zero_stage(cfg: RunConfig, dp_size: int) -> int:
    """The ZeRO stage the engine runs. fp32 at data-parallel size 1: stages 1 and 2 partition nothing, yet
    DeepSpeed still keeps a second fp32 copy of every parameter and copies gradients and parameters through
    flat buffers each step (the cost: docs/benchmarks.md), so they run as stage 0
    (as torchtitan skips FSDP at a shard degree of 1). Checkpoints record the stage that ran, so resuming on
    more ranks reshards as for any layout change. Mixed precision keeps its stage (its fp32 master copy is
    needed).

    bf16 at stage 0 runs as stage 1: DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 (`data_types.
    grad_accum_dtype`) only through its ZeRO optimizers (stage 1: BF16_Optimizer); its stage-0 path has no fp32
    accumulation and rejects the setting."""
    stage = cfg.deepspeed.zero_stage
    if dp_size == 1 and stage in (1, 2) and cfg.deepspeed.precision == "fp32":
        return 0
    if stage == 0 and cfg.deepspeed.precision == "bf16":
        return 1
    return stage


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    """The DeepSpeed JSON config. Batch sizes are given per data-parallel rank; `deepspeed.extra` wins."""
    train, ds = cfg.train, cfg.deepspeed
    grad_accum_steps = accumulation_steps(train.global_batch_size, train.micro_batch_size, dp_size)
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": effective_zero_stage(cfg, dp_size)},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": ds.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": ds.precision == "bf16"},
        # Gradients of the 8-64 micro-batches of a step summed in fp32, not in bf16 (DeepSpeed's default is the
        # model dtype; bf16's 8-bit mantissa loses small contributions). fp16 keeps fp16 under loss scaling.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if ds.precision == "bf16" else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and, without a DeepSpeed dataloader, synchronizes the
        # device at the start and the end of every micro-batch; the trainer measures throughput itself.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if cfg.l2e.grad_precision == "fp32":  # training/l2e_precision.py
        # Each backward's bf16 gradients move into the fp32 buffers as they are ready (the regularizer's backward
        # and the LM's never meet in bf16), and the step's reduction sends the fp32 sums: DeepSpeed's default
        # (the model's dtype) would round them to bf16 there, and the regularizer's part with them.
        config["bf16"]["immediate_grad_update"] = True
        config["communication_data_type"] = "fp32"
    return deep_merge(config, ds.extra)


def check_precision_supported(precision: str) -> None:
    """A ConfigError naming `deepspeed.precision` when this device has no fp16/bf16 support (DeepSpeed's own
    check raises a bare ValueError deep inside initialize). On CPU, fp16 needs oneDNN fp16 kernels
    (AVX512-FP16/AMX-FP16), which many CPUs lack; GPUs before Ampere lack bf16."""
    from deepspeed.accelerator import get_accelerator

    if precision == "fp32":
        return
    accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if not supported:
        other = "bf16" if precision == "fp16" and accelerator.is_bf16_supported() else "fp32"
        raise ConfigError(
            "deepspeed.precision",
            f"{precision} is not supported on this device ({accelerator.device_name()}: DeepSpeed's accelerator "
            f"reports no {precision}); set deepspeed.precision={other}, or run on a device with {precision} support",
        )


def initialize_engine(model: torch.nn.Module, cfg: RunConfig, dp_size: int):
    """The DeepSpeed engine over `model` with our AdamW and schedule (the trainer's and `l2e-bench`'s).

    At data-parallel size 1 with stage 0, DeepSpeed would still "all-reduce" the gradients over the 1-rank group:
    flatten every gradient into one buffer, reduce, copy back (the cost: docs/benchmarks.md). That is an
    identity, so it is switched off; at DP>1, and for ZeRO stages, DeepSpeed reduces as usual.
    """
    import deepspeed  # deferred: importing it prints accelerator probing noise

    from l2e_dist.parallel.state import DeepSpeedMpu

    check_precision_supported(cfg.deepspeed.precision)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, cfg),
        config=deepspeed_config(cfg, dp_size),
        mpu=DeepSpeedMpu(),
    )
    if dp_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine
