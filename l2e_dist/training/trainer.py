"""The pretraining loop: process groups -> data -> model (+ L2E hooks) -> DeepSpeed engine -> steps.

Read `pretrain()` top to bottom: process groups, data and output directory, then `_setup_run` (model, L2E,
engine, resume), `_training_loop` (the steps; `_end_of_step`: eval, snapshot, checkpoint, preemption) and
`_finish` (final checkpoint, summary). Every piece they call lives in its own module (config, parallel.state,
data, model, l2e, training.optim, training.metrics, checkpoint.io).
"""

from __future__ import annotations

import random
import resource
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from l2e_dist.checkpoint.convert import load_init_weights
from l2e_dist.checkpoint.io import resume, save_checkpoint
from l2e_dist.checkpoint.manifest import from_rank0
from l2e_dist.checkpoint.snapshots import SNAPSHOT_DIR, save_snapshot
from l2e_dist.config import RunConfig, config_to_dict, validate_world
from l2e_dist.console import log_event
from l2e_dist.data import Datasets, build_datasets, prepare_default_corpus
from l2e_dist.l2e.hooks import ScoreMeter
from l2e_dist.l2e.hooks import attach as attach_l2e
from l2e_dist.l2e.inhibitor import L2EInhibitor
from l2e_dist.l2e.inhibitor import MicroBatch as L2EMicroBatch
from l2e_dist.model.gpt_neox import GPTNeoX
from l2e_dist.parallel.launcher_watch import watch_launcher
from l2e_dist.parallel.state import (
    ParallelLayout,
    default_device,
    init_process_groups,
    rank0_first,
    set_collective_timeout,
    tensor_and_data_parallel_group,
)
from l2e_dist.training.compute_checks import check_compute_settings
from l2e_dist.training.l2e_precision import backward_micro_batch
from l2e_dist.training.metrics import MetricsLogger
from l2e_dist.training.neox_branch import continue_neox_optimizer, neox_branch
from l2e_dist.training.numerics import NonFiniteGuard, disable_deepspeed_min_scale_error, optimizer_loss_scale
from l2e_dist.training.optim import initialize_engine
from l2e_dist.training.preemption import PreemptionHandler, Watchdog, start_watchdog
from l2e_dist.training.prefetch import prefetch_to_device
from l2e_dist.training.progress import human_count
from l2e_dist.training.resolved import ResolvedRun, resolve_run
from l2e_dist.training.run_data import check_run_data, first_step, run_batches
from l2e_dist.training.run_dir import open_run_dir
from l2e_dist.training.run_lock import hold_run_directory
from l2e_dist.training.summary import RunSummary, log_summary
from l2e_dist.training.throughput import TrainingClock, device_peak_tflops, mfu, tflops_per_device

SLOW_PHASE_FACTOR = 4  # resume, eval and checkpoint phases may take this many watchdog/collective timeouts


@dataclass
class TrainResult:
    final_step: int
    final_loss: float
    losses: list[float]
    output_dir: str
    stopped_by_signal: str | None = None  # e.g. "SIGUSR1" when a scheduler signal ended the run early
    requeued: bool = False
    l2e_state: dict | None = None  # the inhibitor's final statistics and thresholds (identical on every rank)
    valid_metrics: dict[str, float] | None = None  # the last validation pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _prepare_data(cfg: RunConfig, layout: ParallelLayout):
    """Rank 0 builds/indexes the data first (writing caches), then everybody reads it."""

    def build():
        if not cfg.data.paths and layout.rank == 0:
            prepare_default_corpus(cfg.data.cache_dir)
        return build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed)

    return rank0_first(build)


def build_inhibitor(
    cfg: RunConfig, model: GPTNeoX, layout: ParallelLayout, grad_accum_steps: int, device,
    always_reduce: bool = False,
) -> L2EInhibitor | None:
    """The L2E inhibitor hooked on `model`'s chosen MLP layers (None for method none). A world of 1 skips the
    statistics all_reduce, unless `always_reduce` (l2e-bench: so its cost is in the figures as at scale)."""
    if cfg.l2e.method == "none":
        return None
    layers = cfg.l2e.resolve_layers(cfg.model.num_layers)
    inhibitor = L2EInhibitor(
        cfg.l2e,
        layers,
        cfg.model.ffn_size,
        tp_rank=layout.tp_rank,
        tp_size=layout.tp_size,
        reduce_group=tensor_and_data_parallel_group() if layout.world_size > 1 or always_reduce else None,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_size=layout.dp_size,
        micro_batches_per_step=grad_accum_steps,
        device=device,
        backend=cfg.l2e.backend,
    )
    probes = model.mlp_probes(cfg.l2e.activation)
    attach_l2e(inhibitor, {layer: probes[layer] for layer in layers})
    return inhibitor


