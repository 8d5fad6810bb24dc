"""Retrieval: which (token, neuron) pairs of a layer are selected (method doc, section 3).

Threshold retrieval (L2E) compares (z - mu)^2 with the per-neuron bound tau / inv_denom, so the scores phi are
never materialised for it; it also counts the threshold bracket tau/r, tau*r that threshold.py needs. Top-k
retrieval (MEmeL) takes the k-th largest score of each token over the full layer (TP: local top-k, then an
all_gather of k values per token over the TP group). Ties at the k-th value select all tied pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def bracket_bounds(bound: Tensor, half_width: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-neuron bounds on (z - mu)^2 for phi >= tau/r, tau, tau*r (r = exp(half_width))."""
    ratio = half_width.exp()
    return (bound / ratio).to(dtype), bound.to(dtype), (bound * ratio).to(dtype)


def threshold_indices(d2: Tensor, lo: Tensor, mid: Tensor, hi: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """Compact threshold selection of d2 [tokens, width]: ONE full compare at the bracket's low end, the rest on
    that subset. Returns (count of d2 >= lo, flat indices of d2 >= mid, their neuron indices, count >= hi)."""
    candidates = (d2 >= lo).view(-1).nonzero().squeeze(1)
    cand_d2 = d2.view(-1).index_select(0, candidates)
    neuron = candidates.remainder(d2.shape[1])
    chosen = cand_d2 >= mid.index_select(0, neuron)
    n_hi = (cand_d2 >= hi.index_select(0, neuron)).sum()
    return candidates.numel(), candidates[chosen], neuron[chosen], n_hi


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
