"""The skill-basis model: closed forms against their definitions, scaling laws, and the one-parameter fit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from l2e_dist.emergence.skill_model import (
    crossing_point,
    data_strength,
    fit_theta,
    model_loss,
    one_shot_data_loss,
    predict,
    time_strength,
    width_loss,
    width_strength,
)
from l2e_dist.emergence.tasks import power_law_probs

S, ALPHA, R0 = 5.0, 0.6, 1e-3


def test_time_closed_form_solves_the_multilinear_gradient_flow() -> None:
    """R_k = a_k b_k with d a/dt = P b (S - a b)/theta and d b/dt = P a (S - a b)/theta, a(0) = b(0)."""
    probs, theta = power_law_probs(5, ALPHA), 3.0
    t = np.linspace(0.0, 40.0, 81)
    closed = time_strength(t, probs, S, theta, R0)
    for k, p in enumerate(probs):

        def flow(_t, ab, p=p):
            a, b = ab
            return [p * b * (S - a * b) / theta, p * a * (S - a * b) / theta]

        start = np.sqrt(R0 * S)
        sol = solve_ivp(flow, (0.0, t[-1]), [start, start], t_eval=t, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(closed[k], sol.y[0] * sol.y[1] / S, atol=1e-6)
    assert closed[:, 0] == pytest.approx(R0)


def test_one_shot_data_loss_matches_monte_carlo() -> None:
    """A skill is learned iff it occurs in the D samples: E[loss] = (S^2/2) sum_k P_k (1 - P_k)^D."""
    probs = power_law_probs(6, ALPHA)
    rng = np.random.default_rng(0)
    for d in (1, 5, 20, 60):
        counts = rng.multinomial(d, probs, size=40_000)
        losses = 0.5 * S**2 * ((counts == 0) * probs).sum(axis=1)
        sem = losses.std() / np.sqrt(losses.size)
        assert abs(one_shot_data_loss(np.array([d]), probs, S)[0] - losses.mean()) < 4 * sem + 1e-12


def test_width_loss_closed_form_equals_the_width_model_with_one_unit_per_skill() -> None:
    probs = power_law_probs(7, ALPHA)
    n = np.arange(0, 10)
    brute = np.array([0.5 * S**2 * probs[min(int(m), 7):].sum() for m in n])
    np.testing.assert_allclose(width_loss(n, probs, S), brute, rtol=1e-12)
    np.testing.assert_allclose(model_loss(width_strength(n, 7, 1.0), probs, S), brute, rtol=1e-12)


def test_emergence_points_match_the_closed_forms() -> None:
    probs, threshold = power_law_probs(5, ALPHA), 0.5
    theta_t, theta_d, theta_n = 22.0, 800.0, 4.0
    t = np.linspace(0, 2000, 200_001)
    d = np.linspace(0, 20_000, 200_001)
    n = np.linspace(0, 25, 250_001)
    for k, p in enumerate(probs):
        expected_t = theta_t * np.log((1 - R0) / R0) / (2 * p * S)  # logistic midpoint
        expected_d = 0.75 * theta_d / p  # 1 - sqrt(1 - x) = 1/2  <=>  x = 3/4
        expected_n = (k + 0.5) * theta_n
        assert crossing_point(t, time_strength(t, probs, S, theta_t, R0)[k]) == pytest.approx(expected_t, rel=1e-4)
        assert crossing_point(d, data_strength(d, probs, theta_d)[k]) == pytest.approx(expected_d, rel=1e-4)
        assert crossing_point(n, width_strength(n, 5, theta_n)[k]) == pytest.approx(expected_n, rel=1e-4)
    # Frequent skills first along every axis.
    assert np.all(np.diff(data_strength(np.array([3000.0]), probs, theta_d)[:, 0]) <= 0)
    assert crossing_point(np.arange(4.0), np.array([0.0, 0.2, 0.4, 0.45]), threshold) is None
    assert crossing_point(np.arange(3.0), np.array([0.0, 0.4, 0.8]), threshold) == pytest.approx(1.25)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def test_scaling_laws_of_the_model() -> None:
    """loss ~ T^(-alpha/(alpha+1)), D^(-alpha/(alpha+1)), N^(-alpha) with many power-law skills."""
    probs = power_law_probs(200_000, ALPHA)
    t = np.geomspace(1e3, 1e6, 10)
    d = np.geomspace(1e3, 1e6, 10)
    n = np.geomspace(10, 1000, 10).astype(int)
    assert _slope(t, model_loss(time_strength(t, probs, S, 1.0, R0), probs, S)) == pytest.approx(
        -ALPHA / (ALPHA + 1), abs=0.02)
    assert _slope(d, one_shot_data_loss(d, probs, S)) == pytest.approx(-ALPHA / (ALPHA + 1), abs=0.02)
    assert _slope(n, width_loss(n, probs, S)) == pytest.approx(-ALPHA, abs=0.01)


@pytest.mark.parametrize(
    ("axis", "theta", "x"),
    [
        ("time", 22.0, np.linspace(0, 600, 121)),  # x = cumulative learning rate
        ("data", 800.0, np.geomspace(100, 20_000, 40)),
        ("width", 4.0, np.arange(1, 25, dtype=np.float64)),
    ],
)
def test_fit_recovers_theta_from_noisy_model_curves(axis: str, theta: float, x: np.ndarray) -> None:
    probs = power_law_probs(5, ALPHA)
    rng = np.random.default_rng(1)
    curves = predict(axis, x, theta, probs, S, R0)
    noisy = curves[0] + rng.normal(0.0, 0.03, size=x.size)
    fitted = fit_theta(axis, x, noisy, probs, S, R0)
    assert fitted == pytest.approx(theta, rel=0.05)


def test_skill_strength_is_the_regression_coefficient_on_the_target() -> None:
    import torch

    from l2e_dist.emergence.network import skill_strength

    rng = np.random.default_rng(2)
    target = S * (2 * rng.integers(0, 2, 4000) - 1).astype(np.float64)
    output = 0.3 * target + 1.7 + rng.normal(0, 2.0, target.size)
    reference = np.polyfit(target, output, 1)[0]  # least-squares slope of output on target: R_k / S
    assert skill_strength(torch.tensor(output), torch.tensor(target)) == pytest.approx(reference, rel=1e-9)
    assert skill_strength(torch.tensor(target + 3.0), torch.tensor(target)) == pytest.approx(1.0)
    assert skill_strength(torch.full((10,), 2.0), torch.tensor(target[:10])) == pytest.approx(0.0)
