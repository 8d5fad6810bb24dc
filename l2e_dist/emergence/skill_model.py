"""The skill-basis (multilinear) model of Nam et al. (arXiv 2404.17563) and its one-parameter fit.

Each skill k is one basis function with strength R_k; the strengths evolve independently, so every skill's
curve has a closed form in training time, data and width. One parameter per axis (theta_T, theta_D,
theta_N) maps the model's units onto a real network; it is fitted on skill 1 only and then predicts every
other skill, which is the test of the model.

    time:  R_k/S = 1 / (1 + c * exp(-2 * P_s(k) * S * t / theta_T)),   c = (1 - r0) / r0
           (t = sum of SGD learning rates so far = eta*T at constant eta; r0 = R_k(0)/S, the initial
           strength; the factor 2 is the multilinear model's dR/dt = 2 P_s R (S - R) for R = a*b, a = b)
    data:  R_k/S = 1 - sqrt(max(0, 1 - D * P_s(k) / theta_D))
    width: R_k/S = clip((N - k*theta_N) / theta_N, 0, 1)                 (k 0-based)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.optimize import minimize_scalar

Axis = Literal["time", "data", "width"]
AXES: tuple[Axis, ...] = ("time", "data", "width")


def time_strength(t: np.ndarray, probs: np.ndarray, scale: float, theta: float, init_strength: float) -> np.ndarray:
    """R_k/S over effective time t (cumulative learning rate); returns [n_skills, len(t)]."""
    c = (1.0 - init_strength) / init_strength
    rate = 2.0 * np.asarray(probs)[:, None] * scale / theta
    return 1.0 / (1.0 + c * np.exp(-rate * np.asarray(t, dtype=np.float64)[None, :]))


def data_strength(d: np.ndarray, probs: np.ndarray, theta: float) -> np.ndarray:
    """R_k/S over training-set size D; returns [n_skills, len(d)]."""
    seen = np.asarray(d, dtype=np.float64)[None, :] * np.asarray(probs)[:, None] / theta
    return 1.0 - np.sqrt(np.maximum(0.0, 1.0 - seen))


def width_strength(n: np.ndarray, n_skills: int, theta: float) -> np.ndarray:
    """R_k/S over hidden width N (skills fill theta_N units each, in frequency order); [n_skills, len(n)]."""
    k = np.arange(n_skills, dtype=np.float64)[:, None]
    return np.clip((np.asarray(n, dtype=np.float64)[None, :] - k * theta) / theta, 0.0, 1.0)


def predict(
    axis: Axis, x: np.ndarray, theta: float, probs: np.ndarray, scale: float, init_strength: float
) -> np.ndarray:
    """The model's R_k/S for every skill along one axis ([n_skills, len(x)]); x is t, D or N."""
    if axis == "time":
        return time_strength(x, probs, scale, theta, init_strength)
    if axis == "data":
        return data_strength(x, probs, theta)
    if axis == "width":
        return width_strength(x, len(probs), theta)
    raise ValueError(f"unknown axis {axis!r}; expected one of {AXES}")


def model_loss(strengths: np.ndarray, probs: np.ndarray, scale: float) -> np.ndarray:
    """Expected MSE/2 of the model: (S^2/2) sum_k P_s(k) (1 - R_k/S)^2, for each column of `strengths`."""
    return 0.5 * scale**2 * (np.asarray(probs)[:, None] * (1.0 - strengths) ** 2).sum(axis=0)


def one_shot_data_loss(d: np.ndarray, probs: np.ndarray, scale: float) -> np.ndarray:
    """Closed-form loss when a skill is learned once it appears in the data: (S^2/2) sum_k P_s(k)(1-P_s(k))^D."""
    p = np.asarray(probs)[:, None]
    return 0.5 * scale**2 * (p * (1.0 - p) ** np.asarray(d, dtype=np.float64)[None, :]).sum(axis=0)


def width_loss(n: np.ndarray, probs: np.ndarray, scale: float) -> np.ndarray:
    """Closed-form loss with one unit per skill (theta_N = 1): (S^2/2) sum_{k > N} P_s(k), k 1-based."""
    tail = np.concatenate([np.cumsum(np.asarray(probs)[::-1])[::-1], [0.0]])
    idx = np.clip(np.asarray(n, dtype=np.int64), 0, len(probs))
    return 0.5 * scale**2 * tail[idx]


def fit_theta(
    axis: Axis,
    x: np.ndarray,
    observed_skill1: np.ndarray,
    probs: np.ndarray,
    scale: float,
    init_strength: float,
) -> float:
    """Least-squares theta for skill 1's curve alone (log-spaced grid search, then bounded Brent refinement).

    The grid spans 12 decades around the theta that puts skill 1's rise at the end of the observed range,
    so no starting guess is needed and the piecewise-linear width model cannot trap a local search.
    """
    x = np.asarray(x, dtype=np.float64)
    observed = np.asarray(observed_skill1, dtype=np.float64)
    keep = np.isfinite(observed)
    x, observed = x[keep], observed[keep]
    if x.size < 2:
        raise ValueError("fit_theta needs at least two finite points of skill 1's curve")
    x_max = float(np.max(np.abs(x))) or 1.0
    if axis == "time":
        c = (1.0 - init_strength) / init_strength
        center = 2.0 * probs[0] * scale * x_max / max(np.log(c), 1e-3)
    elif axis == "data":
        center = probs[0] * x_max
    else:
        center = x_max

    def sse(log_theta: float) -> float:
        curve = predict(axis, x, float(np.exp(log_theta)), probs[:1], scale, init_strength)[0]
        return float(((curve - observed) ** 2).sum())

    grid = np.log(center) + np.linspace(-6.0, 6.0, 1201) * np.log(10.0)
    losses = np.array([sse(g) for g in grid])
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    refined = minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-8})
    log_theta = refined.x if refined.fun <= losses[best] else grid[best]
    return float(np.exp(log_theta))


def crossing_point(x: np.ndarray, curve: np.ndarray, threshold: float = 0.5) -> float | None:
    """First x where the curve reaches `threshold`, linearly interpolated between the logged points.

    None when it never does (the skill has not emerged in the observed range); x[0] if it starts above.
    """
    x = np.asarray(x, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    above = np.flatnonzero(curve >= threshold)
    if above.size == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(x[0])
    x0, x1, y0, y1 = x[i - 1], x[i], curve[i - 1], curve[i]
    return float(x0 + (threshold - y0) * (x1 - x0) / (y1 - y0))
