"""Branch from a native GPT-NeoX checkpoint and continue its optimizer trajectory.

`train.init_from` = a gpt-neox `global_stepN/` directory (or its `l2e-convert from-neox` output): the model gets
the checkpoint's weights (build_model), then, once the DeepSpeed engine exists, `continue_neox_optimizer` puts the
fp32 master weights and Adam moments onto this run's TP / DP / ZeRO layout (reshard.load_resharded), sets Adam's
step to the updates taken (global_steps - skipped_steps), restores the fp16 loss scaler and positions the lr
schedule at AnnealingLR's num_iters (updates taken, fp16-skipped steps excluded), so the next update is the one
Pythia would have taken. The run starts at step = the checkpoint's iteration: train.branch_step must say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
from l2e_dist.checkpoint.neox_convert import NEOX_IMPORT_FORMAT
from l2e_dist.checkpoint.neox_native import NeoxNativeCheckpoint, check_neox_architecture, is_neox_native
from l2e_dist.checkpoint.reshard import _restore_loss_scale, load_resharded
from l2e_dist.config import RunConfig
from l2e_dist.config_utils import ConfigError
from l2e_dist.training.run_data import first_step


@dataclass
class NeoxBranch:
    source: DeepSpeedCheckpoint  # a NeoxNativeCheckpoint, or our converted checkpoint (stage-0 layout)
    iteration: int  # gpt-neox steps taken (updates + skipped): the next update trains on global batch `iteration`
    num_iters: int  # AnnealingLR's position: updates taken
    loss_scaler: dict | None


def neox_branch(cfg: RunConfig) -> NeoxBranch | None:
    """The gpt-neox checkpoint in train.init_from (None for any other init_from), checked against the config:
    the model size and train.branch_step (one line each). Reads no tensor."""
    path = cfg.train.init_from
    if not path or not Path(path).is_dir():
        return None
    if is_neox_native(path):
        native = NeoxNativeCheckpoint(path)
        check_neox_architecture(native, cfg.model)
        branch = NeoxBranch(native, native.iteration, native.num_iters, native.loss_scaler_state())
    elif (Path(path) / "mp_rank_00_model_states.pt").is_file():
        converted = DeepSpeedCheckpoint(path)
        saved = converted.client_state
        if saved.get("format") != NEOX_IMPORT_FORMAT:
            return None
        neox = saved["neox"]
        branch = NeoxBranch(converted, int(neox["iteration"]), int(neox["num_iters"]), neox.get("loss_scaler"))
    else:
        return None
    if cfg.train.branch_step != branch.iteration:
        raise ConfigError("train.branch_step", f"is {cfg.train.branch_step} but train.init_from={path} is gpt-neox "
                          f"iteration {branch.iteration} (its next update trains on global batch {branch.iteration}):"
                          f" set train.branch_step={branch.iteration}")
    return branch


def continue_neox_optimizer(engine, cfg: RunConfig, branch: NeoxBranch) -> None:
    """Masters, moments, Adam step, engine counters, loss scaler and lr position of `branch` into `engine`.
    Collective over the DP group (ZeRO gathers), like a resharded resume."""
    load_resharded(engine, branch.source, real_vocab=int(cfg.model.vocab_size))
    _restore_loss_scale(engine.optimizer, branch.loss_scaler)
    release = getattr(branch.source, "release", None)
    if release is not None:
        release()
    position_schedule(engine.lr_scheduler, branch.num_iters - first_step(cfg))
    if torch.distributed.get_rank() == 0:
        print(f"l2e-dist: continued the gpt-neox optimizer of {branch.source.directory} (iteration {branch.iteration},"
              f" {branch.num_iters} updates: Adam step and lr position {branch.num_iters})", flush=True)


def position_schedule(scheduler, position: int) -> None:
    """Put our LambdaLR (lr_multiplier(first_step + position)) at `position` and give the optimizer that lr now:
    the next update uses the schedule at AnnealingLR's num_iters. DeepSpeed steps the scheduler only on applied
    updates, so it keeps counting updates (as AnnealingLR does) from there."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"a gpt-neox branch needs the LambdaLR schedule of training.optim, got {type(scheduler)}")
    scheduler.last_epoch = position
    lrs = [base * factor(position) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
