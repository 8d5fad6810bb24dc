"""The two ways L2E / MEmeL act on the selected (token, neuron) pairs, as autograd functions.

L2E regularizer: value = SUM_selected log((z - mu)^2 + delta) with mu a constant; its gradient
2 (z - mu) / ((z - mu)^2 + delta) on the selected pairs pulls them toward the neuron's mean. Two equal forms:
- compact (CPU): the forward already holds the selected pairs' flat indices and derivatives (~p of the
  elements) and the backward adds only those into z's gradient (nonzero() costs no host sync on the CPU);
- dense (accelerators, where nonzero() would wait for the device): the backward keeps only z (which the next
  matmul keeps anyway) and recomputes the mask with one fp32 temporary, z - mu.
Both pass z through and return the value as a second output, so that z's incoming gradient and the
regularizer's meet in one backward (added in place where autograd holds no other reference to the gradient);
neither adds a non-finite gradient for a non-finite activation (the LM gradient carries those).
MEmeL reverse deactivation: z' = -D z + stopgrad(mu + D z) on the selected pairs (value mu, gradient -D); on
the CPU likewise through the selected pairs' indices (CompactReverseDeactivation).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from l2e_dist.l2e.config import L2EConfig


def compact_selection(device: torch.device) -> bool:
    """Work on the selected pairs through an index list where that costs no host sync: on the CPU."""
    return device.type == "cpu"


def loss_scale(cfg: L2EConfig, local_tokens: int, dp_size: int, micro_batches_per_step: int) -> float:
    """The factor on this micro-batch's regularizer value such that, after DeepSpeed's averaging over DP ranks
    and micro-batches, the gradient is that of the step's global regularizer: "sum" multiplies the local sum
    back, "mean" divides it by the local token count."""
    if cfg.reduction == "sum":
        return cfg.reg_lambda * dp_size * micro_batches_per_step
    return cfg.reg_lambda / max(local_tokens, 1)


def log_square_derivative(d: Tensor, delta: float) -> Tensor:
    """2 d / (d^2 + delta), zero where d is not finite (in place on a fresh tensor)."""
    return (2.0 * d).div_(d * d + delta).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def selected_log_square(flat: Tensor, mu: Tensor, index: Tensor, delta: float,
                        neuron: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Compact form's forward: SUM log(d^2 + delta) over the selected flat `index` of `flat` [tokens, width]
    (d = z - mu recomputed for those pairs only; `neuron` = index % width if known) and their derivatives."""
    neuron = index.remainder(flat.shape[1]) if neuron is None else neuron
    d = flat.reshape(-1).index_select(0, index).to(mu.dtype) - mu.index_select(0, neuron)
    return log_square_terms(d, delta)


