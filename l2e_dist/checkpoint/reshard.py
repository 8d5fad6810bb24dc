"""Load a checkpoint written at another layout (TP size, DP size, ZeRO stage, padded vocab) into an engine.

This is our equivalent of DeepSpeed's universal checkpoint, without its intermediate folder: every rank reads
the full-width state of each parameter from the source checkpoint (ds_files: merged over the source's TP
shards and ZeRO partitions, memory-mapped), cuts its own TP slice with the tp_layout table, and writes that
into the places DeepSpeed keeps it for the target stage, mirroring DeepSpeed's own universal loader:

  ZeRO 1/2  each parameter's `_hp_mapping` names its fragment of this rank's flat fp32 partition
  ZeRO 3    each parameter owns ceil(numel/dp) consecutive elements of its sub-group's flat fp32 partition
  stage 0   (fp32) a plain torch optimizer over the module parameters

AdamW moments go into the base optimizer's state under the same flat tensors, then DeepSpeed's own calls
refresh the working weights (`update_lp_params` / the ZeRO-3 partition copy). Param-group hyperparameters, the
LR scheduler and the engine counters come from the checkpoint. (DeepSpeed's universal loader applies param
group 0's hyperparameters to every group under ZeRO-3, which would put weight decay on biases and LayerNorms:
one more reason to do this ourselves.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from l2e_dist.checkpoint.compat import resize_vocab_rows
from l2e_dist.checkpoint.ds_files import OPTIMIZER_KINDS, DeepSpeedCheckpoint
from l2e_dist.errors import UserError
from l2e_dist.model.tp_layout import split_tensor

LocalState = Callable[[str, str], torch.Tensor]  # (parameter name, kind) -> this rank's TP slice


class ReshardError(UserError, RuntimeError):
    pass


def load_resharded(engine, source: DeepSpeedCheckpoint, real_vocab: int) -> None:
    """Restore weights, AdamW state, param-group hyperparameters, LR schedule and engine counters of
    `source` into `engine`, whatever layout either has. Collective over the DP group (ZeRO gathers)."""
    if not source.has_optimizer_state:
        raise ReshardError(f"{source.directory} has no optimizer state to resume from (use train.init_from for "
                           "weights-only checkpoints)")
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    rows = int(engine.module.padded_vocab_size)
    names = {param: name for name, param in engine.module.named_parameters()}
    missing = sorted(set(names.values()) - set(source.names))
    if missing:
        raise ReshardError(f"{source.directory} lacks parameters {missing[:3]} of this model")

    def local(name: str, kind: str) -> torch.Tensor:
        tp_slice = getattr(source, "tp_slice", None)  # a source that can read just this rank's slice
        if tp_slice is not None and (sliced := tp_slice(name, kind, tp_size, tp_rank, rows)) is not None:
            return sliced
        full = resize_vocab_rows(name, source.full(name, kind), rows, real_vocab)
        return split_tensor(name, full, tp_size, tp_rank)

    step = source.optimizer_step()
    stage = int(engine.zero_optimization_stage())
    optimizer = engine.optimizer
    if stage == 0:
        base = _place_stage0(optimizer, names, local, step)
    elif stage in (1, 2):
        base = _place_zero12(optimizer, names, local, step)
    else:
        base = _place_zero3(optimizer, names, local, step)

    hyperparameters = source.param_group_hyperparameters()
    if len(hyperparameters) != len(base.param_groups):
        raise ReshardError(f"{source.directory} has {len(hyperparameters)} optimizer param groups, this run "
                           f"{len(base.param_groups)}")
    for group, saved in zip(base.param_groups, hyperparameters):
        group.update(saved)
    _restore_loss_scale(optimizer, source.loss_scaler_state())
    counters = source.engine_state
    if engine.lr_scheduler is not None and counters["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(counters["lr_scheduler"])
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])


def _moments(local: LocalState, name: str) -> dict[str, torch.Tensor]:
    return {kind: local(name, kind) for kind in OPTIMIZER_KINDS}


def _place_stage0(optimizer, names: dict, local: LocalState, step: torch.Tensor) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer) or any(
        p not in names for g in optimizer.param_groups for p in g["params"]
    ):
        raise ReshardError(
            f"resuming ZeRO stage 0 with {type(optimizer).__name__} on another layout is not supported: "
            "use deepspeed.zero_stage >= 1 for fp16/bf16"
        )
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names[param]
                param.copy_(local(name, "fp32"))
                moments = {k: v.to(param.device) for k, v in _moments(local, name).items()}
                optimizer.state[param] = {"step": step.clone(), **moments}
    return optimizer


def _place_zero12(optimizer, names: dict, local: LocalState, step: torch.Tensor) -> torch.optim.Optimizer:
    """Mirror of DeepSpeed's stage-1/2 universal load: fragments of each flat fp32 partition."""
    with torch.no_grad():
        for group_index, group in enumerate(optimizer.optimizer.param_groups):
            flat = group["params"][0]  # this rank's flat fp32 partition of the group
            moments = {kind: torch.zeros_like(flat) for kind in OPTIMIZER_KINDS}
            for param in optimizer.bit16_groups[group_index]:
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is None:  # no element of this parameter lives in this rank's partition
                    continue
                name = names[param]
                source_range = mapping.lp_fragment_address
                target_range = mapping.hp_fragment_address
                for kind, target in (("fp32", flat), *moments.items()):
                    values = local(name, kind).flatten().narrow(0, source_range.start, source_range.numel)
                    target.narrow(0, target_range.start, target_range.numel).copy_(values)
            optimizer.optimizer.state[flat] = {"step": step.clone(), **moments}
        optimizer.update_lp_params()
    return optimizer.optimizer


