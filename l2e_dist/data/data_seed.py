"""One data order per run: the seed a Pythia data order was drawn with is part of what a run IS.

GPT-NeoX's `seed` draws a Pythia model's init AND its data order (the index maps): Pythia's standard models used
1234, PolyPythia's pythia-<size>-seedN used N. A run records its data seed (client state `resolved.data_seed`
and `config.data.data_seed`); continuing a model on another seed's order, by resume or by branch, mixes two
orders silently, so both are refused in one line that names the two seeds and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from l2e_dist.errors import UserError

# EleutherAI's PolyPythia repositories: pythia-70m-seed3, neox-ckpt-pythia-160m-seed7, models--EleutherAI--...
POLYPYTHIA_NAME = re.compile(r"pythia-[0-9.]+[mb](?:-deduped)?-seed(\d+)(?![0-9])", re.IGNORECASE)
# GPT-NeoX's default `seed` (neox_args.py), the one Pythia's standard and deduped models used
GPT_NEOX_DEFAULT_SEED = 1234


class DataSeedMismatch(UserError):
    """A checkpoint trained on one data seed's order, continued on another's."""


def seed_in_name(path: str | Path) -> int | None:
    """The N of a PolyPythia repository name (`pythia-<size>[-deduped]-seedN`) in `path`, else None."""
    found = POLYPYTHIA_NAME.findall(str(Path(path).resolve()))
    return int(found[-1]) if found else None


def saved_data_seed(client_state: dict) -> int | None:
    """The data seed an l2e-dist checkpoint records (None: not a seeded Pythia order, or an older checkpoint)."""
    resolved = client_state.get("resolved") or {}
    if resolved.get("data_seed") is not None:
        return int(resolved["data_seed"])
    seed = ((client_state.get("config") or {}).get("data") or {}).get("data_seed")
    return None if seed is None else int(seed)


def _fix(source_seed: int) -> str:
    if source_seed == GPT_NEOX_DEFAULT_SEED:
        return (f"seed {source_seed} is Pythia's standard order: data.order=pythia on the pre-shuffled file "
                "(configs/data/pythia_standard_preshuffled.yaml), or that seed's index maps")
    return (f"read seed {source_seed}'s order: --config configs/data/pythia_seed_index_maps.yaml with "
            f"data.index_maps=<seed{source_seed} index maps> data.data_seed={source_seed}")


def check_branch_data_seed(init_from: str, source_seed: int | None, run_seed: int | None) -> None:
    """train.init_from trained on `source_seed`'s order; this run reads `run_seed`'s (None: unknown, not checked)."""
    if source_seed is None or run_seed is None or source_seed == run_seed:
        return
    raise DataSeedMismatch(f"train.init_from={init_from} was trained on data seed {source_seed}'s order but this "
                           f"run reads data seed {run_seed}'s: {_fix(source_seed)}")


def _order_name(seed: int | None) -> str:
    return "no seeded Pythia order" if seed is None else f"data seed {seed}'s order"


def check_resume_data_seed(checkpoint: str | Path, saved: dict, run_seed: int | None) -> None:
    """Resuming `checkpoint` (client state `saved`) on another data order is refused; checkpoints that predate
    the record (no `resolved.data_seed` key) are not checked."""
    if "data_seed" not in (saved.get("resolved") or {}):
        return
    source_seed = saved_data_seed(saved)
    if source_seed == run_seed:
        return
    keep = "the data section it was trained with" + ("" if source_seed is None else f" (data seed {source_seed})")
    raise DataSeedMismatch(f"{checkpoint} was trained on {_order_name(source_seed)} but this run reads "
                           f"{_order_name(run_seed)}: resume with {keep}, or use a new train.output_dir (with "
                           "train.init_from to branch)")
