"""The moving threshold tau of one inhibited layer: its initial value and its once-per-step update.

Both work on counts that the engine sums over the whole step (every micro-batch, every DP and TP rank), so every
rank moves tau identically; tau and the bracket's half width are host numbers (fp64), read with the step's sums (step_sums.py).

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


def histogram_quantile(hist: Tensor, q: float) -> float:
    """q-quantile of the values counted in `hist` (one host read: once per layer and run)."""
    cum = hist.cumsum(0)
    target = q * cum[-1]
    idx = torch.searchsorted(cum, target.reshape(1)).clamp(max=HIST_BINS - 1)[0]
    below = cum[idx] - hist[idx]
    frac = ((target - below) / hist[idx].clamp_min(1.0)).clamp(0.0, 1.0)
    return math.exp(HIST_LOG_MIN + HIST_BIN_WIDTH * (idx.item() + frac.item()))


def _crossing(x0: float, y0: float, x1: float, y1: float, y: float) -> float:
    """x where the line through (x0, y0), (x1, y1) reaches y (x0 when the line is flat)."""
    dy = y1 - y0
    return x0 + (y - y0) * (x1 - x0) / dy if abs(dy) > 1e-12 else x0


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def update_threshold(tau: float, half_width: float, counts: tuple[float, float, float], total: float, p: float,
                     rate: float) -> tuple[float, float]:
    """One step's update of (tau, half_width) from `counts` = (#phi >= tau/r, #phi >= tau, #phi >= tau*r) out of
    `total` scores. Host numbers: the counts arrive in the step's one host read (step_sums.py), and scalar arithmetic
    on the host costs nothing, where as device tensors it would be dozens of tiny kernels per step."""
    x, h = math.log(tau), half_width
    c_lo, c_mid, c_hi = counts
    wanted = p * max(total, 1.0)
    n_lo, n_mid, n_hi = (math.log(max(c, 0.5)) for c in counts)  # half a count: log of an empty tail stays finite
    y = math.log(wanted)
    above = c_mid >= wanted  # too many selected: the crossing lies above log tau
    inside = c_hi <= wanted if above else c_lo >= wanted
    if not inside:  # an expanding search: a full step to beyond the bracket, which widens
        return math.exp(x + 2.0 * h if above else x - 2.0 * h), _clamp(4.0 * h, MIN_HALF_WIDTH, MAX_HALF_WIDTH)
    # Log counts follow power-law and Gaussian tails; an empty end (a bounded tail) is interpolated linearly.
    if above:
        crossing = _crossing(x, n_mid, x + h, n_hi, y) if c_hi >= 1.0 else _crossing(x, c_mid, x + h, c_hi, wanted)
    else:
        crossing = _crossing(x - h, n_lo, x, n_mid, y) if c_mid >= 1.0 else _crossing(x - h, c_lo, x, c_mid, wanted)
    # Inside: a damped secant step, and the bracket steers its end counts toward 4x and 1/4x the target.
    resized = h * _clamp(_BRACKET_END_RATIO / max(n_lo - n_hi, 1e-3), 0.5, 2.0)
    return math.exp(x + rate * (crossing - x)), _clamp(resized, MIN_HALF_WIDTH, MAX_HALF_WIDTH)
