"""Retrieval: which (token, neuron) pairs of a layer are selected (method doc, section 3).

Threshold retrieval (L2E) compares (z - mu)^2 with the per-neuron bound tau / inv_denom, so the scores phi are
never materialised for it; it also counts the threshold bracket tau/r, tau*r that threshold.py needs. Top-k
retrieval (MEmeL) takes the k-th largest score of each token over the full layer (TP: local top-k, then an
all_gather of k values per token over the TP group). Ties at the k-th value select all tied pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Selection:
    """What one apply() selected, with the constants it compared against (compute dtype: fp64 for fp64 input,
    else fp32)."""

    mu: Tensor
    inv_denom: Tensor | None = None
    bound: Tensor | None = None  # threshold retrieval: per-neuron bound on (z - mu)^2 (tau / inv_denom)
    thr: Tensor | None = None  # top-k retrieval: the k-th score per token [tokens, 1]
    selected: Tensor | None = None  # bool [tokens, local_width] (dense forms)
    index: Tensor | None = None  # flat indices of the selected pairs (compact form)
    phi: Tensor | None = None


def bracket_bounds(bound: Tensor, half_width: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-neuron bounds on (z - mu)^2 for phi >= tau/r, tau, tau*r (r = exp(half_width))."""
    ratio = math.exp(half_width)
    return (bound / ratio).to(dtype), bound.to(dtype), (bound * ratio).to(dtype)


def score_bracket(tau: float, half_width: float) -> tuple[float, float, float]:
    """(tau/r, tau, tau*r), r = exp(half_width)."""
    ratio = math.exp(half_width)
    return tau / ratio, tau, tau * ratio


def threshold_indices(phi: Tensor, lo: float, mid: float, hi: float,
                      mask: np.ndarray | None = None) -> tuple[int, Tensor, Tensor, int]:
    """Compact threshold selection of the scores phi [tokens, width] (CPU): (count of phi >= lo, flat indices
    of phi >= mid, their neuron indices, count of phi >= hi). Three compares with a number through numpy on the
    same memory, into `mask` (a reusable bool buffer of phi's size) when given; the bracket's ends are only
    counted and only the ~p selected pairs get indices. Profiled at the tiny shape, where this scan is the
    largest cost of the L2E forward: index extraction costs in proportion to the hits (at the bracket's low end,
    ~4p, it took three times as long as the three compares), and a compare with a number is three times faster
    than with a per-neuron bound (what the dense form compares (z - mu)^2 with)."""
    if phi.device.type != "cpu" or not phi.is_contiguous():
        return _threshold_indices_torch(phi, lo, mid, hi)
    values = phi.detach().numpy()
    if mask is None or mask.shape != values.shape:
        mask = np.empty(values.shape, dtype=np.bool_)
    n_lo = np.count_nonzero(np.greater_equal(values, lo, out=mask))
    n_hi = np.count_nonzero(np.greater_equal(values, hi, out=mask))
    index = np.flatnonzero(np.greater_equal(values, mid, out=mask))
    return n_lo, torch.from_numpy(index), torch.from_numpy(index % phi.shape[1]), n_hi


def _threshold_indices_torch(phi: Tensor, lo: float, mid: float, hi: float) -> tuple[int, Tensor, Tensor, int]:
    """threshold_indices in torch (a non-contiguous input)."""
    index = (phi >= mid).reshape(-1).nonzero().squeeze(1)
    return int((phi >= lo).sum()), index, index.remainder(phi.shape[1]), int((phi >= hi).sum())


def at_least(x: Tensor, bound: Tensor) -> Tensor:
    """x >= bound (broadcast) as a bool tensor; on the CPU through numpy, faster than torch's compare there
    (the same memory, no copy)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and bound.dtype == x.dtype:
        return torch.from_numpy(np.greater_equal(x.detach().numpy(), bound.detach().numpy()))
    return x >= bound


def count_true(mask: Tensor) -> Tensor | int:
    """The number of True entries of a bool `mask`: on the CPU a host int through numpy (torch sums a bool tensor
    by converting it to an int64 copy first); elsewhere a device tensor (no sync)."""
    if mask.device.type == "cpu" and mask.is_contiguous():
        return int(np.count_nonzero(mask.numpy()))
    return mask.sum()


def flat_nonzero(mask: Tensor) -> Tensor:
    """Flat indices of the True entries of `mask` (int64); on the CPU through numpy (faster there)."""
    if mask.device.type == "cpu" and mask.is_contiguous():
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.reshape(-1).nonzero().squeeze(1)


def top_values(x: Tensor, k: int) -> Tensor:
    """The k largest values of each row, [rows, k] (a max-reduction for k = 1, the MEmeL default)."""
    return x.amax(dim=1, keepdim=True) if k == 1 else x.topk(k, dim=1).values


def kth_score_per_token(phi: Tensor, k: int, tp_size: int, tp_group) -> Tensor:
    """k-th largest score of each token over the full layer (all TP slices), shape [tokens, 1]."""
    top = top_values(phi, min(k, phi.shape[1]))
    if tp_size > 1:
        parts = [torch.empty_like(top) for _ in range(tp_size)]
        dist.all_gather(parts, top.contiguous(), group=tp_group)
        top = top_values(torch.cat(parts, dim=1), k)
    return top[:, k - 1:k]
