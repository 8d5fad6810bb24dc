"""Operational log lines: `<UTC time> l2e-dist: <message>` on stdout, once per job (rank 0).

Checkpoint fallbacks, a changed seed, resharding on resume, a kept snapshot are things a user must be able to
find in the job log. As Python warnings they went to stderr once per rank and vanished under `-W ignore`; here
they are plain timestamped lines that grep finds next to the training progress. Real warnings (a degraded
result, a misconfiguration) stay `warnings.warn`.
"""

from __future__ import annotations

import os
import sys
import time

PREFIX = "l2e-dist:"
# The launchers' rank variables (torchrun/deepspeed, Slurm, Open MPI, MPICH/PMIx), before torch.distributed is up.
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def utc_timestamp(seconds: float | None = None) -> str:
    """`2026-01-31T12:00:00Z`: sortable, unambiguous across the time zones of a cluster's nodes."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def global_rank() -> int:
    """This process's rank: torch.distributed's once initialised, else the launcher's environment (0 alone)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in _RANK_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def write_line(text: str) -> None:
    """One write() per line: ranks sharing a job log (mpirun, srun) then never interleave mid-line."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def log_event(message: str, *, every_rank: bool = False) -> None:
    """Print `<UTC time> l2e-dist: message` on rank 0 (on every rank with `every_rank`, tagged with the rank)."""
    rank = global_rank()
    if rank != 0 and not every_rank:
        return
    where = f"[rank {rank}] " if every_rank and rank != 0 else ""
    write_line(f"{utc_timestamp()} {PREFIX} {where}{' '.join(message.split())}")
