"""`model.cross_entropy: fused`: the chunked LM-head loss with each chunk's softmax done in two fused passes.

The chunked path (lm_head_loss.py) upcasts each chunk's logits to an fp32 copy and then walks it several times in
place (max, subtract + exp, sum, divide, one-hot subtraction, cast back): about ten logits-sized memory passes,
most of them over fp32. Here the chunk's logits stay in the weights' dtype as the GEMM wrote them, and two
kernels read them, computing in fp32 registers:

1. statistics: per row the max, the sum of exponentials relative to it and the target's logit (one reduction
   kernel, reading the row once with Inductor's online softmax, else twice; TP ranks then combine their rows'
   (max, sum) exactly: sum * exp(max - global max));
2. gradient: softmax - onehot(target), written once in the weights' dtype (one pointwise pass).

On CUDA both are `torch.compile`d (Inductor fuses each into one kernel); elsewhere they run eagerly, with the same
arithmetic (and more temporaries than the chunked path's in-place walk: on the CPU keep "chunked"). The loss is
the training mean: as in the chunked path its gradients are computed in the forward, chunk by chunk, and the
backward only scales the saved grad_hidden and grad_weight by the upstream scalar; per-token losses (evaluation,
reduction "none") go through the chunked path. Values and gradients equal the chunked path
(tests/test_fused_cross_entropy.py, TP=1 and vocab-parallel TP=2).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from l2e_dist.model.lm_head_loss import _accumulate_grad_weight, chunked_lm_head_loss, vocab_parallel_inputs

CROSS_ENTROPY_CHOICES = ("chunked", "fused")


def softmax_statistics(logits: torch.Tensor, column: torch.Tensor, inside: torch.Tensor):
    """Per row of `logits` [c, V/tp] (any float dtype): the max, sum(exp(logit - max)) and the target's logit
    (0 where this rank does not hold the target), all fp32 [c]."""
    x = logits.float()
    row_max = x.amax(dim=1)
    sum_exp = (x - row_max[:, None]).exp().sum(dim=1)
    target = x.gather(1, column[:, None]).squeeze(1) * inside
    return row_max, sum_exp, target


def softmax_minus_onehot(logits: torch.Tensor, lse: torch.Tensor, column: torch.Tensor, inside: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """d(per-token loss)/d(logits) = exp(logit - lse) - onehot(target), in `out_dtype` (the onehot only where this
    rank holds the target)."""
    x = logits.float()
    columns = torch.arange(x.shape[1], device=x.device)
    onehot = (columns[None, :] == column[:, None]) & inside[:, None]
    return ((x - lse[:, None]).exp() - onehot.to(x.dtype)).to(out_dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


def compile_kernels(device: torch.device) -> bool:
    """Whether the two passes run `torch.compile`d: on CUDA, where fusing them is the point."""
    return device.type == "cuda"


def _kernels(device: torch.device):
    if compile_kernels(device):
        return _compiled(softmax_statistics), _compiled(softmax_minus_onehot)
    return softmax_statistics, softmax_minus_onehot


def _global_lse_and_target(row_max, sum_exp, target, group):
    """Combine the ranks' vocabulary slices: lse over the whole vocabulary, and the target's logit (held by one
    rank). Two small all_reduces per chunk."""
    if group is None:
        return row_max + sum_exp.log(), target
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack((sum_exp * (row_max - global_max).exp(), target))
    dist.all_reduce(sums, group=group)
    return global_max + sums[0].log(), sums[1]


class _FusedLMHeadMeanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, group, vocab_start: int):
        n, width = hidden.shape[0], weight.shape[0]
        statistics, gradient = _kernels(hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = None
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, n))
            h = hidden[rows]
            logits = h @ weight.t()  # the weights' dtype, as the chunked path computes them before its upcast
            local = labels[rows] - vocab_start
            inside = (local >= 0) & (local < width)
            column = local.clamp(0, width - 1)
            lse, target = _global_lse_and_target(*statistics(logits, column, inside), group)
            losses[rows] = lse - target
            if needs_grad:  # of the SUM of the chunk's losses; backward scales by grad_out / n
                grad = gradient(logits, lse, column, inside, weight.dtype)
                del logits
                torch.mm(grad, weight, out=grad_hidden[rows])
                grad_weight = _accumulate_grad_weight(grad_weight, grad, h)
        ctx.tokens = n
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return losses.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fused LM loss: a second backward through the same graph is not supported")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors  # saved for this backward only: scaled in place
        scale = grad_out / ctx.tokens
        return (grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight.mul_(scale.to(grad_weight.dtype)),
                None, None, None, None)


def fused_lm_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, reduction: str = "none"
) -> torch.Tensor:
    """Same contract as lm_head_loss.chunked_lm_head_loss; the training mean takes the fused passes."""
    if reduction != "mean":
        return chunked_lm_head_loss(hidden, weight, labels, chunk_tokens, reduction)
    flat, group, vocab_start = vocab_parallel_inputs(hidden, weight)
    return _FusedLMHeadMeanLoss.apply(flat, weight, labels.reshape(-1), chunk_tokens, group, vocab_start)


def lm_head_loss_function(choice: str):
    """The LM-head loss of `model.cross_entropy`."""
    return {"chunked": chunked_lm_head_loss, "fused": fused_lm_head_loss}[choice]
