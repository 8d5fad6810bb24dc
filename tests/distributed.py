"""Run a function on N local CPU ranks (gloo) in fresh processes and collect each rank's return value.

Each call spawns new processes, so megatron-core's and DeepSpeed's process-global state never leaks
between a distributed run and the single-process reference computed in the same test.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from l2e_dist.parallel.launch_env import free_port


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one rank of a single-node world (one thread per rank)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(*args))
    except BaseException as exc:  # report to the parent, which re-raises with the traceback
        result = ("error", f"rank {rank}: {exc!r}\n{traceback.format_exc()}")
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size: int, *args) -> list:
    """fn(*args) on `world_size` ranks; returns [result of rank 0, rank 1, ...]."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, out_dir),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(value)
            results.append(value)
    return results
