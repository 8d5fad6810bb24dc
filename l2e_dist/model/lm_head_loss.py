"""Output projection + cross entropy in chunks of tokens: the fp32 logits of a whole micro-batch never exist.

At pythia-160m, micro-batch 32 x 2048 tokens, the full fp32 logits are ~13 GB and their softmax/gradient
passes about a quarter of the step. Here the tokens are processed `chunk_tokens` rows at a time: the chunk's
logits (this TP rank's vocabulary slice, computed in the weights' dtype and upcast to fp32), its loss, and with
a mean loss its gradients, then the chunk's logits are dropped.

- reduction="mean" (training): the gradients are computed in the forward, chunk by chunk (as Liger-Kernel's
  fused linear cross entropy does), since the upstream gradient of a mean is one scalar; backward only scales
  the stored grad_hidden [tokens, hidden] and grad_weight [vocab/tp, hidden] by it. Same GEMMs as an unchunked
  head (logits, grad_hidden, grad_weight), no full-size temporaries.
- reduction="none": per-token losses; without autograd (evaluation) that is all; with autograd the backward
  recomputes each chunk's logits from the saved per-token log-sum-exp (one extra GEMM: for uses that weight
  tokens individually, never the training step).

Vocab-parallel (TP>1), as megatron-core's vocab_parallel_cross_entropy: each rank holds logits of its vocabulary
slice; the max, the sum of exponentials and the target logit are all-reduced over the TP group (three small
all_reduces per chunk); hidden enters through `copy_to_tensor_model_parallel_region`, whose backward all-reduces
the partial grad_hidden of the ranks. Values and gradients equal the unchunked path (tests/test_lm_head_loss.py:
TP=1 against full logits + cross entropy, TP=2 against megatron's vocab_parallel_cross_entropy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


def _chunk_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group):
    """In place: fp32 logits [c, V/tp] -> softmax probabilities (over the whole vocabulary). Returns the per-token
    loss and log-sum-exp [c], and this rank's (row, column) of each target inside its slice."""
    width = logits.shape[1]
    local = labels - vocab_start
    inside = (local >= 0) & (local < width)
    column = local.clamp(0, width - 1)
    target_logit = logits.gather(1, column[:, None]).squeeze(1) * inside
    row_max = logits.amax(dim=1)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(target_logit, group=group)
    logits.sub_(row_max[:, None]).exp_()
    sum_exp = logits.sum(dim=1)
    if group is not None:
        dist.all_reduce(sum_exp, group=group)
    logits.div_(sum_exp[:, None])
    lse = row_max + sum_exp.log()
    return lse - target_logit, lse, inside, column


def _softmax_minus_onehot_(probs: torch.Tensor, inside: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """In place: d(loss_t)/d(logits) = softmax - onehot(target) (the onehot only on the rank holding it)."""
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, column] -= inside.to(probs.dtype)
    return probs


def _accumulate_grad_weight(total: torch.Tensor | None, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """total (fp32) += grad^T @ h: in place for fp32 (addmm_), through an fp32 upcast for bf16/fp16 chunks."""
    if total is None:
        return (grad.t() @ h).float()
    if grad.dtype == torch.float32:
        return total.addmm_(grad.t(), h)
    return total.add_(grad.t() @ h)


class _ChunkedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, group, vocab_start: int, mean: bool):
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grads_now = mean and needs_grad
        if grads_now:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = None
        else:
            lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, n))
            h = hidden[rows]
            logits = (h @ weight.t()).float()
            loss, lse, inside, column = _chunk_softmax_loss(logits, labels[rows], vocab_start, group)
            losses[rows] = loss
            if grads_now:  # of the SUM of the chunk's losses; backward scales by grad_out / n
                grad = _softmax_minus_onehot_(logits, inside, column).to(weight.dtype)
                torch.mm(grad, weight, out=grad_hidden[rows])
                grad_weight = _accumulate_grad_weight(grad_weight, grad, h)
            elif not mean:
                lse_all[rows] = lse
            del logits
        ctx.chunk_tokens, ctx.group, ctx.vocab_start, ctx.mean, ctx.tokens = chunk_tokens, group, vocab_start, mean, n
        if mean:
            if grads_now:
                ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            return losses.mean()
        if needs_grad:
            ctx.save_for_backward(hidden, weight, labels, lse_all)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.mean:
            if getattr(ctx, "consumed", False):
                raise RuntimeError("chunked LM loss: a second backward through the same graph is not supported")
            ctx.consumed = True
            grad_hidden, grad_weight = ctx.saved_tensors  # saved for this backward only: scaled in place
            scale = grad_out / ctx.tokens
            return grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight.mul_(scale.to(grad_weight.dtype)), \
                None, None, None, None, None
        hidden, weight, labels, lse_all = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        width = weight.shape[0]
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, min(start + ctx.chunk_tokens, hidden.shape[0]))
            h = hidden[rows]
            probs = (h @ weight.t()).float().sub_(lse_all[rows, None]).exp_()
            local = labels[rows] - ctx.vocab_start
            inside = (local >= 0) & (local < width)
            grad = _softmax_minus_onehot_(probs, inside, local.clamp(0, width - 1))
            grad = grad.mul_(grad_out[rows, None].float()).to(weight.dtype)
            torch.mm(grad, weight, out=grad_hidden[rows])
            grad_weight = _accumulate_grad_weight(grad_weight, grad, h)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def vocab_parallel_inputs(hidden: torch.Tensor, weight: torch.Tensor):
    """This TP rank's inputs to a vocab-parallel LM-head loss: hidden as [tokens, h] (at TP > 1 through megatron's
    copy region, whose backward all-reduces the partial grad_hidden), the TP group (None at TP = 1) and the first
    vocabulary row of `weight`, this rank's slice."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    if tp > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    return hidden.reshape(-1, hidden.shape[-1]), group, vocab_start


def chunked_lm_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, reduction: str = "none"
) -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` (this TP rank's vocabulary slice of the output projection) against
    `labels`, `chunk_tokens` tokens at a time. hidden [..., h], labels [...]: per-token losses of labels' shape
    (reduction="none") or their mean (reduction="mean"), in fp32."""
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    flat, group, vocab_start = vocab_parallel_inputs(hidden, weight)
    out = _ChunkedLMHeadLoss.apply(flat, weight, labels.reshape(-1), chunk_tokens, group, vocab_start,
                                   reduction == "mean")
    return out if reduction == "mean" else out.view(labels.shape)