def _place_zero3(optimizer, names: dict, local: LocalState, step: torch.Tensor) -> torch.optim.Optimizer:
    """Mirror of DeepSpeed's stage-3 universal load: each parameter's DP piece, sub-group by sub-group."""
    if getattr(optimizer, "swap_optimizer", False):
        raise ReshardError("resuming on another layout with ZeRO-3 NVMe optimizer offload is not supported")
    dp_group = optimizer.dp_process_group
    dp_rank, dp_size = torch.distributed.get_rank(dp_group), torch.distributed.get_world_size(dp_group)
    optimizer.checkpoint_event_prologue()  # every parameter partitioned, as DeepSpeed's own load does
    with torch.no_grad():
        for sub_group, params in enumerate(optimizer.fp16_groups):
            flat = optimizer.fp32_partitioned_groups_flat[sub_group]
            buffers = {kind: torch.zeros_like(flat) for kind in ("fp32", *OPTIMIZER_KINDS)}
            offset = 0
            for param in params:
                piece = param.partition_numel()
                for kind, buffer in buffers.items():
                    full = local(names[param], kind).flatten()
                    full = F.pad(full, (0, piece * dp_size - full.numel()))
                    buffer.narrow(0, offset, piece).copy_(full.narrow(0, dp_rank * piece, piece))
                offset += piece
            flat.copy_(buffers.pop("fp32"))
            optimizer.optimizer.state[flat] = {"step": step.clone(), **buffers}
            working = optimizer.fp16_partitioned_groups_flat[sub_group]
            working.copy_(flat)
            partitioned = optimizer.fp16_partitioned_groups[sub_group]
            for param, values in zip(partitioned, optimizer.unflatten(working, partitioned)):
                param.data = values.data
    optimizer.checkpoint_event_epilogue()  # re-gathers the persistent (small) parameters
    return optimizer.optimizer


def _restore_loss_scale(optimizer, saved: dict | None) -> None:
    """fp16 dynamic loss scale: carry the current scale over when both sides use the same kind of scaler."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if saved is None or scaler is None or bool(saved.get("dynamic")) != bool(getattr(scaler, "dynamic", False)):
        return
    for key, value in saved.items():
        if key in vars(scaler):
            setattr(scaler, key, value)
