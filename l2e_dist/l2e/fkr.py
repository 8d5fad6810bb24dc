"""Online False Killing Rate (method doc, section 5), accumulated over training.

Per neuron j, l*_j = argmax_l of the mean score over tokens with feature l (summed in the step buffer and merged
at the step boundary); per step FKR = #(selected, feature known, feature != l*_j) / #(selected, feature known),
with l* as of before the step. Tokens labelled -1 (unknown) count in neither.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2e_dist.l2e.reduction import FKR_DEN, FKR_NUM, Slots
from l2e_dist.l2e.statistics import LayerState


def record_features(buf: Tensor, slots: Slots, state: LayerState, feats: Tensor, phi: Tensor, selected: Tensor | None,
                    num_features: int, neurons: slice, count_tokens: bool) -> None:
    """Add this micro-batch's per-feature score sums (this rank's neuron slice) and FKR counts to `buf`."""
    if feats.numel() != phi.shape[0]:
        raise ValueError(f"set_features got {feats.numel()} labels for {phi.shape[0]} tokens")
    nf, width = num_features, slots.width
    one_hot = feats[:, None] == torch.arange(nf, device=feats.device)[None, :]  # unknown (-1): all False
    region = buf[slots.feat:slots.feat + nf * width].view(nf, width)
    region[:, neurons] += one_hot.to(phi.dtype).T @ phi
    if count_tokens:
        buf[slots.feat + nf * width:slots.feat + nf * (width + 1)] += one_hot.sum(0)
    if selected is not None and state.fkr_ready:
        known_sel = selected & ((feats >= 0) & (feats < nf))[:, None]
        wrong = known_sel & (feats[:, None] != state.best_feature[None, neurons])
        buf[slots.scalar(FKR_NUM)] += wrong.sum()
        buf[slots.scalar(FKR_DEN)] += known_sel.sum()


def merge_features(state: LayerState, buf: Tensor, slots: Slots, num_features: int, labelled: bool) -> None:
    nf, width = num_features, slots.width
    state.feat_score = state.feat_score + buf[slots.feat:slots.feat + nf * width].view(nf, width)
    state.feat_count = state.feat_count + buf[slots.feat + nf * width:slots.feat + nf * (width + 1)]
    state.fkr_ready = state.fkr_ready or labelled
