"""`l2e-pretrain --dry-run`: everything a run checks before its first step (config, launch world and TP/DP
layout, data files, tokenizer, vocabulary), then the per-rank memory estimate, and no training."""

from __future__ import annotations

from l2e_dist.config import RunConfig, validate_world
from l2e_dist.errors import UserError
from l2e_dist.training.memory import GIB, MemoryEstimate, estimate_memory


def dry_run(cfg: RunConfig, gpu_mem_gib: float | None = None) -> MemoryEstimate:
    """Collective (launch it as the real run). Raises a UserError (one line, every rank) on any problem,
    including an estimate above `gpu_mem_gib`; returns the estimate of one rank."""
    from l2e_dist.parallel.state import init_process_groups
    from l2e_dist.training.resolved import resolve_run
    from l2e_dist.training.trainer import _prepare_data

    layout = init_process_groups(cfg.parallel.tensor_parallel, cfg.parallel.dist_timeout_s)
    validate_world(cfg, layout.world_size)
    datasets = _prepare_data(cfg, layout)
    run = resolve_run(cfg, layout.world_size, datasets)
    cfg, dp, stage = run.config, run.derived.data_parallel, run.derived.zero_stage
    estimate = estimate_memory(
        cfg.model, layout.tp_size, dp, stage, cfg.deepspeed.precision, cfg.train.micro_batch_size,
        cfg.train.seq_length, cfg.train.activation_checkpointing,
    )
    if layout.rank == 0:
        print(
            f"l2e-pretrain: dry run OK: world={layout.world_size} tp={layout.tp_size} dp={dp} zero={stage} "
            f"precision={cfg.deepspeed.precision} micro_batch={cfg.train.micro_batch_size} "
            f"gas={run.derived.grad_accum_steps} "
            f"seq_length={cfg.train.seq_length} vocab={cfg.model.vocab_size} "
            f"train_samples={len(datasets.train)}",
            flush=True,
        )
        print(f"l2e-pretrain: estimated memory per rank: {estimate.describe()}", flush=True)
    if gpu_mem_gib is not None and estimate.total > gpu_mem_gib * GIB:
        error = UserError(
            f"the estimated {estimate.total / GIB:.2f} GiB per rank ({estimate.describe()}) does not fit "
            f"--gpu-mem-gib {gpu_mem_gib:g}: raise parallel.tensor_parallel or deepspeed.zero_stage, lower "
            "train.micro_batch_size, or set train.activation_checkpointing=true"
        )
        error.agreed = True
        raise error
    return estimate
