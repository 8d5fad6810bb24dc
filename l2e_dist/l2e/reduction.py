"""The fused fp64 buffer that carries one optimizer step's sums of every inhibited layer, and its all-reduce.

Layout per layer: [sum(z - mu) (W) | sum((z - mu)^2) (W) | scalars | histogram (calibration step only) |
per-feature score sums (F x W) and token counts (F) (online FKR only)]. It is full layer width: each TP rank
adds its own neuron slice (zeros elsewhere) and only TP rank 0 adds the token count, so ONE all_reduce over
the TP x DP group gives every rank the global sums. The layout depends on host counters only, so it is the
same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from l2e_dist.l2e.reference import Phase
from l2e_dist.l2e.threshold import HIST_BINS

# Scalars per layer: token count; #phi >= tau/r, >= tau, >= tau*r (the counts threshold.py moves tau with);
# the regularizer sum SUM log(d^2 + delta); the score sum; FKR numerator and denominator.
TOKENS, N_ABOVE_LOW, N_SELECTED, N_ABOVE_HIGH, REG_SUM, SCORE_SUM, FKR_NUM, FKR_DEN = range(8)
NUM_SCALARS = 8


@dataclass
class Slots:
    """Offsets of one layer's quantities in the step buffer, and what the layer does this step."""

    base: int
    width: int
    phase: Phase
    hist: int = -1  # tau's calibration histogram (calibrating step only)
    feat: int = -1  # online FKR: per-feature score sums and token counts

    @property
    def sum_dev(self) -> slice:
        """sum(z - mu) per neuron."""
        return slice(self.base, self.base + self.width)

    @property
    def sum_sq_dev(self) -> slice:
        """sum((z - mu)^2) per neuron."""
        return slice(self.base + self.width, self.base + 2 * self.width)

    @property
    def scalars(self) -> int:
        return self.base + 2 * self.width

    def scalar(self, which: int) -> int:
        return self.scalars + which


def layout(phases: dict[int, Phase], width: int, num_features: int) -> tuple[dict[int, Slots], int]:
    """Slots per layer from its phase; returns them and the buffer length."""
    offset, slots = 0, {}
    for lid, phase in phases.items():
        s = Slots(base=offset, width=width, phase=phase)
        offset += 2 * width + NUM_SCALARS
        if phase is Phase.CALIBRATING:
            s.hist, offset = offset, offset + HIST_BINS
        if num_features:
            s.feat, offset = offset, offset + num_features * (width + 1)
        slots[lid] = s
    return slots, offset


def all_reduce_step(buf: Tensor, group) -> bool:
    """Sum the step buffer over `group` (None: a single process). Returns whether a collective was issued."""
    if group is None:
        return False
    dist.all_reduce(buf, group=group)
    return True


def finite_regions(buf: Tensor, slots: dict[int, Slots]) -> Tensor:
    """Per layer (in `slots` order), whether its moments and scalars are all finite: bool [layers] on device."""
    return torch.stack([buf[s.base:s.scalars + NUM_SCALARS].isfinite().all() for s in slots.values()])
