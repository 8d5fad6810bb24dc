"""Training-step benchmark: our step (method none / l2e / memel) against transformers' GPTNeoXForCausalLM.

Every variant is built once in ONE process (a world of 1 on gloo, or NCCL on a GPU): our GPT-NeoX under a
DeepSpeed engine (ZeRO stage and precision from the config, the trainer's optimizer and schedule) and the same
weights in Hugging Face's `GPTNeoXForCausalLM` trained by a plain torch AdamW loop (same AdamW settings, same
gradient clipping). The timed steps are interleaved round-robin (one step of each variant per round, the
starting variant rotating), so load drift on a shared machine hits every variant alike; the medians and the
per-round paired ratios are reported.

Choices that matter for reading the figures:
- Device: CPU runs fp32 with 1 intra-op thread unless told otherwise (on a shared, oversubscribed machine OpenMP
  threads waiting on each other made steps ~10x slower and far noisier), sequence length at most 128 and micro
  batch at most 8 unless given. CUDA runs bf16 through the same code: DeepSpeed's bf16 mode for ours, autocast
  bf16 over fp32 weights for transformers; MFU = tokens/s x ModelConfig.flops_per_token / the device's peak
  (training/throughput.py's table, matched to the exact part; none for unknown devices).
- Ratios: median step time of each variant (the headline), the median of the per-round paired ratios with a
  bootstrap 95% interval, and the ratio of 10th percentiles (least disturbed by other load: interference only
  adds time). Load averages before, during and after are in the report.
- Data: `distinct_batches` random token batches drawn once from a seeded generator (vocab of the config) and
  cycled; every variant gets the same batch in a round. Timing does not depend on token values.
- Warm-up: at least `l2e.late_start` + 1 optimizer steps, so the timed L2E/MEmeL steps score and select (the
  steady state) rather than only collecting statistics.
- L2E's statistics all_reduce is issued even in a world of 1 (the reduce group is always passed), so its cost
  and count are in the figures as in a multi-process run. MEmeL here is method memel with retrieval auto
  (per-token top-k); l2e is method l2e with retrieval auto (moving threshold).
- Collectives: torch.distributed's collective functions are wrapped during the timed steps; each call is
  attributed to the first caller outside torch.distributed / deepspeed.comm (l2e_dist.l2e, deepspeed,
  megatron, other). L2E's own count is cross-checked against `L2EInhibitor.collective_count`.
- Memory: on CUDA, torch.cuda.max_memory_allocated over each variant's own timed steps (the peak is reset
  before each step, so interleaving does not mix variants). On CPU a per-variant heap peak cannot be separated
  inside one interleaved process, so two figures are reported: `state_bytes` (parameters, gradients and
  optimizer tensors the variant keeps between steps, shared storages counted once), and, unless disabled,
  `peak_rss_bytes` of a SEPARATE fresh process that builds only that variant and runs a few steps (with
  `baseline_rss_bytes`, the same process's peak before building anything: imports, runtime, process group).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import random
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from l2e_dist.config import RunConfig, load_config
from l2e_dist.config_utils import ConfigError
from l2e_dist.training.optim import effective_zero_stage

OUR_METHODS = ("none", "l2e", "memel")
VARIANTS = (*OUR_METHODS, "hf")
# Vocabulary used when the config leaves model.vocab_size to the data: the bundled default corpus's
# tokenizer without data paths, else Pythia's GPT-NeoX-20B tokenizer.
PYTHIA_VOCAB = 50277
CPU_MAX_SEQ_LENGTH = 128
CPU_MAX_MICRO_BATCH = 8
_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "all_gather_object", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "broadcast", "broadcast_object_list", "reduce", "all_to_all", "all_to_all_single", "barrier", "gather",
    "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


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


# ---------------------------------------------------------------------------------------------- collectives


class CollectiveCounter:
    """Counts torch.distributed collective calls while active, by caller: the first frame outside
    torch.distributed and deepspeed.comm decides the source (l2e, deepspeed, megatron or other).
    Nested calls (one collective implemented by another) count once."""

    _SKIP = (os.sep + os.path.join("torch", "distributed") + os.sep, os.sep + os.path.join("deepspeed", "comm") + os.sep)
    _SOURCES = (
        (os.sep + os.path.join("l2e_dist", "l2e") + os.sep, "l2e"),
        (os.sep + "deepspeed" + os.sep, "deepspeed"),
        (os.sep + "megatron" + os.sep, "megatron"),
    )

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> CollectiveCounter:
        from torch.distributed import distributed_c10d

        originals: dict[int, Any] = {}
        for module in (dist, distributed_c10d):
            for name in _COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is None:
                    continue
                wrapped = originals.setdefault(id(fn), self._wrap(fn, name))
                self._saved.append((module, name, fn))
                setattr(module, name, wrapped)
        backend = self._deepspeed_backend()
        for name in ("all_gather_function", "reduce_scatter_function"):
            fn = getattr(backend, name, None) if backend is not None else None
            if fn is not None:
                self._saved.append((backend, name, fn))
                setattr(backend, name, originals.get(id(fn)) or self._wrap(fn, name))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    @staticmethod
    def _deepspeed_backend():
        module = sys.modules.get("deepspeed.comm.comm")
        return getattr(module, "cdb", None) if module is not None else None

    def _wrap(self, fn, name: str):
        def counted(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self.counts[self._source()] += 1
                self.counts["total"] += 1
                self.counts["op:" + name.lstrip("_")] += 1
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        return counted

    def _source(self) -> str:
        frame = sys._getframe(2)
        while frame is not None and any(s in frame.f_code.co_filename for s in self._SKIP):
            frame = frame.f_back
        filename = frame.f_code.co_filename if frame is not None else ""
        return next((source for marker, source in self._SOURCES if marker in filename), "other")


# ---------------------------------------------------------------------------------------------- variants


def resolve_config(settings: BenchSettings, device: torch.device, method: str = "none") -> RunConfig:
    """The run config of one of our variants: the given configs and overrides, then the bench's batch shape,
    precision (fp32 on CPU, bf16 on CUDA) and `l2e.method=<method>` with retrieval auto."""
    shape = [f"train.{key}={value}" for key, value in
             (("seq_length", settings.seq_length), ("micro_batch_size", settings.micro_batch_size)) if value]
    cfg = load_config(settings.configs, [*settings.overrides, *shape, f"l2e.method={method}", "l2e.retrieval=auto"])
    if cfg.model.vocab_size is None:
        from l2e_dist.data.default_corpus import VOCAB_SIZE

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


@dataclass
class _Variant:
    name: str
    step: Any  # callable(tokens [gas, micro, seq+1]) -> loss float tensor (detached)
    state_roots: list[Any]
    inhibitor: Any = None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_mem: list[int] = field(default_factory=list)
    collectives: Counter = field(default_factory=Counter)
    first_loss: float | None = None


def initial_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The initial weights every variant starts from (our model built with the run's seed), under HF names."""
    from l2e_dist.checkpoint.hf import to_hf_state_dict
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.training.trainer import seed_everything

    seed_everything(cfg.train.seed)
    return to_hf_state_dict(GPTNeoX(cfg.model).state_dict())


