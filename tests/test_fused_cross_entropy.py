"""model.cross_entropy=fused equals the chunked path and full-logits cross entropy (loss, grad_hidden,
grad_weight): TP=1 in fp32 and bf16, vocab-parallel TP=2 against a full-logits reference computed in the same
process, chunks that do and do not divide the token count; the whole model's loss and every parameter gradient
equal the chunked path's, and the two passes compiled (as on CUDA, here by Inductor's CPU backend) equal them
eagerly."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

VOCAB, HIDDEN, BATCH, SEQ = 96, 16, 3, 10


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return (got.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-12)


def _loss_and_grads(loss_fn, hidden0, weight0, labels, chunk_tokens):
    hidden = hidden0.clone().requires_grad_()
    weight = weight0.clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels, chunk_tokens)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _compare(tp: int, chunk_tokens: int, dtype: torch.dtype) -> dict:
    import torch.nn.functional as F
    from megatron.core import parallel_state

    from l2e_dist.model.fused_cross_entropy import fused_lm_head_loss
    from l2e_dist.model.lm_head_loss import chunked_lm_head_loss
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(tp)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        gen = torch.Generator().manual_seed(0)
        hidden0 = torch.randn(BATCH, SEQ, HIDDEN, generator=gen).to(dtype)
        weight_full = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(dtype)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        shard = VOCAB // tp
        weight0 = weight_full[rank * shard:(rank + 1) * shard].clone()

        def fused(h, w, y, c):
            return fused_lm_head_loss(h, w, y, c, "mean")

        def chunked(h, w, y, c):
            return chunked_lm_head_loss(h, w, y, c, "mean")

        def full_logits(h, w, y, c):  # the single-process reference: this process holds the whole vocabulary
            return F.cross_entropy((h @ w.t()).float().view(-1, VOCAB), y.view(-1))

        got = _loss_and_grads(fused, hidden0, weight0, labels, chunk_tokens)
        refs = {"chunked": _loss_and_grads(chunked, hidden0, weight0, labels, chunk_tokens)}
        if dtype == torch.float32:
            loss, grad_hidden, grad_weight = _loss_and_grads(full_logits, hidden0, weight_full, labels, chunk_tokens)
            refs["full"] = (loss, grad_hidden, grad_weight[rank * shard:(rank + 1) * shard])
        errors = {}
        for ref_name, ref in refs.items():
            for name, ref_value, value in zip(("loss", "grad_hidden", "grad_weight"), ref, got):
                errors[f"{ref_name}/{name}"] = _relative_error(value, ref_value)
        with torch.no_grad():  # no autograd: the same mean loss, no state kept
            errors["no_grad/loss"] = _relative_error(fused(hidden0, weight0, labels, chunk_tokens), got[0])
        return errors
    finally:
        destroy_process_groups()


@pytest.mark.parametrize("chunk_tokens", [7, pytest.param(4096, marks=pytest.mark.slow)])
def test_fused_equals_chunked_and_full_logits_at_tp1(chunk_tokens):
    (errors,) = run_distributed(_compare, 1, 1, chunk_tokens, torch.float32)
    assert set(errors) >= {"full/loss", "chunked/grad_weight"}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.slow
def test_fused_equals_chunked_in_bf16():
    """Both read the same bf16 logits; the gradients differ at most by a rounding of the bf16 cast."""
    (errors,) = run_distributed(_compare, 1, 1, 7, torch.bfloat16)
    assert errors["chunked/loss"] < 1e-6, errors
    assert max(errors.values()) < 2e-2, errors


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_fused_vocab_parallel_at_tp2_equals_single_process_full_logits(chunk_tokens):
    results = run_distributed(_compare, 2, 2, chunk_tokens, torch.float32)
    for errors in results:
        assert max(errors.values()) < 1e-5, errors


def _model_gradients(settings: list[dict], compile_kernels: bool = False, compile_layers: bool = False) -> list:
    """Loss and every parameter gradient of the same tiny model under each model-config override in `settings`."""
    from l2e_dist.model import fused_cross_entropy
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)
    if compile_kernels:  # what CUDA does, on the CPU
        fused_cross_entropy.compile_kernels = lambda device: True
    try:
        tokens = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(1))
        results = []
        for overrides in settings:
            cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=200,
                              max_position_embeddings=32, loss_chunk_tokens=5, **overrides)
            torch.manual_seed(0)
            model = GPTNeoX(cfg)
            if compile_layers:
                model.compile_layers()
            loss = model(tokens[:, :-1], tokens[:, 1:], reduction="mean")
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        return results
    finally:
        destroy_process_groups()


def _assert_same(reference, other, tolerance: float) -> None:
    assert abs(reference[0] - other[0]) < tolerance * abs(reference[0])
    assert reference[1].keys() == other[1].keys()
    for name, grad in reference[1].items():
        assert _relative_error(other[1][name], grad) < tolerance, name


def test_model_with_fused_cross_entropy_has_the_chunked_gradients():
    (chunked, fused), = run_distributed(_model_gradients, 1, [{}, {"cross_entropy": "fused"}])
    _assert_same(chunked, fused, 1e-5)


@pytest.mark.slow
def test_compiled_fused_passes_and_compiled_layers_equal_eager():
    """Inductor's CPU backend compiles the two passes (as on CUDA) and each layer (train.compile), with a pinned
    attention backend inside the compiled layers: the same loss and gradients as eager chunked."""
    eager, = run_distributed(_model_gradients, 1, [{}])
    compiled, = run_distributed(_model_gradients, 1, [{"cross_entropy": "fused", "attention_backend": "flash"}],
                                True, True)
    _assert_same(eager[0], compiled[0], 1e-4)
