"""Native GPT-NeoX checkpoints (gpt-neox + DeeperSpeed 0.3.15, ZeRO-1 elastic): a miniature written by
tests/neox_writer.py from known tensors is read back exactly (TP 1/2/4, DP 1..3, one or several communication
intervals); bad inputs are one line naming the file; a branch from it (1 process, and 2 processes at another
layout) continues AdamW exactly as torch.optim.AdamW does from the same masters, moments and step count."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed
from tests.neox_writer import random_state, write_neox_checkpoint

LAYERS, HIDDEN, HEADS = 2, 64, 4
ITERATION, SKIPPED = 10, 3  # 7 updates taken: Adam step 7, AnnealingLR num_iters 7, next batch 10
SCALER = {"cur_scale": 2048.0, "cur_iter": 10, "last_overflow_iter": 6, "scale_factor": 2.0, "scale_window": 1000,
          "min_scale": 1, "delayed_shift": 2, "cur_hysteresis": 1, "consecutive_hysteresis": False}


def _pad(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def _known_state(padded_vocab: int, seed: int = 0) -> tuple[dict, dict, dict]:
    masters = random_state(LAYERS, HIDDEN, padded_vocab, seed, scale=0.05)
    exp_avg = random_state(LAYERS, HIDDEN, padded_vocab, seed + 1, scale=1e-3)
    exp_avg_sq = random_state(LAYERS, HIDDEN, padded_vocab, seed + 2, positive=True, scale=1e-6)
    return masters, exp_avg, exp_avg_sq


def _write(path, tp: int, dp: int, bucket: int, padded_vocab: int = 512, seed: int = 0, iteration: int = ITERATION):
    state = _known_state(padded_vocab, seed)
    layout = write_neox_checkpoint(path, *state, num_layers=LAYERS, num_heads=HEADS, tp=tp, dp=dp, bucket=bucket,
                                   iteration=iteration, skipped_steps=SKIPPED, loss_scaler=SCALER,
                                   max_position_embeddings=32)
    return state, layout


# ------------------------------------------------------------------------------------------------- reader
@pytest.mark.parametrize(("tp", "dp", "bucket", "several_intervals"), [
    (1, 1, 10**9, False), (1, 2, 10**9, False), (2, 1, 4000, True), (2, 2, 3000, True),
    pytest.param(4, 3, 2000, True, marks=pytest.mark.slow),  # 12 shards: the largest write of the file
])  # fmt: skip
def test_reader_returns_the_written_tensors(tmp_path, tp, dp, bucket, several_intervals):
    from l2e_dist.checkpoint.neox_native import WEIGHT_KIND, NeoxNativeCheckpoint
    from l2e_dist.model.tp_layout import partition_dim, split_tensor

    (masters, exp_avg, exp_avg_sq), layout = _write(tmp_path / "global_step10", tp, dp, bucket)
    assert (max(max(c) for c in layout["intervals"]) > 1) == several_intervals
    source = NeoxNativeCheckpoint(tmp_path / "global_step10")
    assert (source.tp_size, source.dp_size) == (tp, dp)
    assert sorted(source.names) == sorted(masters)
    for name in masters:
        for kind, expected in (("fp32", masters), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            torch.testing.assert_close(source.full(name, kind), expected[name], rtol=0, atol=0, msg=f"{name} {kind}")
        torch.testing.assert_close(source.full(name, WEIGHT_KIND), masters[name].half().float(), rtol=0, atol=0)
    for target in (t for t in (1, 2, 4) if tp % t == 0):  # a target rank reads only the source shards it covers
        for name in masters:
            for rank in range(target):
                sliced = source.tp_slice(name, "exp_avg", target, rank, rows=512)
                expected = split_tensor(name, exp_avg[name], target, rank)
                if sliced is not None:
                    torch.testing.assert_close(sliced, expected, rtol=0, atol=0, msg=f"{name} {target} {rank}")
                else:
                    assert partition_dim(name) is None, name
    assert source.optimizer_step().item() == ITERATION - SKIPPED
    assert (source.iteration, source.num_iters) == (ITERATION, ITERATION - SKIPPED)
    assert source.engine_state == {"lr_scheduler": None, "global_steps": ITERATION,
                                   "global_samples": ITERATION * 1024, "skipped_steps": SKIPPED}
    assert source.loss_scaler_state() == {**SCALER, "dynamic": True}


def test_loss_scaler_restores_into_deepspeeds_dynamic_scaler(tmp_path):
    """The saved fp16 scaler state lands in DeepSpeed 0.19.8's own DynamicLossScaler (an fp16 run's)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from l2e_dist.checkpoint.neox_native import NeoxNativeCheckpoint
    from l2e_dist.checkpoint.reshard import _restore_loss_scale

    _write(tmp_path / "ckpt", 1, 1, 10**9)

    class Holder:
        loss_scaler = DynamicLossScaler(init_scale=2**12, scale_window=1000, min_scale=1, delayed_shift=2,
                                        consecutive_hysteresis=False)

    _restore_loss_scale(Holder, NeoxNativeCheckpoint(tmp_path / "ckpt").loss_scaler_state())
    for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_window"):
        assert getattr(Holder.loss_scaler, key) == SCALER[key], key