def build_model(cfg: RunConfig, layout: ParallelLayout, device: torch.device) -> GPTNeoX:
    """This rank's model. Random init: each rank draws the full matrices from the seed and keeps its TP slice
    (identical weights at every TP size). `train.init_from` (weights only, fresh optimizer; a checkpoint to
    resume from overrides them): built on the meta device (no memory, no wasted init), materialised on the
    training device and filled with this rank's shard, read lazily from an HF directory."""
    if not cfg.train.init_from:
        return GPTNeoX(cfg.model)
    with torch.device("meta"):
        model = GPTNeoX(cfg.model)
    model.materialize(device)
    load_init_weights(model, cfg.train.init_from, layout.tp_rank, layout.tp_size)
    return model


def _set_training(engine, inhibitor: L2EInhibitor | None, training: bool) -> None:
    engine.train(training)
    if inhibitor is not None:
        inhibitor.training = training


@torch.no_grad()
def evaluate(
    engine,
    model: GPTNeoX,
    inhibitor,
    valid_set,
    cfg: RunConfig,
    layout: ParallelLayout,
    device,
    logger=None,
    step=0,
) -> dict[str, float]:
    """Validation LM loss over `eval_iters` global batches (always the same batches) and, with L2E, the
    held-out fraction of (token, neuron) pairs of each inhibited layer scoring >= l2e.eval_reference_score."""
    _set_training(engine, inhibitor, False)
    meter = None
    if inhibitor is not None:
        probes = model.mlp_probes(cfg.l2e.activation)
        meter = ScoreMeter(
            inhibitor, probes, cfg.l2e.eval_reference_score, sample_size=cfg.logging.histogram_size
        )
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = run_batches(cfg, valid_set, dp_rank=layout.dp_rank, dp_size=layout.dp_size, split="valid")
    for _, micro_batches in zip(range(cfg.train.eval_iters), batches):
        for micro in micro_batches:
            tokens = micro["tokens"].to(device)
            losses = engine(tokens[:, :-1], tokens[:, 1:])
            total[0] += losses.double().sum()
            total[1] += losses.numel()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    metrics = {"valid/loss": (total[0] / total[1].clamp(min=1)).item()}
    if meter is not None:
        meter.detach()
        if logger is not None:
            for layer, kept in meter.samples.items():
                if kept:  # this rank's held-out scores (log10) of the layer: the tail L2E acts on
                    logger.histogram(
                        f"valid/l2e/layer{layer}/log10_score", torch.cat(kept).clamp_min(1e-12).log10(), step
                    )
        if layout.world_size > 1:
            dist.all_reduce(meter.counts, group=tensor_and_data_parallel_group())
        for (above, seen), layer in zip(meter.counts.tolist(), meter.layer_ids):
            if seen:
                metrics[f"valid/l2e/layer{layer}/frac_above_ref"] = above / seen
    _set_training(engine, inhibitor, True)
    return metrics


