"""The run configuration: one dataclass per YAML section, loaded from files plus `--set` overrides.

    cfg = load_config(["configs/tiny.yaml", "configs/l2e/l2e.yaml"], ["optimizer.lr=3e-4"])

Checks that only one section can do are in each section's `validate()`; checks that need two sections
(`cross_validate`) or the launched world size (`validate_world`) are here.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from l2e_dist.config_utils import ConfigError, apply_override, build, deep_merge, load_yaml, to_dict
from l2e_dist.data.config import DataConfig
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.model.config import ModelConfig
from l2e_dist.parallel.batching import BatchSplitError, accumulation_steps

# Seconds the watchdog needs after its timeout to find and name the silent rank (store probe, grace period).
WATCHDOG_REPORT_S = 30.0


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1  # TP size (megatron-core); data-parallel size = world size / TP
    # A rank waiting longer than this on a collective fails the job. Longer than the watchdog's timeout (plus
    # the time it takes to report), so that a hang is ended by the watchdog, which names the silent rank.
    dist_timeout_s: float = 1200.0
    # The collective timeout until the first step is done (NCCL communicators, data index maps, the first
    # compile and the first step's collectives may take long; never below dist_timeout_s); dist_timeout_s
    # applies from then on.
    startup_timeout_s: float = 3600.0
    # A rank whose training loop shows no progress for this long exits non-zero, naming the silent peer
    # (a dead or hung rank otherwise leaves the others blocked). 0 disables the watchdog.
    watchdog_timeout_s: float = 900.0
    # auto: the GPU of this rank when CUDA sees one, else the CPU (but a Slurm job that asked for GPUs and sees
    # none fails); cuda: a GPU or a one-line error; cpu: the CPU (+ gloo) even on a GPU node.
    device: Literal["auto", "cuda", "cpu"] = "auto"

    def startup_collective_timeout_s(self) -> float:
        return max(self.startup_timeout_s, self.dist_timeout_s)

    def validate(self) -> None:
        if self.tensor_parallel < 1:
            raise ConfigError("tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        if self.dist_timeout_s <= 0:
            raise ConfigError("dist_timeout_s", "must be > 0")
        if self.startup_timeout_s <= 0:
            raise ConfigError("startup_timeout_s", "must be > 0")
        if self.watchdog_timeout_s < 0:
            raise ConfigError("watchdog_timeout_s", "must be >= 0 (0 disables the watchdog)")
        if self.watchdog_timeout_s and self.dist_timeout_s < self.watchdog_timeout_s + WATCHDOG_REPORT_S:
            raise ConfigError(
                "dist_timeout_s",
                f"{self.dist_timeout_s:g} s must be at least watchdog_timeout_s + {WATCHDOG_REPORT_S:g} s "
                f"({self.watchdog_timeout_s + WATCHDOG_REPORT_S:g}) so that the watchdog fires first and names "
                "the silent rank: raise it or lower parallel.watchdog_timeout_s",
            )


@dataclass
class OptimizerConfig:
    lr: float = 1e-3  # peak learning rate, after warm-up
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio x lr (Pythia: 0.1)
    warmup_fraction: float = 0.01  # of train.train_iters (Pythia: 1%)
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up, to min_lr_ratio x lr
    # Which formula turns (updates taken, warm-up, decay) into the lr (training/optim.py lr_multiplier):
    # "warmup_decay": warm-up (n+1)/w, then decay from lr to min_lr over the T - w steps after the warm-up (the
    # later GPT-NeoX form). "annealing_lr_d36f623": gpt-neox d36f623's AnnealingLR, which Pythia trained with:
    # warm-up n/w (the first update has lr 0), then lr * 0.5 * (1 + cos(pi * (min(n, T-w) - w) / T)) clamped at
    # min_lr (period T, no min_lr offset inside the cosine); n counts applied updates (fp16-skipped steps do not).
    schedule: Literal["warmup_decay", "annealing_lr_d36f623"] = "warmup_decay"
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.1  # AdamW (decoupled)
    grad_clip: float = 1.0  # 0 disables clipping
    # Length of the lr schedule (warm-up fraction and decay are over this many steps); None = train.train_iters.
    # GPT-NeoX's lr-decay-iters: Pythia's is 143000, so a shorter (e.g. branched) run follows Pythia's schedule.
    lr_decay_iters: int | None = None
    # After train.branch_step: ramp the lr linearly from 1/N to 1 of the schedule's value over N steps (0: off),
    # a short re-warm-up for the fresh AdamW state of a branched run.
    branch_warmup_iters: int = 0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"betas[{i}]", f"must be in [0, 1), got {beta}")
        if self.eps <= 0:
            raise ConfigError("eps", "must be > 0")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", "must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", "must be >= 0 (0 disables clipping)")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError("lr_decay_iters", f"must be >= 1 or null (= train.train_iters), got {self.lr_decay_iters}")
        if self.branch_warmup_iters < 0:
            raise ConfigError("branch_warmup_iters", f"must be >= 0 (0: no re-warm-up), got {self.branch_warmup_iters}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # DeepSpeed ZeRO: 1 partitions optimizer states, 2 + gradients, 3 + parameters
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16: dynamic loss scaling; fp32 master weights
    initial_scale_power: int = 12  # fp16 dynamic loss scaling starts at 2**this
    loss_scale_window: int = 1000  # fp16: steps without overflow before the loss scale doubles
    extra: dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DeepSpeed config

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        for dotted, owner in COMPUTED_DEEPSPEED_KEYS.items():
            section, _, key = dotted.rpartition(".")
            holder = self.extra.get(section) if section else self.extra
            if isinstance(holder, dict) and key in holder:
                raise ConfigError(
                    f"extra.{dotted}", f"is computed from {owner} (an override here would silently contradict it): "
                    f"remove it and set {owner} instead"
                )


# DeepSpeed config keys the trainer derives from the run config; `deepspeed.extra` may not set them.
COMPUTED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x data-parallel size)",
    "gradient_clipping": "optimizer.grad_clip",
    "optimizer": "the optimizer section (l2e-dist builds the optimizer)",
    "scheduler": "the optimizer section (l2e-dist builds the LR schedule)",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "fp16.enabled": "deepspeed.precision",
    "bf16.enabled": "deepspeed.precision",
    "fp16.initial_scale_power": "deepspeed.initial_scale_power",
    "fp16.loss_scale_window": "deepspeed.loss_scale_window",
}


@dataclass
class TrainConfig:
    seq_length: int = 2048  # tokens per sample
    micro_batch_size: int = 1  # sequences per rank per forward/backward; accumulation fills the global batch
    global_batch_size: int = 1024  # sequences per optimizer step, over all data-parallel ranks
    train_iters: int = 143000  # optimizer steps of the whole run
    seed: int = 1234  # initialization and data order
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward: less memory
    compile: bool = False  # torch.compile each layer around its MLP activation; not with ZeRO-3 (off until measured: l2e-bench)
    log_interval: int = 10  # steps between logged metrics
    eval_interval: int = 1000  # 0 disables validation
    eval_iters: int = 10  # global batches per validation
    save_interval: int = 1000  # 0: save only at the end
    keep_last_n: int = 3  # checkpoints kept on disk (0 keeps all)
    # Weights-only snapshots for training-dynamics studies (output_dir/snapshots/step<N>, never pruned).
    # "pythia": Pythia's 154-checkpoint schedule: step 0 (the initialization), the powers of two below
    # save_interval (1, 2, 4, ..., 512 for 1000), every save_interval step and the last step. "interval": none
    # beyond extra_save_steps. Resume checkpoints stay every save_interval steps, pruned by keep_last_n.
    save_schedule: Literal["interval", "pythia"] = "interval"
    extra_save_steps: list[int] = field(default_factory=list)  # more snapshot steps, increasing, 0..train_iters
    # Where checkpoints, snapshots, logs and config.yaml go. null: runs/<name of the first --config file>, plus
    # -<l2e.method> when L2E or MEmeL is on (configs/pythia-160m.yaml -> runs/pythia-160m, with
    # configs/l2e/l2e.yaml overlaid -> runs/pythia-160m-l2e), so that a baseline and its L2E run never share one.
    output_dir: str | None = None
    resume: bool = True  # continue from output_dir/checkpoints/latest when present
    # Scheduler signals (Slurm: #SBATCH --signal=USR1@<s>) make every rank finish the step, checkpoint and
    # stop (rank 0 requeues a requeueable Slurm job). Ranks agree every `preempt_check_every` steps.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    preempt_check_every: int = 10  # steps between the ranks' agreement on a received stop signal
    init_from: str | None = (
        None  # weights of a checkpoint / HF dir / l2e-convert from-hf output; fresh optimizer
    )
    # Branch from step N of another run (e.g. a Pythia checkpoint of revision stepN in train.init_from): the
    # weights come from init_from, the data position and the lr schedule start at step N (the first batch
    # trained on is global batch N, as `l2e-prepare-data batch --step N` shows), AdamW starts fresh.
    branch_step: int | None = None
    # bf16/fp16: consecutive steps with a non-finite loss (bf16) or overflowing at the minimum loss scale
    # (fp16) that stop the run; DeepSpeed skips those updates meanwhile. fp32 stops at the first.
    nonfinite_patience: int = 3
    # Rank 0 holds <output_dir>/.run.lock for the run's lifetime, refreshing its heartbeat this often; a lock
    # not refreshed for 4x this long is a dead run's and is taken over (docs/launching.md).
    lock_heartbeat_s: float = 30.0

    def validate(self) -> None:
        for name in self.preempt_signals:
            if name not in signal.Signals.__members__:
                raise ConfigError("preempt_signals", f"unknown signal {name!r} (e.g. SIGUSR1, SIGTERM)")
        for key in (
            "seq_length",
            "micro_batch_size",
            "global_batch_size",
            "train_iters",
            "log_interval",
            "preempt_check_every",
            "nonfinite_patience",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.lock_heartbeat_s > 0:
            raise ConfigError("lock_heartbeat_s", f"must be > 0 s, got {self.lock_heartbeat_s}")
        for key in ("eval_interval", "eval_iters", "save_interval", "keep_last_n"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.branch_step is not None:
            if self.init_from is None:
                raise ConfigError("branch_step", "needs train.init_from (the weights of the run at that step, e.g. "
                                  "an HF Pythia directory of revision stepN)")
            if not 0 <= self.branch_step < self.train_iters:
                raise ConfigError("branch_step", f"{self.branch_step} must be in [0, train.train_iters="
                                  f"{self.train_iters}): the branched run trains steps branch_step+1 .. train_iters")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
            )
        self._validate_snapshots()

    def _validate_snapshots(self) -> None:
        if self.save_schedule == "pythia" and self.save_interval == 0:
            raise ConfigError("save_schedule", "pythia keeps a snapshot every save_interval steps: set "
                              "train.save_interval > 0 (Pythia: 1000)")
        steps = self.extra_save_steps
        for before, after in zip(steps, steps[1:]):
            if after <= before:
                raise ConfigError("extra_save_steps", f"must be strictly increasing, got {before} then {after}: "
                                  "list each step once, in order")
        if steps and steps[0] < 0:
            raise ConfigError("extra_save_steps", f"steps must be >= 0 (0 = the initialization), got {steps[0]}")
        if steps and steps[-1] > self.train_iters:
            raise ConfigError("extra_save_steps", f"step {steps[-1]} is past train.train_iters={self.train_iters}: "
                              "drop it or train longer")

    def snapshot_steps(self) -> list[int]:
        """The steps (0 = before the first update) at which a weights-only snapshot is kept, in order."""
        steps = set(self.extra_save_steps)
        if self.save_schedule == "pythia":
            steps |= {0, self.train_iters}
            steps |= {2**k for k in range(self.save_interval.bit_length()) if 2**k < self.save_interval}
            steps |= set(range(self.save_interval, self.train_iters + 1, self.save_interval))
        return sorted(s for s in steps if s <= self.train_iters)


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # event files in output_dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "l2e-dist"  # W&B project name
    wandb_mode: Literal["online", "offline"] = "offline"  # offline: sync later with `wandb sync`
    progress_bar: bool = True  # tqdm progress bar on rank 0
    histogram_size: int = (
        65536  # held-out L2E scores per layer kept for the TensorBoard histogram at each eval
    )

    def validate(self) -> None:
        if self.histogram_size < 0:
            raise ConfigError("histogram_size", "must be >= 0 (0 disables score histograms)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    l2e: L2EConfig = field(default_factory=L2EConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        cross_validate(self)


def cross_validate(cfg: RunConfig) -> None:
    """Checks that involve two sections; keys are named from the top."""
    tp = cfg.parallel.tensor_parallel
    if cfg.model.num_attention_heads % tp:
        raise ConfigError(
            "parallel.tensor_parallel",
            f"TP={tp} must divide model.num_attention_heads={cfg.model.num_attention_heads}",
        )
    if cfg.model.ffn_size % tp:
        raise ConfigError(
            "parallel.tensor_parallel", f"TP={tp} must divide the MLP width {cfg.model.ffn_size}"
        )
    if cfg.train.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            "train.seq_length",
            f"{cfg.train.seq_length} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}",
        )
    if cfg.train.compile and cfg.deepspeed.zero_stage == 3:  # Dynamo traces the partitioned (empty) parameters
        raise ConfigError("train.compile", "does not work with deepspeed.zero_stage=3 (ZeRO-3 partitions the "
                          "parameters the compiled layers read): set train.compile=false or deepspeed.zero_stage<=2")
    order_batch = cfg.data.order_batch_size
    if cfg.data.order != "packed" and order_batch is not None and cfg.train.global_batch_size != order_batch:
        raise ConfigError(
            "train.global_batch_size",
            f"{cfg.train.global_batch_size} does not match the file's order: data.order={cfg.data.order} with "
            f"data.order_batch_size={order_batch} means global batch i is samples [i*{order_batch}, "
            f"(i+1)*{order_batch}); set train.global_batch_size={order_batch} (change micro_batch_size instead)",
        )
    if cfg.l2e.method != "none":
        try:
            cfg.l2e.resolve_layers(cfg.model.num_layers)
        except ConfigError as exc:
            raise ConfigError(f"l2e.{exc.key}", str(exc).split(": ", 1)[-1]) from None
        check_l2e_grad_precision(cfg)
        # L2E counts optimizer steps: a start at or after the last step would never inhibit anything.
        start_key = "l2e.late_start" if cfg.l2e.late_start is not None else "l2e.forget_steps"
        if cfg.l2e.start_after >= cfg.train.train_iters:
            raise ConfigError(
                start_key,
                f"L2E starts scoring after {cfg.l2e.start_after} optimizer steps but train.train_iters="
                f"{cfg.train.train_iters}: nothing would be inhibited; lower it below train.train_iters",
            )


def check_l2e_grad_precision(cfg: RunConfig) -> None:
    """l2e.grad_precision=fp32 needs bf16 (fp32 runs keep the term whole already; fp16 accumulates gradients in
    fp16), ZeRO 0/1 (DeepSpeed's BF16_Optimizer, whose fp32 buffers take each backward apart) and gradients
    communicated in fp32."""
    if cfg.l2e.grad_precision != "fp32":
        return
    if cfg.deepspeed.precision != "bf16":
        raise ConfigError("l2e.grad_precision", f"fp32 applies to deepspeed.precision=bf16, not "
                          f"{cfg.deepspeed.precision}: set l2e.grad_precision=activation")
    if cfg.deepspeed.extra.get("communication_data_type", "fp32") != "fp32":
        raise ConfigError("deepspeed.extra.communication_data_type", "l2e.grad_precision=fp32 reduces gradients in "
                          "fp32 (bf16 would round the regularizer's part away again): remove it")
    if cfg.deepspeed.zero_stage > 1:  # ZeRO-2 reduces each backward into its partitions and keeps only the last
        raise ConfigError("l2e.grad_precision", f"fp32 supports deepspeed.zero_stage 0-1, not "
                          f"{cfg.deepspeed.zero_stage}: set deepspeed.zero_stage=1 or l2e.grad_precision=activation")


def validate_world(cfg: RunConfig, world_size: int) -> int:
    """Check the config against the launched world size; returns the data-parallel size."""
    tp = cfg.parallel.tensor_parallel
    if world_size % tp:
        raise ConfigError(
            "parallel.tensor_parallel",
            f"world size {world_size} is not divisible by TP={tp}: launch a multiple of {tp} processes",
        )
    dp = world_size // tp
    try:
        accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp)
    except BatchSplitError as exc:
        raise ConfigError("train.global_batch_size", f"{exc}; change train.global_batch_size or the launch") from None
    return dp


def load_config(paths: list[str], overrides: list[str] | None = None) -> RunConfig:
    """Merge YAML files in order, apply `key=value` overrides, build and validate the RunConfig."""
    if not paths:
        raise ConfigError("", "no config file given (e.g. --config configs/tiny.yaml)")
    data: dict = {}
    for path in paths:
        data = deep_merge(data, load_yaml(path))
    for assignment in overrides or []:
        data = apply_override(data, assignment)
    cfg = build(RunConfig, data)
    if cfg.train.output_dir is None:
        cfg.train.output_dir = default_output_dir(paths[0], cfg.l2e.method)
    return cfg


def default_output_dir(first_config: str, l2e_method: str) -> str:
    """runs/<first config file's name>[-<l2e method>]: a baseline and its L2E / MEmeL run land apart."""
    name = Path(first_config).stem
    return f"runs/{name}" if l2e_method == "none" else f"runs/{name}-{l2e_method}"


def config_to_dict(cfg: RunConfig) -> dict:
    return to_dict(cfg)
