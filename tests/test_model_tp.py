"""Tensor parallelism is exact: the same weights at TP=2 and TP=1 give the same logits and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

VOCAB = 250  # padded to 256 at TP=1 and TP=2 (multiple of 128 x TP)


def _model_cfg(**overrides):
    from l2e_dist.model.config import ModelConfig

    base = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32
    )
    return ModelConfig(**{**base, **overrides})


OVERRIDES = [{}, {"use_parallel_residual": False, "gelu_approximate": "none"}]


def _forward_backward(tp: int, overrides: dict) -> dict:
    """Logits, loss, gradients and weights (gathered to full size) of one forward and backward at TP=`tp`, in an
    initialised world of `tp` ranks."""
    from megatron.core import parallel_state

    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.model.tp_layout import merge_shards

    torch.manual_seed(0)
    model = GPTNeoX(_model_cfg(**overrides))
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    group = parallel_state.get_tensor_model_parallel_group()

    def gather(name: str, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return merge_shards(name, parts)

    real_all_reduce, calls = dist.all_reduce, []

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce  # megatron's mappings call torch.distributed.all_reduce
    try:
        logits = model(tokens[:, :-1]).detach()  # forward without labels: logits stay sharded
    finally:
        dist.all_reduce = real_all_reduce
    logits = gather("embed_out.weight", logits.transpose(0, -1)).transpose(0, -1)
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    grads = {n: gather(n, p.grad) for n, p in model.named_parameters()}
    weights = {n: gather(n, p.detach()) for n, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.detach(), "grads": grads, "weights": weights,
            "forward_all_reduces": len(calls)}


def _every_variant(tp: int) -> list[dict]:
    """_forward_backward for each of OVERRIDES, in one world (TP=1: the test process; TP=2: two spawned ranks)."""
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(tp)
    try:
        return [_forward_backward(tp, overrides) for overrides in OVERRIDES]
    finally:
        destroy_process_groups()


@pytest.fixture(scope="module")
def tp2_ranks() -> list[list[dict]]:
    """Per rank of one TP=2 world, the results of every variant (one world for both: a process start is the cost)."""
    return run_distributed(_every_variant, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", range(len(OVERRIDES)), ids=["parallel_residual", "sequential_exact_gelu"])
def test_tp2_equals_tp1(variant, tp2_ranks):
    overrides = OVERRIDES[variant]
    ref = _every_variant(1)[variant]
    for rank_results in tp2_ranks:
        rank_result = rank_results[variant]
        for name, w in ref["weights"].items():  # same full weights at every TP size (CPU init)
            torch.testing.assert_close(rank_result["weights"][name], w, rtol=0, atol=0)
        torch.testing.assert_close(rank_result["logits"], ref["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(rank_result["loss"], ref["loss"], rtol=0, atol=1e-5)
        assert ref["grads"].keys() == rank_result["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(rank_result["grads"][name], g, rtol=0, atol=1e-5, msg=name)
        # TP all-reduces in a forward: the embedding's, then one per layer with the parallel residual (both
        # branches' partial sums reduced together) or two per layer without it.
        per_layer = 2 if overrides.get("use_parallel_residual") is False else 1
        assert rank_result["forward_all_reduces"] == 1 + per_layer * _model_cfg().num_layers
    assert ref["forward_all_reduces"] == 0
    # the test is not vacuous: gradients are non-trivial everywhere
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """Reference rotary as GPT-NeoX/HF write it. x: [b, heads, s, d]; rotate the first `rotary_dims` dims."""
    if rotary_dims == 0:
        return x
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


@pytest.mark.parametrize("rotary_dims", [0, 4, 16])
def test_split_qkv_rotary_matches_the_reference_rotary(rotary_dims):
    # The fused split+rotary (values and gradients) against view/transpose/split + apply_rotary, in float64.
    from l2e_dist.model.gpt_neox import RotaryEmbedding, split_qkv_rotary

    b, s, heads, hd = 2, 7, 3, 16
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, heads, 3 * hd, dtype=torch.float64, generator=gen, requires_grad=True)
    grads_out = [torch.randn(b, heads, s, hd, dtype=torch.float64, generator=gen) for _ in range(3)]
    cos, sin = RotaryEmbedding(rotary_dims, 10000)(s, qkv.device) if rotary_dims else (torch.ones(s, 0),) * 2

    fused = split_qkv_rotary(qkv, cos, sin, rotary_dims)
    (grad_fused,) = torch.autograd.grad(fused, qkv, grads_out)
    q, k, v = qkv.transpose(1, 2).split(hd, dim=-1)
    reference = (apply_rotary(q, cos, sin, rotary_dims), apply_rotary(k, cos, sin, rotary_dims), v)
    (grad_reference,) = torch.autograd.grad(reference, qkv, grads_out)

    for got, want in zip(fused, reference):
        assert got.is_contiguous() and torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(grad_fused, grad_reference, rtol=0, atol=1e-12)
    if rotary_dims:  # the rotation did something: q differs from the unrotated split
        assert not torch.allclose(fused[0], q)