def _build_ours(cfg: RunConfig, device: torch.device) -> _Variant:
    from megatron.core import parallel_state

    from l2e_dist.l2e.hooks import attach
    from l2e_dist.l2e.inhibitor import L2EInhibitor
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import current_layout, tensor_and_data_parallel_group
    from l2e_dist.training.optim import initialize_engine
    from l2e_dist.training.trainer import end_l2e_step, seed_everything, train_micro_batch

    layout = current_layout()
    gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
    seed_everything(cfg.train.seed)
    model = GPTNeoX(cfg.model)
    if cfg.train.compile:
        model.compile_layers()
    inhibitor = None
    if cfg.l2e.method != "none":
        layers = cfg.l2e.resolve_layers(cfg.model.num_layers)
        inhibitor = L2EInhibitor(
            cfg.l2e, layers, cfg.model.ffn_size, tp_rank=layout.tp_rank, tp_size=layout.tp_size,
            reduce_group=tensor_and_data_parallel_group(), tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_size=layout.dp_size, micro_batches_per_step=gas, device=device,
        )
        probes = model.mlp_probes(cfg.l2e.activation)
        attach(inhibitor, {layer: probes[layer] for layer in layers})
    engine = initialize_engine(model, cfg, layout.dp_size)
    engine.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step(batch: torch.Tensor) -> torch.Tensor:
        # The trainer's inner loop (l2e_dist/training/trainer.py: pretrain), minus data loading and logging.
        loss_sum.zero_()
        for tokens in batch:
            lm_loss = train_micro_batch(engine, inhibitor, tokens)
            loss_sum.add_(lm_loss.detach().double() / gas)
        end_l2e_step(engine, inhibitor)
        return loss_sum

    roots = [list(engine.module.parameters()), [p.grad for p in engine.module.parameters()], vars(engine.optimizer)]
    inner = getattr(engine.optimizer, "optimizer", None)
    if inner is not None:
        roots.append(vars(inner))
    return _Variant(cfg.l2e.method, step, roots, inhibitor)


