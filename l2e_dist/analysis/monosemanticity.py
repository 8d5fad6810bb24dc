"""Offline monosemanticity analysis of one layer's MLP neurons: MS scores, thresholds, FKR and K-S statistics.

Pure numpy on a sample of activations `z[token, neuron]` with a feature label per token (-1 = unknown); the
formulas are those of docs/l2e-method.md (sections 2 and 5), evaluated EXACTLY over the sample:

* Statistics: per-neuron mean and unbiased variance over every token of the sample, the textbook two-pass
  algorithm (mean, then the sum of squared deviations) with fp64 accumulation, in row chunks so `z` may be a
  memory map.
* Score: phi = (z - mu_j)^2 / (var_j + eps * mean_k var_k), the training engine's score (eps = 0.01 keeps dead
  neurons, var ~ 0, from dominating; eps = 0 gives the bare (z - mu)^2 / var of the FKR definition).
* Thresholds: tau(p) = the (1 - p) quantile of ALL scores of the layer (numpy's default "linear" quantile of the
  exact sorted scores); a pair is selected when phi >= tau, as in training.
* FKR(p): l*_j = argmax over features l of mean_{tokens with feature l} phi_j (features with no token are
  skipped); FKR = #(selected, feature known, feature != l*_j) / #(selected, feature known). Unknown-feature
  tokens are left out of both counts (as the online FKR does). Undefined (None) when the sample holds fewer
  than two known features: l*_j is then the only feature and FKR would be 0 whatever the neurons do.
* K-S: for each feature l, sup_x |F_l(x) - F_all(x)| between the empirical CDF of the scores of the tokens
  labelled l (all neurons pooled) and that of all scores of the layer; identical to
  scipy.stats.ks_2samp(phi[features == l].ravel(), phi.ravel()).statistic, ties included.

Everything is computed from one sort of the layer's scores (peak memory ~ 40 bytes per (token, neuron) pair,
e.g. 1.3 GiB for 16k tokens x 2048 neurons); the sample size is the caller's choice (l2e-analyze --max-tokens).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_RATIOS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10)
DEFAULT_EPS = 0.01
# Score histograms (JSON and figures): log10(phi) in 0.1-decade bins; comparable across models and layers.
HIST_LOG10_EDGES = np.round(np.linspace(-8.0, 6.0, 141), 10)
_CHUNK_ELEMENTS = 1 << 24  # fp64 temporaries of ~128 MiB per chunk


def _row_chunks(num_rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def neuron_moments(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-neuron mean and unbiased variance of `z[token, neuron]` (two passes, fp64)."""
    num_tokens, width = z.shape
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens for a variance, got {num_tokens}")
    total = np.zeros(width, dtype=np.float64)
    for rows in _row_chunks(num_tokens, width):
        total += z[rows].sum(axis=0, dtype=np.float64)
    mean = total / num_tokens
    squares = np.zeros(width, dtype=np.float64)
    for rows in _row_chunks(num_tokens, width):
        dev = z[rows].astype(np.float64) - mean
        squares += np.einsum("ij,ij->j", dev, dev)
    return mean, squares / (num_tokens - 1)


def monosemanticity_scores(z: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """phi[token, neuron] = (z - mean)^2 / (var + eps * mean(var)) in fp64 (chunked over rows)."""
    inv_denom = 1.0 / np.maximum(var + eps * var.mean(), np.finfo(np.float64).tiny)
    phi = np.empty(z.shape, dtype=np.float64)
    for rows in _row_chunks(z.shape[0], z.shape[1]):
        dev = z[rows].astype(np.float64) - mean
        np.multiply(dev * dev, inv_denom, out=phi[rows])
    return phi


def feature_mean_scores(phi: np.ndarray, features: np.ndarray, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(token count per feature [F], mean score per feature and neuron [F, W]; NaN for features with no token)."""
    features = np.asarray(features)
    counts = np.bincount(features[features >= 0], minlength=num_features)[:num_features].astype(np.int64)
    sums = np.zeros((num_features, phi.shape[1]), dtype=np.float64)
    for label in np.flatnonzero(counts):
        sums[label] = phi[features == label].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    return counts, np.where(counts[:, None] > 0, means, np.nan)


def best_features(feature_means: np.ndarray) -> np.ndarray:
    """l*_j: the feature with the highest mean score for each neuron (-1 when no feature has a token)."""
    if feature_means.shape[0] == 0 or np.isnan(feature_means).all():
        return np.full(feature_means.shape[1], -1, dtype=np.int64)
    return np.nanargmax(np.where(np.isnan(feature_means), -np.inf, feature_means), axis=0).astype(np.int64)


def sorted_quantile(sorted_values: np.ndarray, q: float) -> float:
    """numpy's default ("linear") quantile of already sorted values."""
    position = q * (sorted_values.size - 1)
    low = math.floor(position)
    high = min(low + 1, sorted_values.size - 1)
    return float(sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low]))


def ks_statistics(sorted_values: np.ndarray, sorted_labels: np.ndarray, num_features: int) -> np.ndarray:
    """Two-sample K-S statistic between the values of each label and all values (NaN for absent labels).

    `sorted_labels[i]` is the label of `sorted_values[i]`. Both empirical CDFs only jump at data points, so the
    supremum is taken at the last index of every run of equal values (this is what makes ties exact).
    """
    n = sorted_values.size
    run_ends = np.flatnonzero(np.append(sorted_values[1:] != sorted_values[:-1], True))
    cdf_all = (run_ends + 1) / n
    out = np.full(num_features, np.nan)
    for label in range(num_features):
        member = sorted_labels == label
        count = int(np.count_nonzero(member))
        if count:
            cdf_label = np.cumsum(member, dtype=np.int64)[run_ends] / count
            out[label] = float(np.abs(cdf_label - cdf_all).max())
    return out


