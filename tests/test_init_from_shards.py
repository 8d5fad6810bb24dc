"""`train.init_from` of an HF directory builds the model on the meta device and reads only this TP rank's
shard: at TP=2 the shards, merged, are exactly transformers' weights (vocabulary padding rows zero), from a
single model.safetensors and from an index of several files."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT
from tests.distributed import run_distributed

VOCAB = 300


def _hf_dir(path, max_shard_size: str | None) -> dict[str, torch.Tensor]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=64, rotary_pct=0.25,
                           hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _shards(hf_dir: str, tp: int) -> dict:
    from l2e_dist.config import load_config
    from l2e_dist.parallel.state import current_layout, destroy_process_groups, init_process_groups
    from l2e_dist.training.trainer import build_model

    init_process_groups(tp)
    try:
        cfg = load_config([str(ROOT / "configs" / "tiny.yaml")], [
            "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "model.intermediate_size=256", "model.max_position_embeddings=64", f"model.vocab_size={VOCAB}",
            "train.seq_length=32",
            f"train.init_from={hf_dir}", f"parallel.tensor_parallel={tp}"])
        model = build_model(cfg, current_layout(), torch.device("cpu"))
        assert all(p.device.type == "cpu" for p in model.parameters())
        return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        destroy_process_groups()


@pytest.mark.slow
@pytest.mark.parametrize("max_shard_size", [None, "200KB"])
def test_init_from_hf_reads_this_ranks_shard_at_tp2(tmp_path, max_shard_size):
    from l2e_dist.checkpoint.hf import from_hf_state_dict
    from l2e_dist.model.tp_layout import merge_shards

    reference = from_hf_state_dict(_hf_dir(tmp_path / "hf", max_shard_size))
    assert (tmp_path / "hf" / ("model.safetensors.index.json" if max_shard_size else "model.safetensors")).is_file()
    ranks = run_distributed(_shards, 2, str(tmp_path / "hf"), 2)
    for name, ref in reference.items():
        merged = merge_shards(name, [r[name] for r in ranks])
        if name in ("embed_in.weight", "embed_out.weight"):
            assert merged.shape[0] == 512  # 300 padded to a multiple of 128 x TP
            assert torch.equal(merged[VOCAB:], torch.zeros_like(merged[VOCAB:])), name
            merged = merged[:VOCAB]
        torch.testing.assert_close(merged, ref.float(), rtol=0, atol=0, msg=name)
    assert ranks[0]["embed_in.weight"].shape[0] == 256
