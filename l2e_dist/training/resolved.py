"""What a run derives at start-up, computed once: the resolved run.

The user's config says what they asked for (`model.vocab_size: null` = "the tokenizer's"; `l2e.num_features: 0`
= "as many as the data has labels"; a ZeRO stage; a global batch). The resolved run holds what that means on
this launch: the vocabulary and feature count read from the data, the data-parallel size, the gradient
accumulation steps and the ZeRO stage the engine really runs. It is built once, before the model, and the
trainer reads only it; the caller's config is never changed. Checkpoints store it (client state `resolved`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from l2e_dist.config import RunConfig, default_output_dir, validate_world
from l2e_dist.config_utils import ConfigError
from l2e_dist.data import Datasets
from l2e_dist.parallel.batching import accumulation_steps
from l2e_dist.training.optim import effective_zero_stage


@dataclass(frozen=True)
class Derived:
    """The derived figures (what the checkpoint records)."""

    world_size: int
    tensor_parallel: int
    data_parallel: int
    grad_accum_steps: int
    zero_stage: int
    vocab_size: int
    padded_vocab_size: int
    num_features: int
    data_seed: int | None = None  # the seed of a Pythia data order (data.data_seed or the index maps' names)


@dataclass(frozen=True)
class ResolvedRun:
    config: RunConfig  # a copy of the user's config with the derived values filled in
    derived: Derived

    def record(self) -> dict:
        return asdict(self.derived)


def resolve_vocab_size(cfg: RunConfig, tokenizer_vocab: int) -> int:
    """model.vocab_size, or the tokenizer's when null; refused when smaller than the tokenizer's."""
    if cfg.model.vocab_size is None:
        return tokenizer_vocab
    if cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            "model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}: "
            "set it to null or at least the tokenizer vocabulary"
        )
    return cfg.model.vocab_size


def resolve_num_features(cfg: RunConfig, datasets: Datasets) -> int:
    """l2e.num_features, or the data's label count when FKR is on and it is 0."""
    if not (cfg.l2e.fkr and cfg.l2e.num_features == 0):
        return cfg.l2e.num_features
    if not datasets.feature_names:
        raise ConfigError(
            "l2e.fkr", "needs feature labels, but the data has none (no <prefix>.labels.npy from l2e-prepare-data "
            "--label-field, or data.labels=false): set l2e.fkr=false or prepare the data with labels"
        )
    return len(datasets.feature_names)


def resolve_run(cfg: RunConfig, world_size: int, datasets: Datasets) -> ResolvedRun:
    """The resolved run of `cfg` launched on `world_size` processes over `datasets`."""
    dp_size = validate_world(cfg, world_size)
    resolved = copy.deepcopy(cfg)
    if resolved.train.output_dir is None:  # a config not read by load_config (which names it after the file)
        resolved.train.output_dir = default_output_dir("default", cfg.l2e.method)
    resolved.model.vocab_size = resolve_vocab_size(cfg, datasets.vocab_size)
    resolved.l2e.num_features = resolve_num_features(cfg, datasets)
    resolved.data.data_seed = datasets.data_seed
    tp = cfg.parallel.tensor_parallel
    derived = Derived(
        world_size=world_size,
        tensor_parallel=tp,
        data_parallel=dp_size,
        grad_accum_steps=accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp_size),
        zero_stage=effective_zero_stage(cfg, dp_size),
        vocab_size=resolved.model.vocab_size,
        padded_vocab_size=resolved.model.padded_vocab_size(tp),
        num_features=resolved.l2e.num_features,
        data_seed=datasets.data_seed,
    )
    return ResolvedRun(resolved, derived)
