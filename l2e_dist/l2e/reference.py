"""One L2E / MEmeL step on one layer's activations, in dense tensor form: the reference, read top to bottom.

The engine (inhibitor.py) calls a *backend* once per inhibited layer and micro-batch:
`pass_fn(z, flat, constants, settings, phase, want_scores) -> LayerPass`. This module is the dense backend (any
device; the one accelerators run, since it needs no host sync) and the definition the CPU backend
(cpu_backend.py: index lists and a C++ kernel) is tested equal to, in values, gradients, selected pairs and
state (tests/test_l2e_numerics.py, tests/test_l2e_reference.py). The formulas are docs/l2e-method.md's.

One pass, for activations z [tokens, W] of this rank's neuron slice and the layer's state as of before the step:
1. statistics: d = z - mu; the column sums of d and d^2 (merged into mu, var at the step's end, step_sums.py);
2. score: phi = d^2 / (var + eps * mean var) (`inv_denom` holds 1 / that denominator);
3. selection: L2E's moving threshold (phi >= tau; also counted at tau/r and tau*r for the threshold update),
   or MEmeL's per-token top-k over the whole layer (all TP slices);
4. inhibition: L2E's regularizer SUM_selected log(d^2 + delta), or MEmeL's reverse deactivation of the selected
   pairs (forward value mu, gradient times -D);
5. the pass's sums for the step buffer (step_sums.py), returned, never written here.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class Phase(enum.Enum):
    """What a layer does this step; from host counters only, so the same on every rank."""

    COLLECTING = "collecting"  # before late_start: statistics only, nothing scored
    CALIBRATING = "calibrating"  # threshold retrieval's first scored step: scores feed tau's initial value
    SELECTING = "selecting"  # select and inhibit

    @property
    def scoring(self) -> bool:
        return self is not Phase.COLLECTING


@dataclass(frozen=True)
class StepConstants:
    """The layer's state as one pass uses it: this rank's neuron slice in the compute dtype (fp64 for fp64
    activations, else fp32); fixed for a whole step because the state changes only at its end."""

    mean: Tensor  # mu [W]
    inv_denom: Tensor  # 1 / (var + eps * mean var) [W]
    tau: float  # the threshold on phi
    low_tau: float  # tau / r, r = exp(half_width): the threshold update (threshold.py) also counts phi >= tau / r
    high_tau: float  # tau * r: ... and phi >= tau * r
    sq_dev_bound: Tensor  # tau / inv_denom [W]: phi >= tau  <=>  d^2 >= sq_dev_bound (no phi needed)
    low_sq_dev_bound: Tensor  # the same for tau / r
    high_sq_dev_bound: Tensor  # the same for tau * r

    @staticmethod
    def of(mean: Tensor, inv_denom: Tensor, sq_dev_bound: Tensor, tau: float, half_width: float,
           dtype: torch.dtype) -> StepConstants:
        """From a layer's fp64 state slice (`half_width` = log r, threshold.py)."""
        ratio = math.exp(half_width)
        return StepConstants(mean.to(dtype), inv_denom.to(dtype), tau, tau / ratio, tau * ratio, sq_dev_bound.to(dtype),
                             (sq_dev_bound / ratio).to(dtype), (sq_dev_bound * ratio).to(dtype))


@dataclass(frozen=True)
class MethodSettings:
    """The parts of the config and the parallel layout a pass needs."""

    method: str  # "l2e" (regularizer) or "memel" (reverse deactivation)
    uses_threshold: bool  # threshold retrieval (else per-token top-k)
    topk: int  # top-k retrieval: pairs per token over the whole layer
    delta: float  # log(d^2 + delta)
    rd_strength: float  # MEmeL's D
    tp_size: int = 1
    tp_group: object = None


class PassSums(NamedTuple):
    """One pass's contribution to the step's sums (device tensors or host numbers; None where the phase has
    none). Summed over micro-batches and ranks, they are all the step's merge needs."""

    tokens: int
    sum_dev: Tensor  # sum over tokens of d = z - mu [W]
    sum_sq_dev: Tensor  # sum over tokens of d^2 [W]
    score_sum: Tensor | None = None  # sum of phi over the pass
    n_above_low: Tensor | int | None = None  # #phi >= tau / r (threshold retrieval)
    n_selected: Tensor | int | None = None  # #selected pairs
    n_above_high: Tensor | int | None = None  # #phi >= tau * r (threshold retrieval)
    reg_sum: Tensor | None = None  # SUM_selected log(d^2 + delta) (L2E), no gradient


@dataclass(frozen=True)
class LayerPass:
    """What a backend returns for one layer and micro-batch."""

    output: Tensor  # what the layer passes on: z (L2E; the regularizer acts through `reg_term`) or MEmeL's z'
    sums: PassSums
    reg_term: Tensor | None = None  # differentiable SUM_selected log(d^2 + delta), unscaled (L2E, selecting)
    selected: Tensor | None = None  # bool [tokens, W] (dense backend)
    selected_index: Tensor | None = None  # flat indices into [tokens, W] (CPU backend)
    scores: Tensor | None = None  # phi [tokens, W] when asked for (calibration, FKR); may be scratch memory

    def selected_mask(self, shape: torch.Size) -> Tensor | None:
        """The selection as a bool [tokens, W] mask, whichever form the backend kept."""
        if self.selected is not None or self.selected_index is None:
            return self.selected
        mask = torch.zeros(shape, dtype=torch.bool, device=self.selected_index.device)
        mask.view(-1)[self.selected_index] = True
        return mask


