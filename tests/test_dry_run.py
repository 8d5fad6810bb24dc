"""`l2e-pretrain --dry-run`: checks without training, and a per-rank memory estimate that agrees with
DeepSpeed's own ZeRO-2/3 model-state estimators and with the real model's parameter count."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from l2e_dist.config import load_config
from l2e_dist.training.memory import (
    GIB,
    MemoryEstimate,
    estimate_memory,
    model_state_bytes,
    params_per_tp_rank,
)
from launcher.pretrain import main
from tests.conftest import ROOT, small_run_overrides

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("size", ["pythia-410m", "pythia-6.9b"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dp", [1, 4, 16])
def test_model_states_match_deepspeeds_estimators(size, tp, dp):
    cfg = load_config([str(ROOT / "configs" / f"{size}.yaml")], ["model.vocab_size=50277"])
    params, largest = params_per_tp_rank(cfg.model, tp, cfg.model.padded_vocab_size(tp))
    zero2 = sum(model_state_bytes(params, largest, dp, 2, "bf16"))
    assert zero2 == estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=dp, cpu_offload=False)[1]
    zero3 = sum(model_state_bytes(params, largest, dp, 3, "bf16"))
    _, deepspeed_zero3, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=dp, cpu_offload=False, cpu_offload_params=False
    )
    assert zero3 == deepspeed_zero3 + 2 * params // dp  # + the 16-bit parameter partition DeepSpeed leaves out


def test_parameter_count_matches_the_real_model():
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    cfg = load_config([TINY], ["model.vocab_size=1000"])
    init_process_groups(1)
    try:
        model = GPTNeoX(cfg.model)
        padded = model.padded_vocab_size
        params, largest = params_per_tp_rank(cfg.model, 1, padded)
        assert params == sum(p.numel() for p in model.parameters()) == cfg.model.num_parameters(padded)
        assert largest == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    finally:
        destroy_process_groups()
    # TP shards: every split tensor's pieces add up; the replicated ones (layer norms, row-parallel biases)
    # are counted on each rank.
    h, n = cfg.model.hidden_size, cfg.model.num_layers
    replicated = n * (4 * h + 2 * h) + 2 * h
    tp2, _ = params_per_tp_rank(cfg.model, 2, cfg.model.padded_vocab_size(2))
    assert 2 * (tp2 - replicated) + replicated == cfg.model.num_parameters(cfg.model.padded_vocab_size(2))


def test_fp32_and_zero_stages_order():
    params = 10**8
    states = {stage: sum(model_state_bytes(params, 10**6, 8, stage, "fp32")) for stage in (0, 1, 2, 3)}
    assert states[0] == 16 * params  # fp32 params + grads + two moments
    assert states[0] > states[1] > states[2] > states[3]


# The dry run builds no model, so its estimate can be of a model wide enough to show in GiB with 2 decimals:
# the small run's 2 layers, s=32, b=2, at hidden 1024 (8 heads, ffn 4096) and the default corpus's vocab 3000
# (padded to 3072 at TP=1). Parameters P = 2 layers x (12*1024^2 + 13*1024) + 2 x 3072*1024 (embedding, head)
# + 2*1024 (final norm) = 31,485,952; activations 2 layers x 32*2*1024*(10 + 24 + 5*8*32/1024)*2 bytes (fp32)
# + the logits' 8*32*2*3072 bytes = 10,813,440.
WIDE = ("model.hidden_size=1024", "model.num_attention_heads=8")
WIDE_PARAMS = 31_485_952
WIDE_ACTIVATIONS = 10_813_440
# fp32 on one rank (stage 0): 4P parameters, 4P gradients, 8P AdamW moments.
ONE_RANK_LINE = "params 0.12 GiB, grads 0.12 GiB, optimizer 0.23 GiB, activations 0.01 GiB, total 0.48 GiB"
# ZeRO-2 on 2 ranks: 4P parameters, (4 + 4)P/2 gradients, 12P/2 master copy + moments.
ZERO2_DP2_LINE = "params 0.12 GiB, grads 0.12 GiB, optimizer 0.18 GiB, activations 0.01 GiB, total 0.42 GiB"


def test_describe_prints_each_part_and_the_total_in_gib():
    estimate = MemoryEstimate(parameters=GIB, gradients=2 * GIB, optimizer=3 * GIB, activations=GIB // 2)
    assert estimate.describe() == (
        "params 1.00 GiB, grads 2.00 GiB, optimizer 3.00 GiB, activations 0.50 GiB, total 6.50 GiB"
    )


def test_the_wide_models_hand_counted_sizes():
    cfg = load_config([TINY], ["model.num_layers=2", *WIDE, "model.vocab_size=3000"])
    assert cfg.model.num_parameters(cfg.model.padded_vocab_size(1)) == WIDE_PARAMS
    estimate = estimate_memory(cfg.model, 1, 2, 2, "fp32", 2, 32, False)
    assert estimate == MemoryEstimate(4 * WIDE_PARAMS, 4 * WIDE_PARAMS, 6 * WIDE_PARAMS, WIDE_ACTIVATIONS)


def _dry_args(tmp_path, data_cache, *extra: str) -> list[str]:
    args = ["--config", TINY, "--dry-run"]
    for item in (*small_run_overrides(tmp_path / "run", data_cache), *WIDE):
        args += ["--set", item]
    return [*args, *extra]


def test_dry_run_checks_and_prints_without_training(tmp_path, data_cache, capsys):
    assert main(_dry_args(tmp_path, data_cache)) == 0
    out = capsys.readouterr().out
    assert "dry run OK: world=1 tp=1 dp=1 zero=0" in out, out
    line = next(line for line in out.splitlines() if "estimated memory per rank" in line)
    assert line.endswith(f"estimated memory per rank: {ONE_RANK_LINE}"), line
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    assert main(_dry_args(tmp_path, data_cache, "--gpu-mem-gib", "0.0001")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit --gpu-mem-gib 0.0001" in err[0], err
    assert main(_dry_args(tmp_path, data_cache, "--set", f"data.paths=[{tmp_path}/none]")) == 2
    assert "none.idx not found" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_on_two_ranks_zero2(tmp_path, data_cache):
    cmd = ["torchrun", "--nproc_per_node", "2", "-m", "launcher.pretrain",
           *_dry_args(tmp_path, data_cache, "--set", "deepspeed.zero_stage=2")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "dry run OK: world=2 tp=1 dp=2 zero=2" in text and " vocab=3000 " in text, text[-3000:]
    lines = re.findall(r"estimated memory per rank: (.*)", text)
    assert lines == [ZERO2_DP2_LINE], text[-3000:]  # rank 0 only, with the data-parallel size of the world
    assert not (tmp_path / "run").exists()
