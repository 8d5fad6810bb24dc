"""The two ways L2E / MEmeL act on the selected (token, neuron) pairs, as autograd functions.

L2E regularizer: value = SUM_selected log((z - mu)^2 + delta) with mu a constant; its gradient
2 (z - mu) / ((z - mu)^2 + delta) on the selected pairs pulls them toward the neuron's mean. Two equal forms:
- compact (CPU): the forward already holds the selected pairs' flat indices and derivatives (~p of the
  elements) and the backward scatters only those (nonzero() costs no host sync on the CPU);
- dense (accelerators, where nonzero() would wait for the device): the backward keeps only z (which the next
  matmul keeps anyway) and recomputes the mask with one fp32 temporary, z - mu.
MEmeL reverse deactivation: z' = -D z + stopgrad(mu + D z) on the selected pairs (value mu, gradient -D).
Neither ever returns a non-finite gradient for a non-finite activation (the LM gradient carries those).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compact_selection(device: torch.device) -> bool:
    """Work on the selected pairs through an index list where that costs no host sync: on the CPU."""
    return device.type == "cpu"


def log_square_derivative(d: Tensor, delta: float) -> Tensor:
    """2 d / (d^2 + delta), zero where d is not finite (in place on a fresh tensor)."""
    return (2.0 * d).div_(d * d + delta).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def selected_log_square(flat: Tensor, mu: Tensor, index: Tensor, delta: float,
                        neuron: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Compact form's forward: SUM log(d^2 + delta) over the selected flat `index` of `flat` [tokens, width]
    (d = z - mu recomputed for those pairs only; `neuron` = index % width if known) and their derivatives."""
    neuron = index.remainder(flat.shape[1]) if neuron is None else neuron
    d = flat.reshape(-1).index_select(0, index).to(mu.dtype) - mu.index_select(0, neuron)
    return (d * d + delta).log_().sum(), log_square_derivative(d, delta)


class DenseSelectedLogSquare(torch.autograd.Function):
    """Forward returns the precomputed `value`; backward recomputes the selection from z: with threshold
    retrieval |z - mu| >= sqrt(bound), with top-k (z - mu)^2 * inv_denom >= thr."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, mu: Tensor, bound: Tensor | None, inv_denom: Tensor | None,
                thr: Tensor | None, delta: float):
        ctx.save_for_backward(z, mu, bound, inv_denom, thr)
        ctx.delta = delta
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, mu, bound, inv_denom, thr = ctx.saved_tensors
        d = z.reshape(-1, z.shape[-1]) - mu  # the one activation-sized fp32 temporary
        if bound is not None:
            root = bound.sqrt()
            unselected = (d < root) & (d > -root)  # d^2 >= bound, without a squared temporary
        else:
            unselected = torch.mul(d, d).mul_(inv_denom) < thr
        grad = torch.mul(d, d).add_(ctx.delta)  # becomes the returned gradient
        torch.div(d, grad, out=grad).mul_(2.0 * grad_out)
        grad.masked_fill_(unselected, 0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return grad.reshape(z.shape).to(z.dtype), None, None, None, None, None, None


class CompactSelectedLogSquare(torch.autograd.Function):
    """Forward returns the precomputed `value`; backward writes coef = 2 (z - mu) / ((z - mu)^2 + delta) at the
    selected pairs' flat indices `index` and zeros elsewhere."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, index: Tensor, coef: Tensor):
        ctx.save_for_backward(index, coef)
        ctx.shape, ctx.dtype = z.shape, z.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        index, coef = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=coef.device)
        grad.view(-1).index_put_((index,), (coef * grad_out).to(ctx.dtype))
        return grad, None, None, None


class ReverseDeactivation(torch.autograd.Function):
    """z' = -D z + stopgrad(mu + D z) on selected pairs: forward value mu, gradient multiplied by -D."""

    @staticmethod
    def forward(ctx, z: Tensor, selected: Tensor, mu: Tensor, strength: float):
        ctx.save_for_backward(selected)
        ctx.strength = strength
        return torch.where(selected, mu, z)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (selected,) = ctx.saved_tensors
        return torch.where(selected, -ctx.strength * grad_out, grad_out), None, None, None