def dense_pass(z: Tensor, flat: Tensor, constants: StepConstants, settings: MethodSettings, phase: Phase,
               want_scores: bool) -> LayerPass:
    """The reference pass (see the module docstring); `flat` is z viewed as [tokens, W]. Works through one
    activation-sized temporary d, squared in place once its sum is taken."""
    with torch.no_grad():
        # 1. statistics
        dev = flat - constants.mean
        sum_dev = dev.sum(0)
        sq_dev = dev.square_()  # from here on: d^2
        sum_sq_dev = sq_dev.sum(0)
        if not phase.scoring:
            return LayerPass(z, PassSums(flat.shape[0], sum_dev, sum_sq_dev))
        # 2. score (phi itself only where asked for: threshold selection compares d^2 with a per-neuron bound)
        score_sum = (sum_sq_dev * constants.inv_denom).sum()
        scores = sq_dev * constants.inv_denom if want_scores or phase is Phase.CALIBRATING else None
        if phase is Phase.CALIBRATING:
            return LayerPass(z, PassSums(flat.shape[0], sum_dev, sum_sq_dev, score_sum), scores=scores)
        # 3. selection
        if settings.uses_threshold:
            selected = sq_dev >= constants.sq_dev_bound
            n_above_low = (sq_dev >= constants.low_sq_dev_bound).sum()
            n_above_high = (sq_dev >= constants.high_sq_dev_bound).sum()
            kth_score = None
        else:
            phi = scores if scores is not None else sq_dev * constants.inv_denom
            kth_score = kth_score_per_token(phi, settings.topk, settings.tp_size, settings.tp_group)
            selected = phi >= kth_score
            n_above_low = n_above_high = None
        # 4a. inhibition: the L2E regularizer's value (its gradient is DenseLogSquare's backward)
        reg_sum = None
        if settings.method == "l2e":
            reg_sum = sq_dev.add_(settings.delta).log_().masked_fill_(~selected, 0.0).sum()
    # 4b. inhibition in the autograd graph: L2E passes z on with the regularizer beside it, MEmeL deactivates
    if settings.method == "l2e":
        output, reg_term = DenseLogSquare.apply(z, reg_sum, constants.mean,
                                                constants.sq_dev_bound if settings.uses_threshold else None,
                                                constants.inv_denom, kth_score, settings.delta)
    else:
        output, reg_term = ReverseDeactivation.apply(z, selected.reshape(z.shape), constants.mean.to(z.dtype),
                                                     settings.rd_strength), None
    # 5. the pass's sums
    sums = PassSums(flat.shape[0], sum_dev, sum_sq_dev, score_sum, n_above_low, selected.sum(), n_above_high,
                    reg_sum)
    return LayerPass(output, sums, reg_term, selected=selected, scores=scores)


def top_values(x: Tensor, k: int) -> Tensor:
    """The k largest values of each row, [rows, k] (a max-reduction for k = 1, the MEmeL default)."""
    return x.amax(dim=1, keepdim=True) if k == 1 else x.topk(k, dim=1).values


def kth_score_per_token(phi: Tensor, k: int, tp_size: int, tp_group) -> Tensor:
    """k-th largest score of each token over the full layer, [tokens, 1]: with TP, the local top-k of every slice
    all_gathered over the TP group. Ties at the k-th value select all tied pairs."""
    top = top_values(phi, min(k, phi.shape[1]))
    if tp_size > 1:
        parts = [torch.empty_like(top) for _ in range(tp_size)]
        dist.all_gather(parts, top.contiguous(), group=tp_group)
        top = top_values(torch.cat(parts, dim=1), k)
    return top[:, k - 1:k]


def log_square_derivative(dev: Tensor, delta: float) -> Tensor:
    """d/dz log((z - mu)^2 + delta) = 2 d / (d^2 + delta); zero where d is not finite (the LM gradient carries
    those)."""
    return (2.0 * dev).div_(dev * dev + delta).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class DenseLogSquare(torch.autograd.Function):
    """(z unchanged, the regularizer `value`) with the regularizer's gradient added to z's in one backward, which
    recomputes the selection from z: it saves only z, which the next matmul keeps anyway, instead of a mask and
    the derivatives (and never an activation-sized zero gradient for autograd to add)."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, mean: Tensor, sq_dev_bound: Tensor | None, inv_denom: Tensor,
                kth_score: Tensor | None, delta: float):
        ctx.save_for_backward(z, mean, sq_dev_bound, inv_denom, kth_score)
        ctx.delta = delta
        return z.view_as(z), value.clone()

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_value: Tensor):
        z, mean, sq_dev_bound, inv_denom, kth_score = ctx.saved_tensors
        dev = z.reshape(-1, z.shape[-1]) - mean
        if sq_dev_bound is not None:
            root = sq_dev_bound.sqrt()
            unselected = (dev < root) & (dev > -root)  # d^2 < bound, without a squared temporary
        else:
            unselected = torch.mul(dev, dev).mul_(inv_denom) < kth_score
        grad = torch.mul(dev, dev).add_(ctx.delta)  # 2 d / (d^2 + delta) with one more temporary, not two
        torch.div(dev, grad, out=grad).mul_(2.0 * grad_value)
        grad = grad.masked_fill_(unselected, 0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return grad.reshape(z.shape).add_(grad_z).to(z.dtype), None, None, None, None, None, None


class ReverseDeactivation(torch.autograd.Function):
    """MEmeL: z' = -D z + stopgrad(mu + D z) on the selected pairs: forward value mu, gradient times -D."""

    @staticmethod
    def forward(ctx, z: Tensor, selected: Tensor, mean: Tensor, strength: float):
        ctx.save_for_backward(selected)
        ctx.strength = strength
        return torch.where(selected, mean, z)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (selected,) = ctx.saved_tensors
        return torch.where(selected, -ctx.strength * grad_out, grad_out), None, None, None
