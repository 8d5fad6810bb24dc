"""Our model is the GPT-NeoX architecture: with the same weights, transformers' GPTNeoXForCausalLM gives
the same logits (both GELU variants, parallel and sequential residual)."""

from __future__ import annotations

import pytest
import torch


def _compare(overrides: dict) -> float:
    from transformers import GPTNeoXForCausalLM

    from l2e_dist.checkpoint.hf import hf_config, to_hf_state_dict
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)  # a world of one, in the test process
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=300,
        max_position_embeddings=64,
        **overrides,
    )
    ours = GPTNeoX(cfg).eval()
    hf = GPTNeoXForCausalLM(hf_config(cfg, ours.padded_vocab_size)).eval()
    state = {k.replace("embed_out.", "lm_head."): v for k, v in to_hf_state_dict(ours.state_dict()).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("inv_freq") for k in missing), missing
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    destroy_process_groups()
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"gelu_approximate": "none", "use_parallel_residual": False, "rotary_pct": 0.5}],
)
def test_logits_match_transformers(overrides):
    assert _compare(overrides) < 1e-4