def pretrain(cfg: RunConfig) -> TrainResult:
    """Train `cfg` in this process's rank: set up the run, run the steps, finish (final checkpoint, summary)."""
    watch_launcher()  # under a launcher: this rank ends with it (the CLI armed it already)
    preempt = PreemptionHandler(tuple(cfg.train.preempt_signals), check_every=cfg.train.preempt_check_every)
    if threading.current_thread() is threading.main_thread():
        preempt.install()  # first: a signal before this would kill the process without a checkpoint
    layout = init_process_groups(
        cfg.parallel.tensor_parallel, cfg.parallel.startup_collective_timeout_s(), cfg.parallel.device)
    validate_world(cfg, layout.world_size)  # before the data: a wrong launch fails at once
    # One job per output_dir: before anything is read from or written to it (docs/launching.md).
    with hold_run_directory(cfg.train.output_dir, cfg.train.lock_heartbeat_s, layout.rank, share=from_rank0):
        check_compute_settings(cfg, default_device(), layout.tp_size)  # a backend without a kernel fails here
        seed_everything(cfg.train.seed)
        datasets = _prepare_data(cfg, layout)
        resolved = resolve_run(cfg, layout.world_size, datasets)  # the caller's cfg stays as given
        check_run_data(resolved.config, datasets)  # file-order data ends; an init_from checkpoint's vocabulary
        finished = open_run_dir(resolved, layout.rank)  # refuses another experiment in output_dir; config.yaml
        if finished is not None:
            log_event(f"already complete at step {finished.step} ({finished.checkpoint})")
            return TrainResult(finished.step, float("nan"), [], str(resolved.config.train.output_dir))
        run = _setup_run(resolved, datasets, layout, preempt)
        progress = _training_loop(run)
        return _finish(run, progress)


@dataclass
class _Run:
    """What the training loop works with, built once by `_setup_run`."""

    resolved: ResolvedRun
    datasets: Datasets
    layout: ParallelLayout
    device: torch.device
    preempt: PreemptionHandler
    model: GPTNeoX
    inhibitor: L2EInhibitor | None
    engine: Any  # deepspeed.DeepSpeedEngine
    watchdog: Watchdog | None  # None when parallel.watchdog_timeout_s is 0
    logger: MetricsLogger
    resumed_step: int  # 0: a fresh run
    start_step: int  # the last step already trained (resumed_step, or train.branch_step of a fresh branch)
    snapshot_steps: set[int]
    flops_per_token: int  # model FLOPs per trained token, for TFLOP/s and MFU
    peak_tflops: float | None  # the device's peak, None where unknown (the CPU): no MFU

    @property
    def cfg(self) -> RunConfig:
        return self.resolved.config

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.train.seq_length


@dataclass
class _Progress:
    """Where the training loop stands; `_finish` reports it."""

    step: int
    losses: list[float] = field(default_factory=list)  # the mean training loss of each log interval
    valid_metrics: dict[str, float] | None = None
    valid_step: int | None = None
    stopped: bool = False  # a preemption signal ended the run early
    requeued: bool = False


