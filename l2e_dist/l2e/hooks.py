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