# ------------------------------------------------------------------------------------------------- errors
def _one_line_error(path, expected_fragment: str):
    from l2e_dist.checkpoint.neox_native import NeoxNativeCheckpoint
    from l2e_dist.errors import UserError

    with pytest.raises(UserError) as info:
        source = NeoxNativeCheckpoint(path)
        for name in source.names:
            source.full(name, "exp_avg")
    message = str(info.value)
    assert "\n" not in message and expected_fragment in message, message
    return message


@pytest.mark.slow
def test_bad_inputs_are_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good"
    _write(good, 2, 2, 3000)

    def copy(name):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    broken = copy("missing_layer")
    (broken / "layer_03-model_01-model_states.pt").unlink()
    assert "download every file" in _one_line_error(broken, "layer_03-model_01-model_states.pt")

    broken = copy("truncated")
    shard = broken / "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "truncated" in _one_line_error(broken, "zero_pp_rank_1_mp_rank_01_optim_states.pt")

    broken = copy("extra_dp")
    shutil.copy(broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt", broken / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    assert "dp_world_size=2" in _one_line_error(broken, "zero_pp_rank_2_mp_rank_00_optim_states.pt")

    broken = copy("missing_dp")
    (broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _one_line_error(broken, "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    broken = copy("foreign_shard")  # a shard of another partitioning (another bucket size) under the same name
    _write(tmp_path / "other", 2, 2, 5000)
    shutil.copy(tmp_path / "other" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", broken)
    _one_line_error(broken, "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    broken = copy("mixed_steps")  # TP rank 1's engine file of another step
    _write(tmp_path / "later", 2, 2, 3000, iteration=ITERATION + 1)
    shutil.copy(tmp_path / "later" / "mp_rank_01_model_states.pt", broken)
    assert "different steps" in _one_line_error(broken, "mp_rank_01_model_states.pt")

    broken = copy("code_in_pickle")  # a pickle that would call os.system on load is refused, not run
    torch.save({"evil": subprocess.Popen}, broken / "mp_rank_00_model_states.pt")
    assert "subprocess.Popen" in _one_line_error(broken, "mp_rank_00_model_states.pt")


def test_another_model_size_or_branch_step_is_one_line(tmp_path):
    from l2e_dist.checkpoint.manifest import CheckpointError
    from l2e_dist.config import load_config
    from l2e_dist.config_utils import ConfigError
    from l2e_dist.training.neox_branch import neox_branch

    ckpt = tmp_path / "global_step10"
    _write(ckpt, 1, 1, 10**9)
    base = small_run_overrides(tmp_path / "run", str(tmp_path), **{"train.init_from": str(ckpt),
                                                                   "model.vocab_size": 500,
                                                                   "train.train_iters": 20})
    config = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(CheckpointError, match=r"num_layers=2 \(config 3\).*configs/pythia-<size>.yaml"):
        neox_branch(load_config([str(config)], [*base, "model.num_layers=3", "train.branch_step=10"]))
    with pytest.raises(ConfigError, match="set train.branch_step=10"):
        neox_branch(load_config([str(config)], [*base, "train.branch_step=9"]))
    branch = neox_branch(load_config([str(config)], [*base, "train.branch_step=10"]))
    assert (branch.iteration, branch.num_iters) == (ITERATION, ITERATION - SKIPPED)


@pytest.mark.slow
def test_convert_from_neox_writes_our_checkpoint_with_optimizer_state(tmp_path):
    from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint

    (masters, exp_avg, exp_avg_sq), _ = _write(tmp_path / "global_step10", 2, 2, 3000)
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "launcher.convert", "from-neox", str(tmp_path / "global_step10"),
                           str(out), "--tp", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    converted = DeepSpeedCheckpoint(out)
    assert (converted.tp_size, converted.zero_stage) == (4, 0)
    assert converted.optimizer_step().item() == ITERATION - SKIPPED
    assert converted.client_state["neox"]["num_iters"] == ITERATION - SKIPPED
    for name in masters:  # 512 rows: already a multiple of 128 x 4
        for kind, expected in (("fp32", masters), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            torch.testing.assert_close(converted.full(name, kind), expected[name], rtol=0, atol=0, msg=name)
    from transformers import GPTNeoXForCausalLM

    from l2e_dist.checkpoint.convert import export_hf

    hf = GPTNeoXForCausalLM.from_pretrained(str(export_hf(out, tmp_path / "hf-of-converted")))
    torch.testing.assert_close(hf.gpt_neox.layers[1].attention.query_key_value.weight.detach(),
                               masters["layers.1.attention.query_key_value.weight"], rtol=0, atol=0)
    torch.testing.assert_close(hf.gpt_neox.embed_in.weight.detach(), masters["embed_in.weight"], rtol=0, atol=0)
    to_hf = subprocess.run([sys.executable, "-m", "launcher.convert", "to-hf", str(tmp_path / "global_step10"),
                            str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert to_hf.returncode == 2 and "l2e-convert from-neox" in to_hf.stderr, to_hf.stderr
    bad = subprocess.run([sys.executable, "-m", "launcher.convert", "from-neox", str(tmp_path / "missing"),
                          str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# ------------------------------------------------------------------------------------------------- branch
def _run_overrides(tmp_path, data_cache, init_from, vocab, extra) -> list[str]:
    return small_run_overrides(tmp_path / "run", data_cache, **{
        "train.init_from": str(init_from), "train.branch_step": ITERATION, "train.train_iters": ITERATION + 2,
        "model.vocab_size": vocab, "optimizer.grad_clip": 0.0, "optimizer.lr": 1e-3,
        "optimizer.lr_decay_iters": 40, "optimizer.warmup_fraction": 0.5, "optimizer.weight_decay": 0.1,
        **extra})


def _adamw_steps(cfg, masters, exp_avg, exp_avg_sq, restart: bool) -> dict:
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.training.optim import lr_multiplier
    from l2e_dist.training.run_data import global_batch_tokens

    model = GPTNeoX(cfg.model)
    params = dict(model.named_parameters())
    rows = model.padded_vocab_size

    def shaped(name, tensor):
        if name in ("embed_in.weight", "embed_out.weight"):
            out = torch.zeros(rows, HIDDEN)
            keep = min(rows, tensor.shape[0])
            out[:keep] = tensor[:keep]
            return out
        return tensor

    with torch.no_grad():
        for name, param in params.items():
            param.copy_(shaped(name, masters[name]))
    decay = [p for n, p in params.items() if p.ndim >= 2 and "layernorm" not in n and "layer_norm" not in n]
    no_decay = [p for n, p in params.items() if not (p.ndim >= 2 and "layernorm" not in n and "layer_norm" not in n)]
    opt = cfg.optimizer
    adam = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=opt.lr, betas=tuple(opt.betas),
                             eps=opt.eps)
    updates = 0 if restart else ITERATION - SKIPPED
    if not restart:
        for name, param in params.items():
            adam.state[param] = {"step": torch.tensor(float(updates)), "exp_avg": shaped(name, exp_avg[name]),
                                 "exp_avg_sq": shaped(name, exp_avg_sq[name])}
    lrs = []
    for k in range(2):
        lr = opt.lr * lr_multiplier(updates + k if not restart else ITERATION + k, cfg)
        lrs.append(lr)
        for group in adam.param_groups:
            group["lr"] = lr
        tokens = torch.from_numpy(global_batch_tokens(cfg, ITERATION + k)).long()
        loss = model(tokens[:, :-1], tokens[:, 1:], reduction="mean")
        adam.zero_grad()
        loss.backward()
        adam.step()
    out = {n: {"fp32": p.detach().clone(), "exp_avg": adam.state[p]["exp_avg"].clone(),
               "exp_avg_sq": adam.state[p]["exp_avg_sq"].clone()} for n, p in params.items()}
    return {"state": out, "lrs": lrs}


def _references(overrides: list[str], masters, exp_avg, exp_avg_sq) -> tuple[dict, dict]:
    """Two AdamW steps in plain PyTorch from the same masters and moments (step = updates taken), lr at AnnealingLR's
    position (updates taken), on global batches ITERATION and ITERATION + 1: what Pythia's optimizer would do; and
    the same two steps of a fresh AdamW (a restart), which must land elsewhere. One process for both."""
    from l2e_dist.config import load_config
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)
    try:
        cfg = load_config([str(ROOT / "configs" / "tiny.yaml")], overrides)
        return (_adamw_steps(cfg, masters, exp_avg, exp_avg_sq, restart=False),
                _adamw_steps(cfg, masters, exp_avg, exp_avg_sq, restart=True))
    finally:
        destroy_process_groups()


def _vocab(data_cache) -> int:
    from l2e_dist.config import load_config
    from l2e_dist.data import build_datasets

    cfg = load_config([str(ROOT / "configs" / "tiny.yaml")], [f"data.cache_dir={data_cache}"])
    return build_datasets(cfg.data, 32, cfg.train.seed).vocab_size


@pytest.mark.slow
@pytest.mark.parametrize(("source_tp", "source_dp", "ranks", "layout", "convert_first"), [
    (2, 2, 1, {"parallel.tensor_parallel": 1, "deepspeed.zero_stage": 1}, False),
    (1, 2, 2, {"parallel.tensor_parallel": 1, "deepspeed.zero_stage": 2}, False),
    (4, 1, 2, {"parallel.tensor_parallel": 2, "deepspeed.zero_stage": 1}, False),
    (2, 2, 1, {"parallel.tensor_parallel": 1, "deepspeed.zero_stage": 1}, True),  # from l2e-convert from-neox
])  # fmt: skip
def test_branch_continues_adamw_from_the_native_state(tmp_path, data_cache, source_tp, source_dp, ranks, layout,
                                                      convert_first):
    from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
    from tests.conftest import pretrain_result

    vocab = _vocab(data_cache)
    run_tp = layout["parallel.tensor_parallel"]
    source = tmp_path / "global_step10"
    (masters, exp_avg, exp_avg_sq), geometry = _write(source, source_tp, source_dp, 6000,
                                                      padded_vocab=_pad(vocab, 128 * source_tp))
    assert max(max(c) for c in geometry["intervals"]) > 1  # several communication intervals
    if convert_first:
        from l2e_dist.checkpoint.neox_convert import import_neox

        source = import_neox(source, tmp_path / "converted", tp=2)
    overrides = _run_overrides(tmp_path, data_cache, source, vocab, layout)
    result = run_distributed(pretrain_result, ranks, overrides)[0]
    assert result.final_step == ITERATION + 2
    # The reference at TP 1 with the run's padded rows (128 x run_tp): the same logits over the same rows.
    ref_overrides = [*overrides, "parallel.tensor_parallel=1", f"model.make_vocab_size_divisible_by={128 * run_tp}"]
    reference, restart = run_distributed(_references, 1, ref_overrides, masters, exp_avg, exp_avg_sq)[0]
    assert abs(reference["lrs"][0] - restart["lrs"][0]) > 0.1 * reference["lrs"][0]  # position 7 != step 10

    saved = DeepSpeedCheckpoint(tmp_path / "run" / "checkpoints" / f"global_step{ITERATION + 2}")
    assert saved.optimizer_step().item() == ITERATION - SKIPPED + 2
    far_from_restart = 0
    for name, expected in reference["state"].items():
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            got = saved.full(name, kind)
            assert got.shape == expected[kind].shape, name
            torch.testing.assert_close(got, expected[kind], rtol=1e-4, atol=1e-6, msg=f"{name} {kind}")
        far_from_restart += int(not torch.allclose(saved.full(name, "fp32"), restart["state"][name]["fp32"],
                                                   rtol=1e-4, atol=1e-6))
    assert far_from_restart == len(reference["state"])  # a fresh AdamW would have landed elsewhere
