"""The resolved run: what a launch derives (vocabulary, FKR feature count, DP size, accumulation, ZeRO stage) is
computed once into a copy; the user's config is never changed."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from l2e_dist.config import config_to_dict, load_config
from l2e_dist.config_utils import ConfigError
from l2e_dist.parallel.batching import BatchSplitError, accumulation_steps
from l2e_dist.training.resolved import resolve_run
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def _data(vocab: int = 1000, features: tuple[str, ...] = ()):
    return SimpleNamespace(vocab_size=vocab, feature_names=list(features), data_seed=None)  # a Datasets stand-in


def test_derived_values_land_in_a_copy_and_the_users_config_stays():
    cfg = load_config([TINY], ["model.vocab_size=null", "l2e.method=l2e", "l2e.fkr=true", "l2e.num_features=0",
                               "train.global_batch_size=16", "train.micro_batch_size=2", "deepspeed.zero_stage=2"])
    before = copy.deepcopy(config_to_dict(cfg))
    run = resolve_run(cfg, 4, _data(vocab=1000, features=("a", "b", "c")))
    assert config_to_dict(cfg) == before  # nothing written into the caller's config
    assert run.config.model.vocab_size == 1000 and run.config.l2e.num_features == 3
    derived = run.derived
    assert (derived.world_size, derived.data_parallel, derived.grad_accum_steps, derived.zero_stage) == (4, 4, 2, 2)
    assert derived.padded_vocab_size == 1024  # 1000 rounded up to a multiple of 128 (Megatron's default) at TP=1
    assert run.record()["num_features"] == 3


def test_fp32_zero2_on_one_rank_records_the_stage_that_runs():
    cfg = load_config([TINY], ["deepspeed.zero_stage=2", "deepspeed.precision=fp32"])
    assert resolve_run(cfg, 1, _data(vocab=cfg.model.vocab_size or 1000)).derived.zero_stage == 0


def test_resolution_errors_name_the_key():
    cfg = load_config([TINY], ["model.vocab_size=500"])
    with pytest.raises(ConfigError, match="model.vocab_size.*smaller than the tokenizer's 1000"):
        resolve_run(cfg, 1, _data(vocab=1000))
    cfg = load_config([TINY], ["l2e.method=l2e", "l2e.fkr=true", "l2e.num_features=0"])
    with pytest.raises(ConfigError, match="'l2e.fkr'"):
        resolve_run(cfg, 1, _data(vocab=cfg.model.vocab_size or 1000))
    cfg = load_config([TINY], ["train.global_batch_size=8", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="'train.global_batch_size'.*2 x 3 = 6"):
        resolve_run(cfg, 3, _data())


def test_accumulation_steps_is_the_one_batch_rule():
    assert accumulation_steps(1024, 4, 8) == 32 and accumulation_steps(8, 8, 1) == 1
    for bad in ((10, 4, 1), (8, 2, 3), (0, 1, 1), (8, 0, 1)):
        with pytest.raises(BatchSplitError):
            accumulation_steps(*bad)
