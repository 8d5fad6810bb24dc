"""The 2-layer ReLU network of the testbed and the per-skill metric R_k/S."""

from __future__ import annotations

import torch
from torch import nn


class SkillMLP(nn.Module):
    """input -> Linear(width) -> pre_act_probe -> ReLU -> post_act_probe -> Linear(1).

    The two nn.Identity probes sit where the GPT-NeoX model has them in its MLP, so the L2E engine attaches
    its forward hooks here exactly as in pretraining (post-ReLU by default, `activation: pre_act` selectable).
    """

    def __init__(self, input_dim: int, width: int, init_std: float):
        super().__init__()
        self.hidden = nn.Linear(input_dim, width)
        self.pre_act_probe = nn.Identity()
        self.act = nn.ReLU()
        self.post_act_probe = nn.Identity()
        self.readout = nn.Linear(width, 1)
        for layer in (self.hidden, self.readout):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.normal_(layer.bias, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.post_act_probe(self.act(self.pre_act_probe(self.hidden(x))))
        return self.readout(hidden).squeeze(-1)

    def mlp_probes(self, activation: str = "post_act") -> dict[int, nn.Module]:
        """Layer index -> the identity module at the neuron activation (one hidden layer: index 0)."""
        name = {"post_act": "post_act_probe", "pre_act": "pre_act_probe"}[activation]
        return {0: getattr(self, name)}


def skill_strength(output: torch.Tensor, target: torch.Tensor) -> float:
    """R_k/S on one task's samples: the least-squares coefficient of the centred target in the centred output.

    With target y = S*m (m = +-1 parity sign), this is R_k/S where R_k is the projection of the centred
    output onto the normalised centred skill function m: 0 when the output ignores the parity, 1 when it
    equals the target.
    """
    out_c = output.double() - output.double().mean()
    tgt_c = target.double() - target.double().mean()
    denom = float((tgt_c * tgt_c).sum())
    if denom == 0.0:
        raise ValueError("skill_strength needs samples of both parities (the eval set is too small)")
    return float((out_c * tgt_c).sum()) / denom
