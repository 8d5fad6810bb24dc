"""Which rank writes and which rank reads each file of a checkpoint, so that checkpoint I/O scales with the
number of ranks: each writer fsyncs and hashes the files it wrote (while they are in its node's page cache),
and at resume each rank verifies, in parallel with the others, the files it is about to read.

DeepSpeed's file names say whose a file is (see ds_files):
    mp_rank_{tp}_model_states.pt                  written by DP rank 0 of TP rank tp, read by every DP rank of tp
    [bf16_]zero_pp_rank_{dp}_mp_rank_{tp}_*.pt    written and read by the rank at (dp, tp)
    rank_state_{r}.pt                             written and read by global rank r
Any other file, or one of a rank that does not exist in this world (resuming on another layout), is given
to rank i % world for the i-th such file, so that every file is checked by at least one rank.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from l2e_dist.checkpoint.ds_files import _MODEL_FILE, _OPTIM_FILE, _Z3_MODEL_FILE

_RANK_STATE_FILE = re.compile(r"^rank_state_(\d+)\.pt$")


@dataclass(frozen=True)
class RankPosition:
    """Where a rank sits in the world that writes or reads the checkpoint."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int

    @classmethod
    def current(cls) -> RankPosition:
        from l2e_dist.parallel.state import current_layout

        layout = current_layout()
        return cls(layout.rank, layout.world_size, layout.tp_rank, layout.tp_size, layout.dp_rank, layout.dp_size)


def _owners(name: str, me: RankPosition, reading: bool) -> bool | None:
    """Whether `me` owns file `name` (None: nobody in this world does, it goes round-robin)."""
    if m := _MODEL_FILE.match(name):
        tp = int(m.group(1))
        if tp >= me.tp_size:
            return None
        return me.tp_rank == tp and (reading or me.dp_rank == 0)
    if m := _OPTIM_FILE.match(name) or _Z3_MODEL_FILE.match(name):
        dp, tp = int(m.group(1)), int(m.group(2))
        if dp >= me.dp_size or tp >= me.tp_size:
            return None
        return (me.dp_rank, me.tp_rank) == (dp, tp)
    if m := _RANK_STATE_FILE.match(name):
        rank = int(m.group(1))
        return None if rank >= me.world_size else me.rank == rank
    return None


def files_of_rank(relative_paths: list[str], me: RankPosition, reading: bool) -> list[str]:
    """The files (paths relative to the checkpoint) that `me` wrote (`reading=False`) or will read."""
    mine, unowned = [], []
    for rel in sorted(relative_paths):
        owned = _owners(os.path.basename(rel), me, reading)
        if owned is None:
            unowned.append(rel)
        elif owned:
            mine.append(rel)
    return mine + [rel for i, rel in enumerate(unowned) if i % me.world_size == me.rank]


def relative_files(ckpt: Path, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name not in skip)
