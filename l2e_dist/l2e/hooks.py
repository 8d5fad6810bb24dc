"""Attach an `L2EInhibitor` to the model's activation probes with forward hooks.

The model places an `nn.Identity` probe at the MLP activation point of every layer; the hook replaces the probe's
output with `inhibitor.apply(layer, output)`. The hook follows the probe's own `training` flag as well as the
inhibitor's, so `model.eval()` alone makes it the identity. With method "none" nothing is attached (zero cost).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.hooks import RemovableHandle

from l2e_dist.l2e.inhibitor import L2EInhibitor


def _inhibit_output(inhibitor: L2EInhibitor, layer_id: int, module: torch.nn.Module, inputs, output):
    if not module.training:
        return None
    return inhibitor.apply(layer_id, output)


def attach(inhibitor: L2EInhibitor, probes: dict[int, torch.nn.Module]) -> list[RemovableHandle]:
    """Hook the probes of the inhibited layers; extra probes (other layers) are left alone."""
    if not inhibitor.cfg.enabled:
        return []
    missing = [lid for lid in inhibitor.layer_ids if lid not in probes]
    if missing:
        raise ValueError(f"no activation probe for inhibited layers {missing} (probes exist for {sorted(probes)})")
    return [probes[lid].register_forward_hook(partial(_inhibit_output, inhibitor, lid))
            for lid in inhibitor.layer_ids]


class ScoreMeter:
    """Counts, per inhibited layer, the (token, neuron) pairs whose score is >= a fixed reference value during
    forwards that run while it is attached (e.g. a validation pass in eval mode). Counts stay on device; sum them
    over the data- and tensor-parallel ranks before dividing."""

    def __init__(self, inhibitor: L2EInhibitor, probes: dict[int, torch.nn.Module], reference: float,
                 sample_size: int = 0):
        self.inhibitor = inhibitor
        self.reference = reference
        self.sample_size = sample_size  # keep up to this many scores per layer (first seen) for histograms
        self.layer_ids = list(inhibitor.layer_ids)
        self.counts = torch.zeros(len(self.layer_ids), 2, dtype=torch.float64, device=inhibitor.device)
        self.samples: dict[int, list[torch.Tensor]] = {lid: [] for lid in self.layer_ids}
        self._handles = [probes[lid].register_forward_hook(partial(self._observe, row))
                         for row, lid in enumerate(self.layer_ids)]

    def _observe(self, row: int, module: torch.nn.Module, inputs, output) -> None:
        phi = self.inhibitor.scores(self.layer_ids[row], output)
        if phi is not None:
            self.counts[row, 0] += (phi >= self.reference).sum()
            self.counts[row, 1] += phi.numel()
            kept = self.samples[self.layer_ids[row]]
            room = self.sample_size - sum(t.numel() for t in kept)
            if room > 0:
                kept.append(phi.reshape(-1)[:room].float().cpu())

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
