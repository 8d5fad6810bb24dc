"""The benchmark report: the JSON written to --out and the fixed-width table printed."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from l2e_dist.fileio import atomic_write_text


def versions() -> dict[str, str]:
    import deepspeed
    import megatron.core
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron_core": megatron.core.__version__, "transformers": transformers.__version__}


def format_table(report: dict) -> str:
    """A fixed-width summary of a `run_benchmark` report."""
    meta = report["meta"]
    lines = [
        f"device {meta['device']} ({meta['device_name']}), threads {meta['threads']}, load avg "
        f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f} on {meta['cpu_count']} CPUs; "
        f"{meta['params'] / 1e6:.2f}M params, batch {meta['micro_batch_size']}x{meta['grad_accum']}x"
        f"{meta['seq_length']} = {meta['tokens_per_step']} tokens/step, {meta['precision']}, "
        f"ZeRO {meta['zero_stage']} (runs as {meta.get('zero_stage_effective', meta['zero_stage'])} at dp=1), {meta['rounds']} rounds after {meta['warmup_steps']} warm-up steps each",
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


def write_report(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")