def histogram_bins(values: np.ndarray) -> np.ndarray:
    """Index of each value's HIST_LOG10_EDGES bin (int16); values outside (zeros included) go to the end bins."""
    lo, hi, count = HIST_LOG10_EDGES[0], HIST_LOG10_EDGES[-1], HIST_LOG10_EDGES.size - 1
    with np.errstate(divide="ignore"):
        position = (np.log10(values) - lo) * (count / (hi - lo))
    return np.clip(np.floor(position), 0, count - 1).astype(np.int16)


def _counts(bins: np.ndarray) -> list[int]:
    return np.bincount(bins, minlength=HIST_LOG10_EDGES.size - 1).tolist()


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def features_present(features: np.ndarray) -> int:
    """Distinct known features (label >= 0) among the sample's tokens."""
    return int(np.unique(features[features >= 0]).size)


def analyze_layer(
    z: np.ndarray,
    features: np.ndarray,
    feature_names: list[str],
    *,
    eps: float = DEFAULT_EPS,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    reference_scores: tuple[float, ...] = (),
    top_neurons: int = 10,
) -> dict:
    """JSON-ready monosemanticity report of one layer from its activations `z[token, neuron]`.

    `features[token]` indexes `feature_names` (-1 = unknown). `reference_scores` are FIXED score values whose
    exceedance fraction is comparable across models (L2E on/off), like the trainer's held-out check.
    """
    features = np.asarray(features, dtype=np.int64)
    num_tokens, width = z.shape
    if features.shape != (num_tokens,):
        raise ValueError(f"{features.shape[0]} feature labels for {num_tokens} tokens")
    num_features = len(feature_names)
    if features.size and features.max() >= num_features:
        raise ValueError(f"feature id {features.max()} but only {num_features} feature names")
    mean, var = neuron_moments(z)
    phi = monosemanticity_scores(z, mean, var, eps)
    counts, feature_means = feature_mean_scores(phi, features, num_features)
    best = best_features(feature_means)
    neuron_max = phi.max(axis=0)
    neuron_mean = phi.mean(axis=0)

    flat = phi.reshape(-1)
    order = np.argsort(flat)  # order within ties is irrelevant: every count below includes whole tie runs
    sorted_phi = flat[order]
    token_of = order // width
    sorted_labels = features.astype(np.int32)[token_of]
    del phi, flat
    known = sorted_labels >= 0
    own = known & (sorted_labels == best[order - token_of * width])
    del order, token_of
    n = sorted_phi.size

    sorted_max = np.sort(neuron_max)
    # With fewer than two features in the sample every neuron's l* is the one feature: FKR would be 0 by
    # construction, so it is undefined (None) instead.
    fkr_defined = features_present(features) >= 2
    thresholds = []
    for p in ratios:
        tau = sorted_quantile(sorted_phi, 1.0 - p)
        first = int(np.searchsorted(sorted_phi, tau, side="left"))
        selected_known = int(np.count_nonzero(known[first:]))
        selected_own = int(np.count_nonzero(own[first:]))
        thresholds.append({
            "p": float(p),
            "tau": tau,
            "selected_frac": (n - first) / n,
            "neurons_selected_frac": float(width - np.searchsorted(sorted_max, tau, side="left")) / width,
            "selected_known": selected_known,
            "fkr": (selected_known - selected_own) / selected_known if selected_known and fkr_defined else None,
        })
    reference = [{"score": float(s), "frac_above": (n - int(np.searchsorted(sorted_phi, s, side="left"))) / n}
                 for s in reference_scores]

    ks = ks_statistics(sorted_phi, sorted_labels, num_features)
    bins = histogram_bins(sorted_phi)
    feature_rows = []
    for label, name in enumerate(feature_names):
        member = sorted_labels == label
        feature_rows.append({
            "name": name,
            "tokens": int(counts[label]),
            "mean_score": _finite(float(np.nanmean(feature_means[label])) if counts[label] else math.nan),
            "ks": _finite(ks[label]),
            "neurons_best": int(np.count_nonzero(best == label)),
            "histogram": _counts(bins[member]),
        })

    with np.errstate(invalid="ignore", divide="ignore"):
        selectivity = np.where(best >= 0, feature_means[np.maximum(best, 0), np.arange(width)] / neuron_mean, np.nan)
    ranked = [int(j) for j in np.argsort(-np.nan_to_num(selectivity, nan=-np.inf), kind="stable")[:top_neurons]
              if math.isfinite(selectivity[j])]
    quantile_levels = (0.5, 0.9, 0.98, 0.99, 0.999)
    return {
        "tokens": num_tokens,
        "neurons": width,
        "eps": eps,
        "score": {
            "mean": float(sorted_phi.mean()),
            "max": float(sorted_phi[-1]),
            "quantiles": {str(q): sorted_quantile(sorted_phi, q) for q in quantile_levels},
            "log10_edges": HIST_LOG10_EDGES.tolist(),
            "histogram": _counts(bins),
        },
        "thresholds": thresholds,
        "reference": reference,
        "features": feature_rows,
        "unknown_tokens": int(np.count_nonzero(features < 0)),
        "top_neurons": [{
            "neuron": j,
            "feature": feature_names[best[j]],
            "feature_score": float(feature_means[best[j], j]),
            "mean_score": float(neuron_mean[j]),
            "selectivity": float(selectivity[j]),
        } for j in ranked],
        "activation": {"mean": float(mean.mean()), "var_mean": float(var.mean()),
                       "dead_neurons": int(np.count_nonzero(var == 0))},
    }
