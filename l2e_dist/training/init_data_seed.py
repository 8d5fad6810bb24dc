"""The data seed of a `train.init_from` source, so that a branch continues the order its model was trained on.

Where it is read from, first found wins:
* an l2e-dist checkpoint: the seed its run recorded (client state `resolved.data_seed` / `config.data.data_seed`);
* a GPT-NeoX `global_stepN` directory: the `seed` of the run's yml that GPT-NeoX saves in its `configs/` folder
  (GPT-NeoX's default 1234 when the yml sets none: Pythia's standard models);
* else the name of the directory: a PolyPythia repository (`pythia-<size>-seedN`, `neox-ckpt-pythia-...-seedN`,
  or the hub cache's `models--EleutherAI--pythia-<size>-seedN`) says N. Published HF revisions record no seed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from l2e_dist.checkpoint.convert import is_hf_directory, resolve_checkpoint
from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
from l2e_dist.checkpoint.manifest import CheckpointError
from l2e_dist.config import RunConfig
from l2e_dist.data.data_seed import (
    GPT_NEOX_DEFAULT_SEED,
    check_branch_data_seed,
    saved_data_seed,
    seed_in_name,
)


def gpt_neox_config_seed(directory: Path) -> int | None:
    """`seed` of the yml files GPT-NeoX saves in `<global_stepN>/configs/` (None: no such folder)."""
    configs = sorted((directory / "configs").glob("*.yml")) if (directory / "configs").is_dir() else []
    if not configs:
        return None
    for path in configs:
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(values, dict) and values.get("seed") is not None:
            return int(values["seed"])
    return GPT_NEOX_DEFAULT_SEED


def init_from_data_seed(path: str | Path) -> int | None:
    """The data seed `path` (a train.init_from source) was trained on, None when nothing says."""
    path = Path(path)
    if not is_hf_directory(path) and path.exists():
        native = gpt_neox_config_seed(path)
        if native is not None:
            return native
        try:
            seed = saved_data_seed(DeepSpeedCheckpoint(resolve_checkpoint(path)).client_state)
        except (CheckpointError, OSError, KeyError, ValueError):
            seed = None  # not an l2e-dist checkpoint: loading its weights reports what it is
        if seed is not None:
            return seed
    return seed_in_name(path)


def check_init_data_seed(cfg: RunConfig, run_seed: int | None) -> None:
    """A branch (train.init_from) onto another data seed's order is refused in one line."""
    if cfg.train.init_from:
        check_branch_data_seed(cfg.train.init_from, init_from_data_seed(cfg.train.init_from), run_seed)
