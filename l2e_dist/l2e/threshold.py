"""The moving threshold tau of one inhibited layer: its initial value and its once-per-step update.

Both work on host-free device scalars (fp64) computed from counts that the engine sums over the whole step
(every micro-batch, every DP and TP rank), so every rank moves tau identically.

Initialisation: the first scored step selects nothing; its scores go into a log-spaced histogram and tau starts
at the histogram's (1 - p) quantile, log-interpolated within a bin (bins are 0.9% of the value wide).

Update (bracketed secant in log-log space). Besides the count of scores >= tau the step counts scores >= tau/r
and >= tau*r, r = exp(half_width). The (1 - p) quantile of the step is then located on the piecewise-linear
curve through (log tau +- half_width, log count): interpolated when the crossing lies inside the bracket,
one bracket width beyond it when it lies outside (and the bracket doubles). Inside, tau moves a fraction
`threshold_lr` of the way there, and the
bracket adapts so that its ends hold about 4x and 1/4x of the target count (narrow for a bounded or steep tail,
wide for a flat one). The fixed point is exactly f = p for any tail, no step overshoots a crossing it has
seen, and at steady state the selected fraction's lag-1 autocorrelation is about -threshold_lr / 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HIST_BINS = 4096
HIST_LOG_MIN = math.log(1e-6)
HIST_LOG_MAX = math.log(1e10)
HIST_BIN_WIDTH = (HIST_LOG_MAX - HIST_LOG_MIN) / HIST_BINS

INITIAL_HALF_WIDTH = 0.25  # log units: the bracket [tau / 1.28, tau * 1.28]
MIN_HALF_WIDTH = 1e-6
MAX_HALF_WIDTH = 2.0
_BRACKET_END_RATIO = math.log(16.0)  # wanted log(count at tau/r) - log(count at tau*r): 4x and 1/4x the target


def histogram_counts(phi: Tensor) -> Tensor:
    """Counts of log(phi) in the HIST_BINS log-spaced bins (fp64). Out-of-range and non-finite values are
    clamped into the end bins. Works in place on `phi` (its last use) and allocates no integer temporary of the
    layer's size: torch.histc bins floating-point values directly."""
    log_phi = phi.reshape(-1).float().clamp_min_(1e-38).log_()
    log_phi.nan_to_num_(nan=HIST_LOG_MIN, neginf=HIST_LOG_MIN, posinf=HIST_LOG_MAX)
    log_phi.clamp_(HIST_LOG_MIN, HIST_LOG_MAX)
    return torch.histc(log_phi, bins=HIST_BINS, min=HIST_LOG_MIN, max=HIST_LOG_MAX).to(torch.float64)


def histogram_quantile(hist: Tensor, q: float) -> Tensor:
    """q-quantile of the values counted in `hist` (fp64 device scalar, no host sync)."""
    cum = hist.cumsum(0)
    target = q * cum[-1]
    idx = torch.searchsorted(cum, target.reshape(1)).clamp(max=HIST_BINS - 1)[0]
    below = cum[idx] - hist[idx]
    frac = ((target - below) / hist[idx].clamp_min(1.0)).clamp(0.0, 1.0)
    return torch.exp(HIST_LOG_MIN + HIST_BIN_WIDTH * (idx.to(torch.float64) + frac))


def _crossing(x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor, y: Tensor) -> Tensor:
    """x where the line through (x0, y0), (x1, y1) reaches y (x0 when the line is flat)."""
    dy = y1 - y0
    safe = torch.where(dy.abs() > 1e-12, dy, torch.ones_like(dy))
    return torch.where(dy.abs() > 1e-12, x0 + (y - y0) * (x1 - x0) / safe, x0)


def update_threshold(tau: Tensor, half_width: Tensor, counts: Tensor, total: Tensor, p: float,
                     rate: float) -> tuple[Tensor, Tensor]:
    """One step's update of (tau, half_width) from `counts` = [#phi >= tau/r, #phi >= tau, #phi >= tau*r]
    out of `total` scores (all fp64 device tensors). Returns the new (tau, half_width). Elementwise: with
    tau, half_width, total of shape [L] and counts [L, 3] it updates L layers in one set of ops."""
    x, h = tau.log(), half_width
    c_lo, c_mid, c_hi = counts.unbind(-1)
    wanted = p * total.clamp_min(1.0)
    n_lo, n_mid, n_hi = counts.clamp_min(0.5).log().unbind(-1)  # half a count: log of an empty tail stays finite
    y = wanted.log()
    above = c_mid >= wanted  # too many selected: the crossing lies above log tau
    inside = torch.where(above, c_hi <= wanted, c_lo >= wanted)
    # Log counts follow power-law and Gaussian tails; an empty end (a bounded tail) is interpolated linearly.
    up = torch.where(c_hi >= 1.0, _crossing(x, n_mid, x + h, n_hi, y), _crossing(x, c_mid, x + h, c_hi, wanted))
    down = torch.where(c_mid >= 1.0, _crossing(x - h, n_lo, x, n_mid, y), _crossing(x - h, c_lo, x, c_mid, wanted))
    interpolated = torch.where(above, up, down)
    outside = torch.where(above, x + 2.0 * h, x - 2.0 * h)
    # Inside: damped secant step. Outside: a full step to beyond the bracket (an expanding search).
    new_x = torch.where(inside, x + rate * (interpolated - x), outside)
    # Bracket width: widen when the crossing fell outside, else steer the end counts toward 4x and 1/4x.
    spread = (n_lo - n_hi).clamp_min(1e-3)
    resized = h * (_BRACKET_END_RATIO / spread).clamp(0.5, 2.0)
    new_h = torch.where(inside, resized, 4.0 * h).clamp(MIN_HALF_WIDTH, MAX_HALF_WIDTH)
    return new_x.exp(), new_h
