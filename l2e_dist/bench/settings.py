"""What a benchmark times: settings, the run config of each variant, its token batches and its device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from l2e_dist.config import RunConfig, load_config
from l2e_dist.config_utils import ConfigError
from l2e_dist.data.default_corpus import VOCAB_SIZE
from l2e_dist.parallel.batching import accumulation_steps
from l2e_dist.parallel.state import default_device, init_process_groups

OUR_METHODS = ("none", "l2e", "memel")
VARIANTS = (*OUR_METHODS, "hf")
# Vocabulary used when the config leaves model.vocab_size to the data: the bundled default corpus's
# tokenizer without data paths, else Pythia's GPT-NeoX-20B tokenizer.
PYTHIA_VOCAB = 50277
CPU_MAX_SEQ_LENGTH = 128
CPU_MAX_MICRO_BATCH = 8


@dataclass
class BenchSettings:
    """What to time: run configs + overrides (as for l2e-pretrain), the variants and the batch shape."""

    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    variants: tuple[str, ...] = VARIANTS
    rounds: int = 30
    warmup: int = 3  # warm-up steps per variant after L2E's late start (see module docstring)
    seq_length: int | None = None  # None: the config's, capped at CPU_MAX_SEQ_LENGTH on CPU
    micro_batch_size: int | None = None  # None: the config's, capped at CPU_MAX_MICRO_BATCH on CPU
    grad_accum: int = 1  # micro-batches per step (the global batch is micro_batch_size x grad_accum)
    threads: int | None = None  # torch intra-op threads; None: 1 on CPU (see the module docstring), torch's on CUDA
    distinct_batches: int = 4
    memory_probe: bool = True  # CPU: peak RSS of a separate process per variant
    probe_steps: int = 3
    profile_dir: str | None = None  # write torch.profiler tables and traces of `profile_steps` per variant
    profile_steps: int = 3

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError("variants", f"must be a non-empty subset of {list(VARIANTS)}, got {unknown or []}")
        for key in ("rounds", "grad_accum", "distinct_batches", "probe_steps", "profile_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise ConfigError("warmup", f"must be >= 0, got {self.warmup}")
        for key in ("seq_length", "micro_batch_size", "threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(key, f"must be >= 1, got {value}")


def resolve_config(settings: BenchSettings, device: torch.device, method: str = "none") -> RunConfig:
    """The run config of one of our variants: the given configs and overrides, then the bench's batch shape,
    precision (fp32 on CPU, bf16 on CUDA) and `l2e.method=<method>` with retrieval auto."""
    shape = [f"train.{key}={value}" for key, value in
             (("seq_length", settings.seq_length), ("micro_batch_size", settings.micro_batch_size)) if value]
    cfg = load_config(settings.configs, [*settings.overrides, *shape, f"l2e.method={method}", "l2e.retrieval=auto"])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = PYTHIA_VOCAB if cfg.data.paths else VOCAB_SIZE
    if device.type == "cpu":
        if not settings.seq_length:
            cfg.train.seq_length = min(cfg.train.seq_length, CPU_MAX_SEQ_LENGTH)
        if not settings.micro_batch_size:
            cfg.train.micro_batch_size = min(cfg.train.micro_batch_size, CPU_MAX_MICRO_BATCH)
    cfg.train.global_batch_size = cfg.train.micro_batch_size * settings.grad_accum
    cfg.train.activation_checkpointing = False
    cfg.deepspeed.precision = "fp32" if device.type == "cpu" else "bf16"
    cfg.validate()
    return cfg


def resolve_configs(settings: BenchSettings, device: torch.device) -> dict[str, RunConfig]:
    """The config of every requested variant ("hf" gets the method-none config: same model, batch, optimizer)."""
    return {name: resolve_config(settings, device, "none" if name == "hf" else name) for name in settings.variants}


def warmup_steps(cfgs: dict[str, RunConfig], settings: BenchSettings) -> int:
    """Warm-up optimizer steps, the same for every variant: the inhibiting variants first get past late start and
    threshold calibration (so that every timed step scores and selects), and the others take as many steps, so
    that no variant is timed earlier in its run (allocator growth, optimizer state, lr schedule) than another."""
    # L2E counts optimizer steps: start_after steps of statistics, one calibration step.
    needed = max((c.l2e.start_after + 1 for c in cfgs.values() if c.l2e.method != "none"), default=0)
    return needed + settings.warmup


def token_batches(cfg: RunConfig, count: int, device: torch.device) -> torch.Tensor:
    grad_accum_steps = accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, 1)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    shape = (count, grad_accum_steps, cfg.train.micro_batch_size, cfg.train.seq_length + 1)
    return torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device)


def bench_device(settings: BenchSettings) -> torch.device:
    device = default_device()
    if settings.threads is not None or device.type == "cpu":
        torch.set_num_threads(settings.threads or 1)
    return device


def init_world() -> None:
    init_process_groups(1)
    if dist.get_world_size() != 1:
        raise RuntimeError("the benchmark runs in a world of 1 process: launch it without torchrun/deepspeed")