def log_square_terms(d: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """SUM log(d^2 + delta) over the selected pairs' d = z - mu, and their derivatives."""
    return (d * d + delta).log_().sum(), log_square_derivative(d, delta)


def writable_gradient(grad: Tensor, *, _calibrating: bool = False) -> bool | tuple[int, int]:
    """True when a backward may add into its incoming gradient `grad` in place: nothing but autograd's hand-over
    holds it or its storage, it is dense and contiguous, and no double-backward graph is being built. Call it
    directly from a backward with the gradient argument.

    What holds `grad`: C++ references (another branch's input buffer) show in its use count, the same test
    PyTorch makes before reusing a gradient buffer; Python references (a tensor hook that kept it) show in its
    Python reference count, compared with that of a gradient known to be fresh (measured once at import).
    A view counts when it is the whole of a base nobody else holds: torch.matmul of a 3-d input (the MLP's
    output projection) hands over its 2-d result viewed back to 3-d. Anything else is copied first."""
    refs = sys.getrefcount(grad)  # first: the bound methods taken below hold references of their own
    if _calibrating:  # the reference counts at this very call depth, for _measure_fresh_refs
        base = grad._base
        return refs, sys.getrefcount(base)
    use_count = getattr(grad, "_use_count", None)
    storage_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or storage_count is None or torch.is_grad_enabled():
        return False
    if grad.layout != torch.strided or not grad.is_contiguous() or use_count() != 1:
        return False
    fresh_refs, fresh_base_refs = _FRESH_REFS
    if refs != fresh_refs:
        return False
    holders = storage_count(grad.untyped_storage()._cdata) - 1  # the UntypedStorage wrapper made here holds one
    base = grad._base
    if base is None:
        return holders == 1
    # The base is held by the view and by the Python object `grad._base` just made.
    return (holders == 2 and base._base is None and base._use_count() == 2 and sys.getrefcount(base) == fresh_base_refs
            and base.is_contiguous() and base.numel() == grad.numel() and base.data_ptr() == grad.data_ptr())


class _FreshGradientProbe(torch.autograd.Function):
    """Identity whose backward records writable_gradient's Python reference counts of a fresh gradient."""

    seen: list[tuple[int, int]] = []

    @staticmethod
    def forward(ctx, z: Tensor):
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        _FreshGradientProbe.seen.append(writable_gradient(grad, _calibrating=True))
        return grad


def _measure_fresh_refs() -> tuple[int, int]:
    """The Python reference counts writable_gradient sees for a gradient no Python code has touched and for
    its base (a 3-d matmul's fresh output, a view of its 2-d result): the references the autograd engine's call
    and the view itself hold."""
    with torch.enable_grad():
        z = torch.zeros(1, 2, 2, requires_grad=True)
        (_FreshGradientProbe.apply(z) @ torch.ones(2, 2)).sum().backward()
    return _FreshGradientProbe.seen.pop()


# Measured once at import: a small backward run inside a forward would add saved tensors that activation
# checkpointing's recompute does not repeat.
_FRESH_REFS = _measure_fresh_refs()


class DenseSelectedLogSquare(torch.autograd.Function):
    """Returns (z unchanged, the precomputed regularizer `value`). Backward recomputes the selection from z (with
    threshold retrieval |z - mu| >= sqrt(bound), with top-k (z - mu)^2 * inv_denom >= thr) and adds the
    regularizer's gradient to z's incoming gradient: z has one consumer in the graph, so autograd adds nothing."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, mu: Tensor, bound: Tensor | None, inv_denom: Tensor | None,
                thr: Tensor | None, delta: float):
        ctx.save_for_backward(z, mu, bound, inv_denom, thr)
        ctx.delta = delta
        return z.view_as(z), value.clone()

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_value: Tensor):
        z, mu, bound, inv_denom, thr = ctx.saved_tensors
        d = z.reshape(-1, z.shape[-1]) - mu  # the one activation-sized fp32 temporary
        if bound is not None:
            root = bound.sqrt()
            unselected = (d < root) & (d > -root)  # d^2 >= bound, without a squared temporary
        else:
            unselected = torch.mul(d, d).mul_(inv_denom) < thr
        grad = torch.mul(d, d).add_(ctx.delta)
        torch.div(d, grad, out=grad).mul_(2.0 * grad_value)
        grad = grad.masked_fill_(unselected, 0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).reshape(z.shape)
        if writable_gradient(grad_z):
            return grad_z.add_(grad), None, None, None, None, None, None
        return grad.add_(grad_z).to(z.dtype), None, None, None, None, None, None


class CompactSelectedLogSquare(torch.autograd.Function):
    """Returns (z unchanged, the precomputed regularizer `value`). Backward adds coef * grad_value, coef =
    2 (z - mu) / ((z - mu)^2 + delta), at the selected pairs' flat indices `index` to z's incoming gradient (in
    place where that is safe): no activation-sized zero gradient, no autograd add."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, index: Tensor, coef: Tensor):
        ctx.save_for_backward(index, coef)
        return z.view_as(z), value.clone()

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_value: Tensor):
        index, coef = ctx.saved_tensors
        grad = grad_z if writable_gradient(grad_z) else grad_z.clone(memory_format=torch.contiguous_format)
        grad.view(-1).index_add_(0, index, (coef * grad_value).to(grad.dtype))
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
        if writable_gradient(grad_out):  # g * (1 - (1 + D) [selected]) in one pass, no temporary
            return grad_out.addcmul_(grad_out, selected, value=-(1.0 + ctx.strength)), None, None, None
        return torch.where(selected, -ctx.strength * grad_out, grad_out), None, None, None


class CompactReverseDeactivation(torch.autograd.Function):
    """ReverseDeactivation with the selected pairs as flat indices (CPU; top-k selects k of a token's neurons):
    the forward writes mu into a copy of z at those pairs only, the backward scales only their gradient by -D
    (in place where writable_gradient allows it), instead of two passes over activation-sized masks."""

    @staticmethod
    def forward(ctx, z: Tensor, index: Tensor, mu: Tensor, strength: float):
        ctx.save_for_backward(index)
        ctx.strength = strength
        out = z.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_copy_(0, index, mu.index_select(0, index.remainder(z.shape[-1])))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (index,) = ctx.saved_tensors
        grad = grad_out if writable_gradient(grad_out) else grad_out.clone(memory_format=torch.contiguous_format)
        flat = grad.view(-1)
        flat.index_copy_(0, index, flat.index_select(0, index).mul_(-ctx.strength))
        return grad, None, None, None
