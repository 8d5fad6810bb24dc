"""Per-neuron running statistics of one inhibited layer and their once-per-step merge (method doc, section 2).

The engine sums, over every micro-batch of an optimizer step and every rank, the token count and the shifted
moments sum(z - c), sum((z - c)^2) with c = the running mean as of before the step (numerically stable, and
exact under summation across ranks). `merge_step` turns those sums into the step's batch mean / variance and
applies the exact MEmeL merge with forgetting: after `forget_steps` merged steps the history counts as
forget_steps batches of the current size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from l2e_dist.l2e.threshold import INITIAL_HALF_WIDTH

MIN_DENOM = 1e-30  # keeps 1/denominator finite in fp32 when a whole layer is constant


@dataclass
class LayerState:
    """Everything L2E keeps for one layer, full width on every rank (so a checkpoint loads at any layout)."""

    mean: Tensor  # [W] fp64
    var: Tensor  # [W] fp64, unbiased
    num_obs: float  # m, the (possibly forgotten) number of past observations
    tau: float  # the moving threshold
    half_width: float  # log r: the threshold update also counts phi >= tau / r and tau * r (threshold.py)
    feat_score: Tensor  # [F, W] fp64: accumulated sum of phi per feature (online FKR)
    feat_count: Tensor  # [F] fp64: accumulated token count per feature
    n_merged: int = 0  # merged optimizer steps
    tau_ready: bool = False
    fkr_ready: bool = False
    nonfinite_steps: int = 0  # steps whose activations held a NaN/inf (merged nothing)
    consecutive_nonfinite: int = 0
    # Derived for scoring; rebuilt after every merge and on load.
    inv_denom: Tensor = field(default=None)  # type: ignore[assignment]
    bound: Tensor = field(default=None)  # type: ignore[assignment]  # tau / inv_denom: phi >= tau <=> (z-mu)^2 >= bound
    best_feature: Tensor = field(default=None)  # type: ignore[assignment]


def fresh_state(width: int, num_features: int, device: torch.device) -> LayerState:
    f64 = dict(dtype=torch.float64, device=device)
    state = LayerState(mean=torch.zeros(width, **f64), var=torch.zeros(width, **f64), num_obs=0.0, tau=1.0,
                    half_width=INITIAL_HALF_WIDTH, feat_score=torch.zeros(num_features, width, **f64),
                    feat_count=torch.zeros(num_features, **f64))
    refresh_derived(state, eps=0.0)
    return state


def refresh_derived(state: LayerState, eps: float) -> None:
    """Scoring quantities: 1 / (var_j + eps * mean_k var_k), the per-neuron bound on (z - mu)^2, l*_j for FKR."""
    denom = (state.var + eps * state.var.mean()).clamp_min(MIN_DENOM)
    state.inv_denom = 1.0 / denom
    state.bound = state.tau * denom
    if state.feat_count.numel():
        mean_score = state.feat_score / state.feat_count.clamp_min(1.0)[:, None]
        mean_score = torch.where(state.feat_count[:, None] > 0, mean_score, -math.inf)
        state.best_feature = mean_score.argmax(dim=0)


def merge_step(state: LayerState, count: float, shifted_sum: Tensor, shifted_sq_sum: Tensor, shift: Tensor,
               forget_steps: int) -> None:
    """Exact MEmeL merge (Lemma 3.2) of one step's batch of `count` tokens, given its sums around `shift`, into
    `state` (the counts are host numbers, the moments fp64 tensors)."""
    b = count
    batch_dev = shifted_sum / b
    batch_mean = shift + batch_dev
    batch_var = (shifted_sq_sum / b - batch_dev * batch_dev).clamp_min(0.0)
    m = forget_steps * b if state.n_merged >= forget_steps else state.num_obs
    n = m + b
    diff = state.mean - batch_mean
    new_mean = (m * state.mean + b * batch_mean) / n
    n1 = max(n - 1.0, 1.0)
    new_var = m * b * diff * diff / (n1 * n) + (b * batch_var + (m - 1.0) * state.var) / n1
    state.mean, state.var, state.num_obs = new_mean, new_var.clamp_min(0.0), n
    state.n_merged += 1