def _setup_run(resolved: ResolvedRun, datasets: Datasets, layout: ParallelLayout,
               preempt: PreemptionHandler) -> _Run:
    """Model, L2E inhibitor and DeepSpeed engine, resumed from the newest checkpoint; the step-0 snapshot; the
    header and the metrics logger."""
    cfg, device = resolved.config, default_device()
    seed_everything(cfg.train.seed)  # identical init on every rank and every TP size
    neox = neox_branch(cfg)  # a gpt-neox checkpoint in train.init_from: size and branch_step checked first
    model = build_model(cfg, layout, device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        model.compile_layers()
    inhibitor = build_inhibitor(cfg, model, layout, resolved.derived.grad_accum_steps, device)
    engine = initialize_engine(model, cfg, resolved.derived.data_parallel)

    watchdog = start_watchdog(cfg.parallel.watchdog_timeout_s) if cfg.parallel.watchdog_timeout_s else None
    out_dir = Path(cfg.train.output_dir)
    resumed_step = 0
    if cfg.train.resume:
        with _slow_phase(watchdog, cfg, 0, "resume"):
            resumed_step = resume(engine, cfg, out_dir / "checkpoints", inhibitor)
    if neox is not None and not resumed_step:  # continue the gpt-neox optimizer (a resume supersedes it)
        with _slow_phase(watchdog, cfg, 0, "resume"):
            continue_neox_optimizer(engine, cfg, neox)
    disable_deepspeed_min_scale_error(engine)  # after resume: loading a checkpoint replaces the loss scaler
    start_step = resumed_step or first_step(cfg)  # a fresh branched run starts at train.branch_step
    snapshot_steps = set(cfg.train.snapshot_steps())
    if start_step == 0 and 0 in snapshot_steps:  # the initialization, before the first update
        with _slow_phase(watchdog, cfg, 0, "snapshot"):
            _snapshot(engine, inhibitor, out_dir, 0, resolved, resumed=False)
    is_rank0 = layout.rank == 0
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    if is_rank0:  # the header first, on its own lines (before any progress bar exists)
        _print_header(resolved, layout, model, device, start_step, tokens_per_step)
    logger = MetricsLogger(
        str(out_dir),
        enabled=is_rank0,
        total_steps=cfg.train.train_iters,
        start_step=start_step,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        wandb_mode=cfg.logging.wandb_mode,
        progress_bar=cfg.logging.progress_bar,
        run_config=config_to_dict(cfg),
        tokens_per_step=tokens_per_step,
    )
    flops_per_token = cfg.model.flops_per_token(cfg.train.seq_length, model.padded_vocab_size)
    return _Run(resolved, datasets, layout, device, preempt, model, inhibitor, engine, watchdog, logger,
                resumed_step, start_step, snapshot_steps, flops_per_token, device_peak_tflops(device))


def _training_loop(run: _Run) -> _Progress:
    """The optimizer steps from run.start_step + 1 to train.train_iters, or until a preemption signal."""
    cfg, engine, inhibitor, device = run.cfg, run.engine, run.inhibitor, run.device
    grad_accum_steps = run.resolved.derived.grad_accum_steps
    dp_group = parallel_state.get_data_parallel_group()
    guard = NonFiniteGuard(cfg.deepspeed.precision, cfg.train.nonfinite_patience)
    batches = prefetch_to_device(
        run_batches(cfg, run.datasets.train, dp_rank=run.layout.dp_rank, dp_size=run.layout.dp_size,
                    start_step=run.start_step),
        device,
    )
    progress = _Progress(step=run.start_step)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = 0.0
    steps_since_log, clock = 0, TrainingClock(device)
    _set_training(engine, inhibitor, True)
    for step in range(run.start_step + 1, cfg.train.train_iters + 1):
        progress.step = step
        micro_batches = next(batches)  # already on the device (prefetched one step ahead)
        step_loss.zero_()
        for micro in micro_batches:
            features = micro["feature_labels"][:, :-1] if cfg.l2e.fkr else None
            lm_loss = train_micro_batch(engine, inhibitor, micro["tokens"], features)
            step_loss += lm_loss.detach().double() / grad_accum_steps
        end_l2e_step(engine, inhibitor, step)
        # One scalar all_reduce per step: every rank sees the same mean loss, so all stop together.
        dist.all_reduce(step_loss, group=dp_group)
        mean_step_loss = step_loss.item() / run.resolved.derived.data_parallel
        if step == run.start_step + 1:  # set-up and the first step are done: a hang from now on fails sooner
            set_collective_timeout(cfg.parallel.dist_timeout_s)
        guard.after_step(step, mean_step_loss, engine.was_step_applied(), optimizer_loss_scale(engine))
        loss_sum += mean_step_loss
        steps_since_log += 1

        if step % cfg.train.log_interval == 0 or step == cfg.train.train_iters:
            mean_loss = loss_sum / steps_since_log
            elapsed = clock.lap()  # training time only: eval and checkpoint writes are paused out
            metrics = _train_metrics(run, step, mean_loss, elapsed, steps_since_log, guard)
            progress.losses.append(mean_loss)
            run.logger.log(step, metrics, window_steps=steps_since_log)
            loss_sum, steps_since_log = 0.0, 0
        run.logger.advance(1)
        if run.watchdog is not None:
            run.watchdog.heartbeat(step)
        if _end_of_step(run, progress, clock):
            break
    return progress


def _train_metrics(run: _Run, step: int, mean_loss: float, elapsed: float, steps: int,
                   guard: NonFiniteGuard) -> dict[str, float]:
    """The figures logged at a log interval that ended after `steps` steps and `elapsed` seconds of training."""
    engine, layout = run.engine, run.layout
    tokens_per_s = run.tokens_per_step * steps / elapsed
    metrics = {
        "train/loss": mean_loss,
        "train/lr": engine.get_lr()[0],
        "train/tokens": step * run.tokens_per_step,  # seen since step 0 (a branched run's included)
        "train/tokens_per_s": tokens_per_s,  # over this log interval's training time
        "train/tflops_per_device": tflops_per_device(tokens_per_s, run.flops_per_token, layout.world_size),
        "train/step_time_s": elapsed / steps,
    }
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    if run.peak_tflops is not None:
        metrics["train/mfu"] = mfu(tokens_per_s, run.flops_per_token, run.peak_tflops, layout.world_size)
    if guard.skipped_steps:
        metrics["train/skipped_steps"] = guard.skipped_steps
    if run.device.type == "cuda":
        metrics["train/max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        metrics["train/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if run.inhibitor is not None:
        metrics.update(run.inhibitor.metrics())
    return metrics


def _end_of_step(run: _Run, progress: _Progress, clock: TrainingClock) -> bool:
    """After a step: evaluation, snapshot and checkpoint when due (their time paused out of the throughput), and
    a preemption stop. Returns whether the loop stops here."""
    cfg, engine, inhibitor, step = run.cfg, run.engine, run.inhibitor, progress.step
    if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == cfg.train.train_iters):
        with _slow_phase(run.watchdog, cfg, step, "eval"), clock.paused():
            progress.valid_metrics = evaluate(
                engine, run.model, inhibitor, run.datasets.valid, cfg, run.layout, run.device, run.logger, step
            )
        run.logger.log(step, progress.valid_metrics)
        progress.valid_step = step
    # A signal during the last step changes nothing: the run finishes (exit 0) instead of stopping (75).
    stop = run.preempt.should_stop(step=step) and step < cfg.train.train_iters
    if step in run.snapshot_steps:  # before this step's resume checkpoint: a resume never skips a snapshot
        with _slow_phase(run.watchdog, cfg, step, "snapshot"), clock.paused():
            _snapshot(engine, inhibitor, run.out_dir, step, run.resolved, resumed=run.resumed_step > 0)
    if (cfg.train.save_interval and step % cfg.train.save_interval == 0) or stop:
        if step != cfg.train.train_iters:
            with _slow_phase(run.watchdog, cfg, step, "checkpoint"), clock.paused():
                _save(engine, inhibitor, run.ckpt_dir, step, run.resolved)
    if stop:
        requeued = run.preempt.requeue()
        log_event(f"stopped at step {step} on {run.preempt.received or 'a peer signal'}; requeued={requeued}")
        progress.stopped, progress.requeued = True, _rank0_requeued(requeued, run.device)
    return stop


def _finish(run: _Run, progress: _Progress) -> TrainResult:
    """The final checkpoint of a completed run, the logger closed, rank 0's summary; the result."""
    cfg, step = run.cfg, progress.step
    if step > run.start_step and step == cfg.train.train_iters:
        with _slow_phase(run.watchdog, cfg, step, "checkpoint"):
            _save(run.engine, run.inhibitor, run.ckpt_dir, step, run.resolved)
    if run.watchdog is not None:
        run.watchdog.stop()
    final_loss = progress.losses[-1] if progress.losses else float("nan")
    run.logger.close()  # the bar ends before the summary
    if run.layout.rank == 0 and not progress.stopped:
        print(f"final step {step}", flush=True)
        print(f"final loss {final_loss:.6f}", flush=True)
        log_summary(RunSummary(
            output_dir=run.out_dir, start_step=run.start_step, final_step=step, tokens_per_step=run.tokens_per_step,
            train_loss=final_loss if progress.losses else None,
            valid_loss=(progress.valid_metrics or {}).get("valid/loss"), valid_step=progress.valid_step,
            tensorboard=cfg.logging.tensorboard,
        ))
    return TrainResult(
        final_step=step,
        final_loss=final_loss,
        losses=progress.losses,
        output_dir=str(run.out_dir),
        stopped_by_signal=(run.preempt.received or "peer") if progress.stopped else None,
        requeued=progress.requeued,
        l2e_state=run.inhibitor.state_dict() if run.inhibitor is not None else None,
        valid_metrics=progress.valid_metrics,
    )


def train_micro_batch(
    engine, inhibitor: L2EInhibitor | None, tokens: torch.Tensor, features: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward, LM loss + L2E loss, backward, engine step (DeepSpeed applies the optimizer only at the
    gradient-accumulation boundary). The L2E micro-batch context takes the FKR labels `features`, hands out the
    L2E loss of this forward and closes the micro-batch; its sums accumulate until end_l2e_step. Returns the
    mean LM loss."""
    with L2EMicroBatch(inhibitor, features) as l2e:
        lm_loss = engine(tokens[:, :-1], tokens[:, 1:], reduction="mean")
        # l2e.grad_precision=fp32: the L2E loss gets its own backward first (training/l2e_precision.py)
        separate = inhibitor is not None and inhibitor.cfg.grad_precision == "fp32"
        backward_micro_batch(engine, lm_loss, l2e.loss(), separate=separate)
        engine.step()
    return lm_loss


def end_l2e_step(engine, inhibitor: L2EInhibitor | None, step: int | None = None) -> None:
    """After the step's last micro-batch: the L2E statistics and thresholds merge once per optimizer step. An
    fp16 overflow-skipped step (DeepSpeed did not apply it) merges nothing, like the optimizer."""
    if inhibitor is not None:
        inhibitor.end_step(applied=engine.was_step_applied(), step=step)


def _print_header(run: ResolvedRun, layout: ParallelLayout, model: GPTNeoX, device, start_step: int,
                  tokens_per_step: int) -> None:
    cfg = run.config
    n_params = cfg.model.num_parameters(model.padded_vocab_size)
    log_event(
        f"world={layout.world_size} tp={layout.tp_size} dp={layout.dp_size} "
        f"zero={_zero_description(run)} precision={cfg.deepspeed.precision} params={n_params / 1e6:.2f}M "
        f"gas={run.derived.grad_accum_steps} l2e={cfg.l2e.method} device={device.type} resume_step={start_step}"
        + (f" branch_step={cfg.train.branch_step}" if cfg.train.branch_step is not None else "")
    )
    log_event(
        f"train_iters={cfg.train.train_iters} tokens/step={tokens_per_step} "
        f"(total {human_count(cfg.train.train_iters * tokens_per_step)}) log_interval={cfg.train.log_interval} "
        f"output_dir={cfg.train.output_dir}"
    )


def _zero_description(run: ResolvedRun) -> str:
    stage, asked = run.derived.zero_stage, run.config.deepspeed.zero_stage
    if stage == asked:
        return str(stage)
    why = "partitions nothing at dp=1 in fp32" if stage < asked else "has no fp32 gradient accumulation in bf16"
    return f"{stage} (deepspeed.zero_stage={asked} {why})"


def _rank0_requeued(requeued: bool, device) -> bool:
    """Only rank 0 runs `scontrol requeue`: every rank takes its answer, so all exit 0 when the job was
    requeued. A rank exiting 75 meanwhile would make `srun --kill-on-bad-exit` kill rank 0 mid-requeue."""
    flag = torch.tensor([int(requeued)], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


@contextmanager
def _slow_phase(watchdog, cfg: RunConfig, step: int, phase: str):
    """Resume, evaluation and checkpoint writes may legitimately take longer than a step: the watchdog and the
    collective timeout both allow SLOW_PHASE_FACTOR x theirs (the collective one stays the longer)."""
    if watchdog is not None:
        watchdog.heartbeat(step, phase=phase, allow_s=SLOW_PHASE_FACTOR * watchdog.timeout_s)
    # Before the loop (step 0: resume, the initial snapshot) the start-up timeout still holds until step 1 ends.
    after = cfg.parallel.startup_collective_timeout_s() if step == 0 else cfg.parallel.dist_timeout_s
    set_collective_timeout(max(SLOW_PHASE_FACTOR * cfg.parallel.dist_timeout_s, after))
    try:
        yield
    finally:
        set_collective_timeout(after)


def _client_state(inhibitor, step: int, run: ResolvedRun) -> dict:
    client_state = {
        "step": step,
        "consumed_samples": step * run.config.train.global_batch_size,
        "config": config_to_dict(run.config),
        "resolved": run.record(),
    }
    if inhibitor is not None:
        client_state["l2e"] = inhibitor.state_dict()
    return client_state


def _save(engine, inhibitor, ckpt_dir: Path, step: int, run: ResolvedRun) -> None:
    save_checkpoint(engine, ckpt_dir, step, _client_state(inhibitor, step, run), run.config.train.keep_last_n)


def _snapshot(engine, inhibitor, out_dir: Path, step: int, run: ResolvedRun, resumed: bool) -> None:
    save_snapshot(engine, out_dir / SNAPSHOT_DIR, step, _client_state(inhibitor, step, run), keep_existing=resumed)
