"""CPU peak memory of one variant: a separate fresh process builds and trains only that variant."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue as queue_module
import resource
import sys

from l2e_dist.bench.settings import (
    BenchSettings,
    bench_device,
    init_world,
    resolve_configs,
    token_batches,
    warmup_steps,
)
from l2e_dist.bench.variants import build_variants
from l2e_dist.parallel.host_memory import apply_process_settings
from l2e_dist.parallel.launch_env import free_port


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
    apply_process_settings()  # a process of its own: THP came with the environment, freed memory is kept here
    try:
        device = bench_device(settings)
        cfgs = resolve_configs(settings, device)
        init_world()
        baseline = peak_rss_bytes()
        variant = build_variants(cfgs, device)[name]
        batches = token_batches(cfgs[name], settings.distinct_batches, device)
        for i in range(warmup_steps(cfgs, settings) + settings.probe_steps):
            variant.step(batches[i % len(batches)])
        peak = peak_rss_bytes()
        queue.put(("ok", {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline}))
    except BaseException as exc:  # reported by the parent
        queue.put(("error", repr(exc)))


def memory_probe(settings: BenchSettings, name: str) -> dict:
    """Peak RSS of a fresh process that builds only variant `name` and runs warm-up + `probe_steps` steps."""
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