def _build_hf(cfg: RunConfig, device: torch.device, weights: dict) -> _Variant:
    from transformers import GPTNeoXForCausalLM

    from l2e_dist.checkpoint.hf import hf_config
    from l2e_dist.training.optim import build_optimizer, build_scheduler

    padded = cfg.model.padded_vocab_size(1)
    model = GPTNeoXForCausalLM(hf_config(cfg.model, padded))
    state = {("lm_head." + k[len("embed_out."):] if k.startswith("embed_out.") else k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("inv_freq") for k in missing):
        raise RuntimeError(f"HF weights do not map 1:1: missing {missing}, unexpected {unexpected}")
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
    clip = cfg.optimizer.grad_clip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision == "bf16")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss_sum.zero_()
        for tokens in batch:
            inputs, labels = tokens[:, :-1], tokens[:, 1:].contiguous()  # HF views labels flat
            with autocast:
                loss = model(input_ids=inputs, labels=labels, shift_labels=labels).loss
            (loss / gas).backward()
            loss_sum.add_(loss.detach().double() / gas)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    return _Variant("hf", step, [list(model.parameters()), vars(optimizer)])


def resolve_configs(settings: BenchSettings, device: torch.device) -> dict[str, RunConfig]:
    """The config of every requested variant ("hf" gets the method-none config: same model, batch, optimizer)."""
    return {name: resolve_config(settings, device, "none" if name == "hf" else name) for name in settings.variants}


def _build_variants(cfgs: dict[str, RunConfig], device: torch.device) -> dict[str, _Variant]:
    return {
        name: _build_hf(cfg, device, initial_weights(cfg)) if name == "hf" else _build_ours(cfg, device)
        for name, cfg in cfgs.items()
    }


