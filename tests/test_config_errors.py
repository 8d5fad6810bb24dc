"""Bad configs fail at start-up with exit code 2 and ONE line that names the offending key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from l2e_dist.config import load_config, validate_world
from l2e_dist.config_utils import ConfigError
from launcher.pretrain import main
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")

CASES = [
    (["optimizer.lrr=1e-3"], "optimizer.lrr", "did you mean 'lr'"),
    (["train.micro_batch_size=abc"], "train.micro_batch_size", "expected an integer"),
    (["model.num_attention_heads=3"], "model.num_attention_heads", "must divide hidden_size"),
    (["parallel.tensor_parallel=8"], "parallel.tensor_parallel", "must divide model.num_attention_heads"),
    (["l2e.inhibit_ratio=0.7"], "l2e.inhibit_ratio", "(0, 0.5]"),
    (["l2e.layers=[1, 9]"], "l2e.layers", "out of range"),
    (["l2e.reg_lambda=-1"], "l2e.reg_lambda", ">= 0"),
    (["l2e.method=sparse"], "l2e.method", "must be one of"),
    (["deepspeed.zero_stage=5"], "deepspeed.zero_stage", "0, 1, 2 or 3"),
    (["deepspeed.precision=fp8"], "deepspeed.precision", "must be one of"),
    (["train.seq_length=4096"], "train.seq_length", "max_position_embeddings"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size", "multiple"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "expected 2 items"),
    (["data.paths=[corpus.bin]"], "data.paths[0]", "prefix without extension"),
    (["data.split=90,10"], "data.split", "train,valid,test"),
    (["train.seed"], "train.seed", "key.sub=value"),
    (["deepspeed.extra={train_batch_size: 8}"], "deepspeed.extra.train_batch_size", "computed from train.global_batch"),
    (["deepspeed.extra.zero_optimization.stage=3"], "deepspeed.extra.zero_optimization.stage", "deepspeed.zero_stage"),
]


@pytest.mark.parametrize(("overrides", "key", "phrase"), CASES, ids=[c[1] for c in CASES])
def test_bad_config_names_the_key(overrides, key, phrase, capsys):
    args = ["--config", TINY]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"'{key}'" in err and phrase in err, err


def test_missing_config_file(capsys):
    assert main(["--config", "configs/does-not-exist.yaml"]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and "does-not-exist.yaml" in err


def test_world_size_checks():
    cfg = load_config([TINY], ["parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by TP=2"):
        validate_world(cfg, 3)
    cfg = load_config([TINY], ["train.global_batch_size=16", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="train.global_batch_size.*micro_batch_size x data-parallel size"):
        validate_world(cfg, 4)
    assert validate_world(cfg, 2) == 2


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config([str(path)])
        assert cfg.model.num_attention_heads % cfg.parallel.tensor_parallel == 0
    for overlay in sorted((ROOT / "configs").glob("*/*.yaml")):
        if overlay.parent.name in ("l2e", "deepspeed"):
            load_config([TINY, str(overlay)])


@pytest.mark.slow
def test_cli_exit_code_and_single_line():
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.pretrain", "--config", TINY, "--set", "l2e.inhibit_ratio=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("l2e-pretrain: error: config error at 'l2e.inhibit_ratio'")


@pytest.mark.slow
def test_fkr_without_feature_labels_names_the_key(tmp_path, data_cache):
    # Only known once the data is opened (inside the trainer): still one line and exit code 2.
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.pretrain", "--config", TINY, "--set", "l2e.fkr=true",
         "--set", "data.labels=false", "--set", f"data.cache_dir={data_cache}",
         "--set", f"train.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("l2e-pretrain: error: config error at 'l2e.fkr'") and "set l2e.fkr=false" in last, last
