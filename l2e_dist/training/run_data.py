"""Which global batches a run consumes, and the checks that the data can feed the whole run.

The trainer, its validation pass and `l2e-prepare-data batch` all get their batches from `run_batches`, so the
batch viewer shows exactly what training consumes. Global batch s (0-based) is what optimizer step s + 1
trains on: a run resumed or branched at step N (e.g. from Pythia's revision `stepN`, which has seen batches
0 .. N-1) trains on global batch N first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from l2e_dist.config import RunConfig
from l2e_dist.config_utils import ConfigError
from l2e_dist.data import Datasets, build_datasets, global_batch_iterator
from l2e_dist.data.tokenizer import TextTokenizer
from l2e_dist.training.init_data_seed import check_init_data_seed

SPLITS = ("train", "valid", "test")
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) x TP: at most 1023 rows at TP 8.
MAX_VOCAB_PADDING = 1024


def run_batches(cfg: RunConfig, dataset, *, dp_rank: int, dp_size: int, start_step: int = 0,
                split: str = "train") -> Iterator[list[dict[str, torch.Tensor]]]:
    """This DP rank's micro-batches of every global batch from `start_step` on (validation draws its
    packed-order batches with seed + 1, so they differ from training's)."""
    seed = cfg.train.seed if split == "train" else cfg.train.seed + 1
    return global_batch_iterator(dataset, global_batch_size=cfg.train.global_batch_size,
                                 micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 seed=seed, start_step=start_step)


def first_step(cfg: RunConfig) -> int:
    """The step a fresh (not resumed) run starts from: 0, or train.branch_step."""
    return cfg.train.branch_step or 0


def global_batch_tokens(cfg: RunConfig, step: int, split: str = "train", datasets: Datasets | None = None) -> np.ndarray:
    """Token ids [global_batch_size, seq_length + 1] of global batch `step` of `split`, in the order the
    data-parallel ranks' micro-batches cover it (the same at any DP size). The model trains on
    tokens[:, :-1] -> tokens[:, 1:]."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if step < 0:
        raise ConfigError("step", f"must be >= 0, got {step}")
    if datasets is None:
        datasets = build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed)
    dataset = getattr(datasets, split)
    if len(dataset) == 0:
        raise ConfigError("data.split", f"the {split} split has no samples: give it a share in data.split")
    if getattr(dataset, "in_file_order", False):
        batches = len(dataset) // cfg.train.global_batch_size
        if step >= batches:
            raise ConfigError("step", f"{step} is past the end of the {split} data: it holds {batches} global "
                              f"batches of {cfg.train.global_batch_size} in file order (steps 0..{batches - 1})")
    micro_batches = next(run_batches(cfg, dataset, dp_rank=0, dp_size=1, start_step=step, split=split))
    return torch.cat([micro["tokens"] for micro in micro_batches]).numpy()


def check_run_data(cfg: RunConfig, datasets: Datasets) -> None:
    """Data in file order has an end: the branch step, every training step and the validation batches must
    fall inside it. Raises ConfigError naming the key to change."""
    gbs = cfg.train.global_batch_size
    train = datasets.train
    if getattr(train, "in_file_order", False):
        batches = len(train) // gbs
        where = f"the training data holds {batches} global batches of {gbs} in file order ({len(train)} samples)"
        branch = cfg.train.branch_step
        if branch is not None and branch >= batches:
            raise ConfigError("train.branch_step", f"{branch} is past the end of the data: {where}")
        if cfg.train.train_iters > batches:
            raise ConfigError("train.train_iters", f"{cfg.train.train_iters} steps need {cfg.train.train_iters * gbs} "
                              f"samples but {where}: lower train.train_iters (optimizer.lr_decay_iters keeps the "
                              "schedule's length) or give training a larger share in data.split")
    valid = datasets.valid
    if cfg.train.eval_interval and getattr(valid, "in_file_order", False):
        needed = cfg.train.eval_iters * gbs
        if len(valid) < needed:
            raise ConfigError("train.eval_iters", f"{cfg.train.eval_iters} validation batches need {needed} samples "
                              f"but the held-out range (data.split) holds {len(valid)}: lower train.eval_iters, "
                              "give validation a larger share in data.split, or set data.valid_paths")
    check_init_vocab(cfg, datasets.vocab_size)
    check_init_data_seed(cfg, datasets.data_seed)  # a branch continues its model's data order


def check_init_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    """With train.init_from an HF directory: the data's tokenizer must be the one the checkpoint was trained
    with: the same vocabulary as its tokenizer.json when it ships one (Pythia's do), and an embedding with one
    row per token plus at most Megatron's padding (< 1024 rows: make_vocab_size_divisible_by 128 x TP 8; Pythia's
    are padded to 50304 .. 50688 for 50277 tokens). Otherwise rows would be missing or mean other tokens."""
    path = Path(cfg.train.init_from) if cfg.train.init_from else None
    if path is None or not (path / "config.json").is_file():
        return  # l2e-dist checkpoints: load_init_weights checks the architecture; vocab rows are resized there
    try:
        rows = int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError("train.init_from", f"cannot read vocab_size from {path / 'config.json'}: {exc}") from None
    if (path / "tokenizer.json").is_file():
        shipped = TextTokenizer(str(path / "tokenizer.json"), threads=False).vocab_size
        if shipped != tokenizer_vocab:
            raise ConfigError("data.tokenizer", f"has {tokenizer_vocab} tokens but train.init_from={path} was "
                              f"trained with a {shipped}-token tokenizer (its tokenizer.json): use that tokenizer")
    if not tokenizer_vocab <= rows < tokenizer_vocab + MAX_VOCAB_PADDING:
        raise ConfigError("data.tokenizer", f"has {tokenizer_vocab} tokens but train.init_from={path} has {rows} "
                          "embedding rows: use the tokenizer that checkpoint was trained with (Pythia: GPT-NeoX-20B's "
                          "20B_tokenizer.json, 50277 tokens)")