def state_bytes(roots: list[Any]) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` through lists, tuples and dicts."""
    seen: set[tuple[str, int]] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(root, 0) for root in roots]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen and storage.nbytes():
                seen.add(key)
                total += storage.nbytes()
        elif depth < 6 and isinstance(obj, (list, tuple)):
            stack.extend((item, depth + 1) for item in obj)
        elif depth < 6 and isinstance(obj, dict):
            stack.extend((item, depth + 1) for item in obj.values())
    return total


# ---------------------------------------------------------------------------------------------- timing


def _token_batches(cfg: RunConfig, count: int, device: torch.device) -> torch.Tensor:
    gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
    generator = torch.Generator().manual_seed(cfg.train.seed)
    shape = (count, gas, cfg.train.micro_batch_size, cfg.train.seq_length + 1)
    return torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(variant: _Variant, batch: torch.Tensor, device: torch.device, counter: CollectiveCounter) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = Counter(counter.counts)
    _sync(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    variant.step(batch)
    _sync(device)
    variant.wall.append(time.perf_counter() - wall0)
    variant.cpu.append(time.process_time() - cpu0)
    variant.collectives.update(counter.counts - before)
    if device.type == "cuda":
        variant.peak_mem.append(torch.cuda.max_memory_allocated(device))


def warmup_steps(cfg: RunConfig, settings: BenchSettings) -> int:
    """Warm-up steps of one variant: inhibiting variants first get past late start and threshold calibration,
    so that every timed step scores and selects."""
    # L2E counts optimizer steps: start_after steps of statistics, one calibration step.
    needed = cfg.l2e.start_after + 1 if cfg.l2e.method != "none" else 0
    return needed + settings.warmup


def _profile(variants: dict[str, _Variant], batches: torch.Tensor, settings: BenchSettings, device) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    out = Path(settings.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    written = []
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, variant in variants.items():
        with profile(activities=activities) as prof:
            for i in range(settings.profile_steps):
                variant.step(batches[i % len(batches)])
            _sync(device)
        table = prof.key_averages().table(sort_by=sort_by, row_limit=60)
        _write_atomic(out / f"{name}.txt", table)
        prof.export_chrome_trace(str(out / f"{name}.trace.json"))
        written += [str(out / f"{name}.txt"), str(out / f"{name}.trace.json")]
    return written


# ---------------------------------------------------------------------------------------------- results


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "min": ordered[0], "max": ordered[-1]}


def _median_ci95(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap 95% interval of the median (fixed seed: the report is reproducible from its step times)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _low_quantile(values: list[float]) -> float:
    return sorted(values)[len(values) // 10]


def _ratio(num: _Variant, den: _Variant) -> dict[str, float]:
    """Step-time ratio num/den. `of_medians` is the headline figure; the paired per-round ratios (same round, same
    load) give its spread and a bootstrap interval; `of_p10` (10th percentiles) is the least disturbed by other
    load on a shared machine, since interference only ever adds time."""
    paired = [a / b for a, b in zip(num.wall, den.wall)]
    q = _quantiles(paired)
    low, high = _median_ci95(paired)
    return {
        "of_medians": statistics.median(num.wall) / statistics.median(den.wall),
        "paired_median": q["median"],
        "paired_p25": q["p25"],
        "paired_p75": q["p75"],
        "paired_median_ci95": [low, high],
        "of_p10": _low_quantile(num.wall) / _low_quantile(den.wall),
        "cpu_time_of_medians": statistics.median(num.cpu) / statistics.median(den.cpu),
    }


def _versions() -> dict[str, str]:
    import deepspeed
    import megatron.core
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron_core": megatron.core.__version__, "transformers": transformers.__version__}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(report: dict) -> str:
    """A fixed-width summary of a `run_benchmark` report."""
    meta = report["meta"]
    lines = [
        f"device {meta['device']} ({meta['device_name']}), threads {meta['threads']}, load avg "
        f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f} on {meta['cpu_count']} CPUs; "
        f"{meta['params'] / 1e6:.2f}M params, batch {meta['micro_batch_size']}x{meta['grad_accum']}x"
        f"{meta['seq_length']} = {meta['tokens_per_step']} tokens/step, {meta['precision']}, "
        f"ZeRO {meta['zero_stage']} (runs as {meta.get('zero_stage_effective', meta['zero_stage'])} at dp=1), {meta['rounds']} rounds after warm-up steps {meta['warmup_steps']}",
        f"{'variant':8s} {'median ms':>10s} {'p25-p75 ms':>15s} {'cpu ms':>9s} {'tokens/s':>10s} {'MFU':>6s} "
        f"{'coll/step':>9s} {'l2e coll':>8s} {'state MiB':>9s} {'peak MiB':>9s}",
    ]
    for name, v in report["variants"].items():
        wall = v["step_time_s"]
        peak = v.get("peak_mem_bytes") or (v.get("peak_rss_bytes", 0) - v.get("baseline_rss_bytes", 0))
        mfu = "-" if v["mfu"] is None else f"{v['mfu']:.3f}"
        peak_mib = "-" if not peak else f"{peak / 2**20:.0f}"
        collectives = v["collectives_per_step"]
        lines.append(
            f"{name:8s} {wall['median'] * 1e3:10.1f} {wall['p25'] * 1e3:7.1f}-{wall['p75'] * 1e3:<7.1f} "
            f"{v['cpu_time_s']['median'] * 1e3:9.1f} {v['tokens_per_s']:10.0f} {mfu:>6s} "
            f"{collectives['total']:9.2f} {collectives.get('l2e', 0.0):8.2f} {v['state_bytes'] / 2**20:9.1f} "
            f"{peak_mib:>9s}"
        )
    lines.append("ratios (step time, num/den): of medians | paired per-round median (95% CI) [p25, p75] | "
                 "of 10th percentiles | CPU time, of medians")
    for key, r in report["ratios"].items():
        low, high = r["paired_median_ci95"]
        lines.append(f"  {key:11s} {r['of_medians']:.4f} | {r['paired_median']:.4f} ({low:.4f}-{high:.4f}) "
                     f"[{r['paired_p25']:.4f}, {r['paired_p75']:.4f}] | {r['of_p10']:.4f} | "
                     f"{r['cpu_time_of_medians']:.4f}")
    if meta.get("peak_note"):
        lines.append(meta["peak_note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry points


def _device(settings: BenchSettings) -> torch.device:
    from l2e_dist.parallel.state import default_device

    device = default_device()
    if settings.threads is not None or device.type == "cpu":
        torch.set_num_threads(settings.threads or 1)
    return device


def _init_world() -> None:
    from l2e_dist.parallel.state import init_process_groups

    init_process_groups(1)
    if dist.get_world_size() != 1:
        raise RuntimeError("the benchmark runs in a world of 1 process: launch it without torchrun/deepspeed")


def run_benchmark(settings: BenchSettings, progress=None) -> dict:
    """Build every variant, warm up, time `rounds` interleaved rounds; returns the JSON-ready report.

    Runs in a world of 1: it initialises torch.distributed and megatron-core's parallel state unless they are
    (as a world of 1), and tears down what it started."""
    settings.validate()
    device = _device(settings)
    cfgs = resolve_configs(settings, device)  # config errors before anything is started
    started = not dist.is_initialized()
    _init_world()
    try:
        return _run(settings, cfgs, device, progress or (lambda message: None))
    finally:
        if started:
            from l2e_dist.parallel.state import destroy_process_groups

            destroy_process_groups()


def _run(settings: BenchSettings, cfgs: dict[str, RunConfig], device: torch.device, say) -> dict:
    cfg = next(iter(cfgs.values()))
    loadavg_start = os.getloadavg()
    say(f"building {', '.join(settings.variants)} on {device}")
    variants = _build_variants(cfgs, device)
    batches = _token_batches(cfg, settings.distinct_batches, device)
    warm = {name: warmup_steps(cfgs[name], settings) for name in variants}
    say(f"warm-up steps: {warm}")
    for i in range(max(warm.values())):
        for name, variant in variants.items():
            if i < warm[name]:
                loss = variant.step(batches[i % len(batches)])
                if i == 0:
                    variant.first_loss = float(loss)
    inhibitor_counts = {n: v.inhibitor.collective_count for n, v in variants.items() if v.inhibitor is not None}
    order = list(variants.values())
    loads = []
    say(f"timing {settings.rounds} interleaved rounds")
    with CollectiveCounter() as counter:
        for r in range(settings.rounds):
            batch = batches[r % len(batches)]
            for k in range(len(order)):
                _timed_step(order[(r + k) % len(order)], batch, device, counter)
            loads.append(os.getloadavg()[0])
    loadavg_end = os.getloadavg()
    profiled = _profile(variants, batches, settings, device) if settings.profile_dir else []

    from l2e_dist.training.throughput import device_peak_tflops

    padded = cfg.model.padded_vocab_size(1)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    flops_per_token = cfg.model.flops_per_token(cfg.train.seq_length, padded)
    peak_tflops = device_peak_tflops(device)
    results: dict[str, dict] = {}
    for name, v in variants.items():
        wall = _quantiles(v.wall)
        tokens_per_s = tokens_per_step / wall["median"]
        per_step = {k: c / settings.rounds for k, c in sorted(v.collectives.items())}
        per_step.setdefault("total", 0.0)
        entry = {
            "step_time_s": wall,
            "cpu_time_s": _quantiles(v.cpu),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None,
            "collectives_per_step": per_step,
            "state_bytes": state_bytes(v.state_roots),
            "first_step_loss": v.first_loss,
            "step_times_s": v.wall,
        }
        if v.inhibitor is not None:
            entry["inhibitor_collectives_per_step"] = (
                v.inhibitor.collective_count - inhibitor_counts[name]) / settings.rounds
        if v.peak_mem:
            entry["peak_mem_bytes"] = max(v.peak_mem)
        results[name] = entry
    ratios = {}
    for num, den in (("l2e", "none"), ("memel", "none"), ("none", "hf"), ("l2e", "hf")):
        if num in variants and den in variants:
            ratios[f"{num}/{den}"] = _ratio(variants[num], variants[den])

    peak_note = None
    if device.type == "cpu" and settings.memory_probe:
        say("memory probe: one fresh process per variant")
        for name in variants:
            results[name].update(memory_probe(settings, name))
        peak_note = ("peak MiB (CPU): peak RSS of a separate process that builds and trains only that variant, "
                     "minus that process's peak before building it (imports, runtime, process group)")
    elif device.type == "cpu":
        peak_note = "peak MiB (CPU): not measured (memory probe disabled)"

    report = {
        "meta": {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg_start": list(loadavg_start),
            "loadavg_end": list(loadavg_end),
            "loadavg_1min_during": _quantiles(loads),
            "configs": settings.configs,
            "overrides": settings.overrides,
            "model": asdict(cfg.model),
            "params": cfg.model.num_parameters(padded),
            "seq_length": cfg.train.seq_length,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": settings.grad_accum,
            "tokens_per_step": tokens_per_step,
            "precision": cfg.deepspeed.precision,
            "zero_stage": cfg.deepspeed.zero_stage,
            "zero_stage_effective": effective_zero_stage(cfg, 1),
            "rounds": settings.rounds,
            "warmup_steps": warm,
            "flops_per_token": flops_per_token,
            "peak_tflops": peak_tflops,
            "l2e": {m: asdict(c.l2e) for m, c in cfgs.items() if c.l2e.method != "none"},
            "versions": _versions(),
            "command": sys.argv,
            "profile_files": profiled,
            "peak_note": peak_note,
        },
        "variants": results,
        "ratios": ratios,
    }
    return report


def write_report(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(report, indent=2) + "\n")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process's address space: Linux VmHWM. (ru_maxrss is no good in a spawned
    child: it starts at the parent's RSS at fork time.) Elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _probe_worker(settings: BenchSettings, name: str, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    try:
        device = _device(settings)
        cfgs = resolve_configs(settings, device)
        _init_world()
        baseline = peak_rss_bytes()
        variant = _build_variants(cfgs, device)[name]
        batches = _token_batches(cfgs[name], settings.distinct_batches, device)
        for i in range(warmup_steps(cfgs[name], settings) + settings.probe_steps):
            variant.step(batches[i % len(batches)])
        peak = peak_rss_bytes()
        queue.put(("ok", {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline}))
    except BaseException as exc:  # reported by the parent
        queue.put(("error", repr(exc)))


def memory_probe(settings: BenchSettings, name: str) -> dict:
    """Peak RSS of a fresh process that builds only variant `name` and runs warm-up + `probe_steps` steps."""
    from l2e_dist.parallel.launch_env import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    probe_settings = dataclasses.replace(settings, variants=(name,), memory_probe=False, profile_dir=None)
    process = ctx.Process(target=_probe_worker, args=(probe_settings, name, free_port(), queue))
    process.start()
    while True:
        try:
            status, value = queue.get(timeout=5.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                status, value = "error", f"the probe process exited with code {process.exitcode}"
                break
    process.join()
    if status != "ok":
        raise RuntimeError(f"memory probe of {name} failed: {value}")
    return value
