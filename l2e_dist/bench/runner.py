"""Run a benchmark: build every variant, warm up, time interleaved rounds, profile, assemble the report."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from l2e_dist.bench.memory import memory_probe
from l2e_dist.bench.report import versions
from l2e_dist.bench.settings import (
    BenchSettings,
    bench_device,
    init_world,
    resolve_configs,
    token_batches,
    warmup_steps,
)
from l2e_dist.bench.stats import quantiles, ratio
from l2e_dist.bench.variants import Variant, build_variants
from l2e_dist.checkpoint.io import state_bytes
from l2e_dist.config import RunConfig
from l2e_dist.fileio import atomic_write_text
from l2e_dist.parallel.collectives import CollectiveCounter
from l2e_dist.parallel.state import destroy_process_groups
from l2e_dist.training.optim import effective_zero_stage
from l2e_dist.training.throughput import device_peak_tflops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(variant: Variant, batch: torch.Tensor, device: torch.device, counter: CollectiveCounter) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = Counter(counter.counts)
    sync(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    variant.step(batch)
    sync(device)
    variant.wall.append(time.perf_counter() - wall0)
    variant.cpu.append(time.process_time() - cpu0)
    variant.collectives.update(counter.counts - before)
    if device.type == "cuda":
        variant.peak_mem.append(torch.cuda.max_memory_allocated(device))


def profile_variants(variants: dict[str, Variant], batches: torch.Tensor, settings: BenchSettings, device) -> list[str]:
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
            sync(device)
        table = prof.key_averages().table(sort_by=sort_by, row_limit=60)
        atomic_write_text(out / f"{name}.txt", table)
        prof.export_chrome_trace(str(out / f"{name}.trace.json"))
        written += [str(out / f"{name}.txt"), str(out / f"{name}.trace.json")]
    return written


def run_benchmark(settings: BenchSettings, progress=None) -> dict:
    """Build every variant, warm up, time `rounds` interleaved rounds; returns the JSON-ready report.

    Runs in a world of 1: it initialises torch.distributed and megatron-core's parallel state unless they are
    (as a world of 1), and tears down what it started."""
    settings.validate()
    device = bench_device(settings)
    cfgs = resolve_configs(settings, device)  # config errors before anything is started
    started = not dist.is_initialized()
    init_world()
    try:
        return _run(settings, cfgs, device, progress or (lambda message: None))
    finally:
        if started:
            destroy_process_groups()


def _run(settings: BenchSettings, cfgs: dict[str, RunConfig], device: torch.device, say) -> dict:
    cfg = next(iter(cfgs.values()))
    loadavg_start = os.getloadavg()
    say(f"building {', '.join(settings.variants)} on {device}")
    variants = build_variants(cfgs, device)
    batches = token_batches(cfg, settings.distinct_batches, device)
    warm = warmup_steps(cfgs, settings)
    say(f"warm-up steps: {warm} per variant")
    for i in range(warm):
        for variant in variants.values():
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
                timed_step(order[(r + k) % len(order)], batch, device, counter)
            loads.append(os.getloadavg()[0])
    loadavg_end = os.getloadavg()
    profiled = profile_variants(variants, batches, settings, device) if settings.profile_dir else []

    padded = cfg.model.padded_vocab_size(1)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    flops_per_token = cfg.model.flops_per_token(cfg.train.seq_length, padded)
    peak_tflops = device_peak_tflops(device)
    results: dict[str, dict] = {}
    for name, v in variants.items():
        wall = quantiles(v.wall)
        tokens_per_s = tokens_per_step / wall["median"]
        per_step = {k: c / settings.rounds for k, c in sorted(v.collectives.items())}
        per_step.setdefault("total", 0.0)
        entry = {
            "step_time_s": wall,
            "cpu_time_s": quantiles(v.cpu),
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
            ratios[f"{num}/{den}"] = ratio(variants[num], variants[den])

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
            "loadavg_1min_during": quantiles(loads),
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
            "versions": versions(),
            "command": sys.argv,
            "profile_files": profiled,
            "peak_note": peak_note,
        },
        "variants": results,
        "ratios": ratios,
    }
    return report

