"""The chunked output projection + cross entropy equals the unchunked one in loss and gradients (fp32):
TP=1 against full logits + torch's cross entropy, TP=2 against megatron-core's vocab_parallel_cross_entropy
over a column-parallel projection (the model's path before chunking), both reductions, chunks that do and do
not divide the token count."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

VOCAB, HIDDEN, BATCH, SEQ = 96, 16, 3, 10


def _compare(tp: int, chunk_tokens: int) -> dict:
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        vocab_parallel_cross_entropy,
    )

    from l2e_dist.model.lm_head_loss import chunked_lm_head_loss
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(tp)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        gen = torch.Generator().manual_seed(0)
        hidden0 = torch.randn(BATCH, SEQ, HIDDEN, generator=gen)
        weight_full = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        token_weights = torch.rand(BATCH, SEQ, generator=gen)  # a non-uniform upstream gradient
        shard = VOCAB // tp
        weight0 = weight_full[rank * shard:(rank + 1) * shard].clone()
        errors = {}
        for reduction in ("none", "mean"):
            outputs = {}
            for path in ("reference", "chunked"):
                hidden = hidden0.clone().requires_grad_()
                weight = weight0.clone().requires_grad_()
                if path == "reference":
                    if tp == 1:
                        losses = F.cross_entropy((hidden @ weight.t()).float().view(-1, VOCAB), labels.view(-1),
                                                 reduction="none").view(BATCH, SEQ)
                    else:
                        logits = copy_to_tensor_model_parallel_region(hidden) @ weight.t()
                        losses = vocab_parallel_cross_entropy(logits.float(), labels)
                    out = losses.mean() if reduction == "mean" else losses
                else:
                    out = chunked_lm_head_loss(hidden, weight, labels, chunk_tokens, reduction)
                (out if reduction == "mean" else (out * token_weights).sum()).backward()
                outputs[path] = (out.detach(), hidden.grad, weight.grad)
            if reduction == "none":
                reference_losses = outputs["reference"][0]
            for name, ref, got in zip(("loss", "grad_hidden", "grad_weight"), outputs["reference"], outputs["chunked"]):
                assert ref.shape == got.shape, (name, ref.shape, got.shape)
                errors[f"{reduction}/{name}"] = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        with torch.no_grad():  # evaluation: per-token losses without autograd state
            eval_losses = chunked_lm_head_loss(hidden0, weight0, labels, chunk_tokens, "none")
        errors["no_grad/loss"] = (eval_losses - reference_losses).abs().max().item()
        errors["no_grad/requires_grad"] = float(eval_losses.requires_grad)
        return errors
    finally:
        destroy_process_groups()


@pytest.mark.parametrize("chunk_tokens", [7, 30, 4096])
def test_chunked_loss_equals_full_logits_at_tp1(chunk_tokens):
    errors = _compare(1, chunk_tokens)  # a world of one, in the test process
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_chunked_loss_equals_megatron_vocab_parallel_at_tp2(chunk_tokens):
    for errors in run_distributed(_compare, 2, 2, chunk_tokens):
        assert max(errors.values()) < 1e-5, errors
