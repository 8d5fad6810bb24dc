"""The CPU backend of one layer pass: reference.py's pass, with the selection kept as a list of flat indices.

On the CPU, extracting the ~p selected pairs costs no host sync, so the regularizer and reverse deactivation
touch only those pairs (their indices and derivatives are all the backward keeps), where the dense form masks
whole activation-sized tensors. A selecting pass with threshold retrieval, or top-1 retrieval at TP = 1, runs
as one loop of a C++ kernel (cpu_scan.py) when it can; otherwise eagerly, with numpy where it is faster than
torch on the CPU (compares with a number, counting a bool mask, nonzero). Same results as the reference: the
same pairs, values and gradients, sums to fp32 rounding (tests/test_l2e_numerics.py, test_l2e_reference.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from l2e_dist.l2e import cpu_scan
from l2e_dist.l2e.reference import (
    LayerPass,
    MethodSettings,
    PassSums,
    Phase,
    StepConstants,
    kth_score_per_token,
    log_square_derivative,
)


class Scratch:
    """Activation-sized buffers reused across layers and calls (a fresh multi-MB temporary on every call costs
    page faults on the CPU); nothing that outlives a pass points into them."""

    def __init__(self):
        self._buffers: dict[torch.dtype, Tensor] = {}

    def like(self, dtype: torch.dtype, like: Tensor) -> Tensor:
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[dtype] = torch.empty(like.numel(), dtype=dtype)
        return buf[:like.numel()].view(like.shape)


def kernel_serves(settings: MethodSettings) -> bool:
    """Whether the C++ kernel can do this layout's selecting pass: threshold retrieval, or top-1 at TP = 1
    (top-1 over TP slices needs the other slices' maxima first)."""
    return settings.uses_threshold or (settings.topk == 1 and settings.tp_size == 1)


def cpu_pass(z: Tensor, flat: Tensor, constants: StepConstants, settings: MethodSettings, phase: Phase,
             want_scores: bool, scratch: Scratch) -> LayerPass:
    """reference.dense_pass on the CPU (same arguments, plus the scratch buffers)."""
    if (phase is Phase.SELECTING and not want_scores and kernel_serves(settings)
            and cpu_scan.usable(flat, constants.mean)):
        return _kernel_pass(z, flat, constants, settings)
    with torch.no_grad():
        dev = torch.sub(flat, constants.mean, out=scratch.like(constants.mean.dtype, flat))
        sum_dev = dev.sum(0)
        sq_dev = dev.square_()
        sum_sq_dev = sq_dev.sum(0)
        if not phase.scoring:
            return LayerPass(z, PassSums(flat.shape[0], sum_dev, sum_sq_dev))
        score_sum = (sum_sq_dev * constants.inv_denom).sum()
        phi = sq_dev.mul_(constants.inv_denom)  # the index form needs no d^2 after this: phi in place
        if phase is Phase.CALIBRATING:
            return LayerPass(z, PassSums(flat.shape[0], sum_dev, sum_sq_dev, score_sum), scores=phi)
        n_above_low = n_above_high = None
        if settings.uses_threshold:
            n_above_low, index, neuron, n_above_high = threshold_indices(
                phi, constants.low_tau, constants.tau, constants.high_tau, scratch.like(torch.bool, phi).numpy())
        else:
            selected = at_least(phi, kth_score_per_token(phi, settings.topk, settings.tp_size, settings.tp_group))
            index, neuron = flat_nonzero(selected), None
        reg_sum = derivative = None
        if settings.method == "l2e":
            reg_sum, derivative = selected_log_square(flat, constants.mean, index, settings.delta, neuron)
    sums = PassSums(flat.shape[0], sum_dev, sum_sq_dev, score_sum, n_above_low, index.numel(), n_above_high,
                    reg_sum)
    output, reg_term = _inhibit(z, index, reg_sum, derivative, constants, settings)
    return LayerPass(output, sums, reg_term, selected_index=index, scores=phi if want_scores else None)


def _kernel_pass(z: Tensor, flat: Tensor, constants: StepConstants, settings: MethodSettings) -> LayerPass:
    """A selecting pass in one loop of the C++ kernel: no activation-sized temporary."""
    n_above_low = n_above_high = None
    if settings.uses_threshold:
        index, dev, sum_dev, sum_sq_dev, n_above_low, n_above_high = cpu_scan.threshold_scan(
            flat, constants.mean, constants.inv_denom, constants.low_tau, constants.tau, constants.high_tau)
    else:
        index, dev, sum_dev, sum_sq_dev = cpu_scan.top1_scan(flat, constants.mean, constants.inv_denom)
    reg_sum = derivative = None
    if settings.method == "l2e":
        reg_sum, derivative = log_square_terms(dev, settings.delta)
    sums = PassSums(flat.shape[0], sum_dev, sum_sq_dev, (sum_sq_dev * constants.inv_denom).sum(), n_above_low,
                    index.numel(), n_above_high, reg_sum)
    output, reg_term = _inhibit(z, index, reg_sum, derivative, constants, settings)
    return LayerPass(output, sums, reg_term, selected_index=index)


def _inhibit(z: Tensor, index: Tensor, reg_sum: Tensor | None, derivative: Tensor | None,
             constants: StepConstants, settings: MethodSettings) -> tuple[Tensor, Tensor | None]:
    """(output, differentiable regularizer term) of the selected pairs `index`."""
    if settings.method == "l2e":
        return IndexedLogSquare.apply(z, reg_sum, index, derivative)
    return IndexedReverseDeactivation.apply(z, index, constants.mean.to(z.dtype), settings.rd_strength), None


def selected_log_square(flat: Tensor, mean: Tensor, index: Tensor, delta: float,
                        neuron: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SUM log(d^2 + delta) over the selected flat `index` of `flat` [tokens, W] and their derivatives, d = z - mu
    recomputed for those pairs only (`neuron` = index % W where already known)."""
    neuron = index.remainder(flat.shape[1]) if neuron is None else neuron
    dev = flat.reshape(-1).index_select(0, index).to(mean.dtype) - mean.index_select(0, neuron)
    return log_square_terms(dev, delta)


def log_square_terms(dev: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """SUM log(d^2 + delta) over the selected pairs' d = z - mu, and their derivatives."""
    return (dev * dev + delta).log_().sum(), log_square_derivative(dev, delta)


def threshold_indices(phi: Tensor, low: float, tau: float, high: float,
                      mask: np.ndarray | None = None) -> tuple[int, Tensor, Tensor, int]:
    """(#phi >= low, flat indices of phi >= tau, their neurons, #phi >= high) for phi [tokens, W]: three compares
    with a number into one reusable bool buffer `mask`; low and high are only counted, and only the ~p
    selected pairs get indices (extracting indices costs in proportion to the hits)."""
    if not phi.is_contiguous():
        index = (phi >= tau).reshape(-1).nonzero().squeeze(1)
        return int((phi >= low).sum()), index, index.remainder(phi.shape[1]), int((phi >= high).sum())
    values = phi.detach().numpy()
    if mask is None or mask.shape != values.shape:
        mask = np.empty(values.shape, dtype=np.bool_)
    n_above_low = np.count_nonzero(np.greater_equal(values, low, out=mask))
    n_above_high = np.count_nonzero(np.greater_equal(values, high, out=mask))
    index = np.flatnonzero(np.greater_equal(values, tau, out=mask))
    return n_above_low, torch.from_numpy(index), torch.from_numpy(index % phi.shape[1]), n_above_high


def at_least(x: Tensor, bound: Tensor) -> Tensor:
    """x >= bound (broadcast) as a bool tensor, through numpy (faster than torch's compare on the CPU)."""
    if x.dtype in (torch.float32, torch.float64) and bound.dtype == x.dtype:
        return torch.from_numpy(np.greater_equal(x.detach().numpy(), bound.detach().numpy()))
    return x >= bound


def flat_nonzero(mask: Tensor) -> Tensor:
    """Flat indices of the True entries of `mask` (int64), through numpy where it is contiguous."""
    if mask.is_contiguous():
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.reshape(-1).nonzero().squeeze(1)


class IndexedLogSquare(torch.autograd.Function):
    """(z unchanged, the regularizer `value`); the backward adds derivative * grad_value at the selected pairs'
    flat `index` to a copy of z's incoming gradient: no activation-sized zero gradient, no autograd add."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, index: Tensor, derivative: Tensor):
        ctx.save_for_backward(index, derivative)
        return z.view_as(z), value.clone()

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_value: Tensor):
        index, derivative = ctx.saved_tensors
        grad = grad_z.clone(memory_format=torch.contiguous_format)
        grad.view(-1).index_add_(0, index, (derivative * grad_value).to(grad.dtype))
        return grad, None, None, None


class IndexedReverseDeactivation(torch.autograd.Function):
    """reference.ReverseDeactivation at the selected pairs' flat `index` only: the forward writes mu into a copy
    of z there, the backward scales only their gradient by -D."""

    @staticmethod
    def forward(ctx, z: Tensor, index: Tensor, mean: Tensor, strength: float):
        ctx.save_for_backward(index)
        ctx.strength = strength
        out = z.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_copy_(0, index, mean.index_select(0, index.remainder(z.shape[-1])))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (index,) = ctx.saved_tensors
        grad = grad_out.clone(memory_format=torch.contiguous_format)
        flat = grad.view(-1)
        flat.index_copy_(0, index, flat.index_select(0, index).mul_(-ctx.strength))
        return grad, None, None, None
