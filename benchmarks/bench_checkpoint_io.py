"""Checkpoint I/O benchmark: save, verify and resume wall time and peak RSS per rank.

A pythia-410m-shaped model (fp32, CPU, ZeRO-1) takes one optimizer step so that AdamW state exists, then
saves a checkpoint (~6.5 GB of files at DP=2), verifies it the way a resume does, and resumes from it. Every
phase starts and ends at a barrier; its wall time is the slowest rank's, its peak RSS is each rank's VmHWM
over that phase (reset through /proc/self/clear_refs before it starts).

    torchrun --nproc_per_node 2 benchmarks/bench_checkpoint_io.py --out runs/bench/ckpt_io.json
    torchrun --nproc_per_node 2 benchmarks/bench_checkpoint_io.py --config configs/tiny.yaml   # smoke run

Needs about 2 x 7 GB of RAM and 7 GB of disk under --workdir for the 410m shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (Linux >= 4.0)
        f.write("5")


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _phase(name: str, fn, results: dict) -> object:
    import torch.distributed as dist

    dist.barrier()
    _reset_peak_rss()
    start = time.perf_counter()
    value = fn()
    dist.barrier()
    elapsed = time.perf_counter() - start
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, _peak_rss_gib())
    results[name] = {"wall_s": round(elapsed, 2), "peak_rss_gib_per_rank": [round(g, 2) for g in gathered]}
    return value


def _verify_for_resume(ckpt_dir: Path):
    """The verification a resume runs, alone: the collective selection when the code has one, else (the code
    before it) rank 0 verifying everything while the others wait for its answer."""
    import torch.distributed as dist

    from l2e_dist.checkpoint import io

    if hasattr(io, "select_resume_checkpoint"):
        return io.select_resume_checkpoint(ckpt_dir)
    box = [io.find_resume_checkpoint(ckpt_dir, deep=True) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pythia-410m.yaml")
    parser.add_argument("--workdir", default="/tmp/l2e-bench-ckpt-io")
    parser.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    parser.add_argument("--label", default="", help="free text stored with the results, e.g. before/after")
    args = parser.parse_args()
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings()  # a training rank's host-memory settings, before anything allocates a tensor

    import torch
    import torch.distributed as dist

    from l2e_dist.checkpoint.io import resume, save_checkpoint
    from l2e_dist.config import load_config
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups
    from l2e_dist.training.optim import initialize_engine
    from l2e_dist.training.trainer import seed_everything, train_micro_batch

    workdir = Path(args.workdir)
    overrides = [
        "deepspeed.precision=fp32",
        "train.seq_length=16",
        "train.micro_batch_size=1",
        "train.train_iters=10",
        "parallel.watchdog_timeout_s=0",
        "parallel.dist_timeout_s=3600",
        f"train.output_dir={workdir}",
        "model.vocab_size=50277",
        "l2e.method=none",
    ]
    cfg = load_config([args.config], overrides)
    layout = init_process_groups(cfg.parallel.tensor_parallel, cfg.parallel.dist_timeout_s)
    cfg.train.global_batch_size = layout.dp_size  # one micro-batch per rank and step
    rank0 = layout.rank == 0
    if rank0:
        shutil.rmtree(workdir, ignore_errors=True)
    dist.barrier()

    seed_everything(cfg.train.seed)
    model = GPTNeoX(cfg.model)
    engine = initialize_engine(model, cfg, layout.dp_size)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_length + 1))
    train_micro_batch(engine, None, tokens)  # creates the AdamW state
    ckpt_dir = workdir / "checkpoints"
    results: dict = {
        "label": args.label,
        "config": args.config,
        "world_size": layout.world_size,
        "dp": layout.dp_size,
        "zero_stage": int(engine.zero_optimization_stage()),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }
    client_state = {"step": 1, "consumed_samples": layout.dp_size, "config": _config_dict(cfg)}
    _phase("save", lambda: save_checkpoint(engine, ckpt_dir, 1, client_state, keep_last_n=0), results)
    if rank0:
        files = [p for p in (ckpt_dir / "global_step1").rglob("*") if p.is_file()]
        results["checkpoint_gib"] = round(sum(p.stat().st_size for p in files) / 2**30, 2)
        results["checkpoint_files"] = len(files)
    os.sync()
    _phase("verify", lambda: _verify_for_resume(ckpt_dir), results)
    step = _phase("resume", lambda: resume(engine, cfg, ckpt_dir), results)
    results["resumed_step"] = step
    if rank0:
        print(json.dumps(results, indent=1), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(workdir, ignore_errors=True)
    destroy_process_groups()
    return 0


def _config_dict(cfg) -> dict:
    from l2e_dist.config import config_to_dict

    return config_to_dict(cfg)


if __name__ == "__main__":
    sys.exit(main())
