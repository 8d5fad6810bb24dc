"""Statistics of step times: quantiles, bootstrap intervals, and the step-time ratios the report gives."""

from __future__ import annotations

import random
import statistics

from l2e_dist.bench.variants import Variant


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": q[0], "p75": q[2], "min": ordered[0], "max": ordered[-1]}


def median_ci95(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap 95% interval of the median (fixed seed: the report is reproducible from its step times)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def low_quantile(values: list[float]) -> float:
    return sorted(values)[len(values) // 10]


def ratio(num: Variant, den: Variant) -> dict[str, float]:
    """Step-time ratio num/den. `of_medians` is the headline figure; the paired per-round ratios (same round, same
    load) give its spread and a bootstrap interval; `of_p10` (10th percentiles) is the least disturbed by other
    load on a shared machine, since interference only ever adds time."""
    paired = [a / b for a, b in zip(num.wall, den.wall)]
    q = quantiles(paired)
    low, high = median_ci95(paired)
    return {
        "of_medians": statistics.median(num.wall) / statistics.median(den.wall),
        "paired_median": q["median"],
        "paired_p25": q["p25"],
        "paired_p75": q["p75"],
        "paired_median_ci95": [low, high],
        "of_p10": low_quantile(num.wall) / low_quantile(den.wall),
        "cpu_time_of_medians": statistics.median(num.cpu) / statistics.median(den.cpu),
    }

