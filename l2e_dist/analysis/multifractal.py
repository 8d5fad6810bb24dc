"""Multifractal spectrum of a weighted network by box-growing around each node (NeuroMFA, Xiao et al. 2025).

Input is a flat list of (node, distance) pairs: every distance from a node to one of its neighbours (direct
edges or shortest paths, see `neuromfa_network`). Per node, distances in (min_distance, max_distance] are kept
and rounded to integers; nodes with more than `min_neighbours` of them take part. With the radii r = sorted
distinct distances and d = max r:

    N_i(r) = 1 + #neighbours of i within r,   mu_i(r) = N_i(r) / N_i(d),   Z_q(r) = sum_i mu_i(r)^q,
    tau(q) = least-squares slope of ln Z_q(r) against ln(r / d),
    alpha(q) = d tau / dq,  f(alpha) = q * alpha - tau(q),  D(q) = tau(q) / (q - 1).

With this (sandbox-style) normalisation tau(0) = 0 and f(alpha) <= 0 with its peak f = 0 at q = 0, as in the
authors' code. Everything is vectorised: counts come from one bincount over (node, radius) cells, Z_q(r) from
one sparse product over the distinct values of mu, and tau(q) from one lstsq for all q.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

# mu^q summed over nodes must stay inside float64 (exp(709)); the q range is checked against this.
_MAX_LOG_TERM = 700.0


class SpectrumUndefinedError(ValueError):
    """The network has too few usable nodes or radii for a multifractal spectrum."""


def default_q_grid(q_min: float = -3.0, q_max: float = 3.0, q_step: float = 0.1) -> np.ndarray:
    """The paper's moment orders q = -3..3 step 0.1 (rounded so that q = 0 and q = 1 are exact)."""
    count = int(round((q_max - q_min) / q_step)) + 1
    return np.round(q_min + q_step * np.arange(count), 10)


@dataclass(frozen=True)
class NodeMasses:
    """Box masses N_i(r) of the nodes that take part, at every radius."""

    radii: np.ndarray  # (R,) sorted distinct rounded distances
    masses: np.ndarray  # (n, R) N_i(r) = 1 + neighbours of node i within r
    nodes: np.ndarray  # (n,) ids of the nodes that take part


def node_masses(
    nodes: np.ndarray,
    distances: np.ndarray,
    min_distance: float = 1.0,
    max_distance: float = 150.0,
    min_neighbours: int = 10,
) -> NodeMasses:
    """Cumulative neighbour counts per node over the common radii (one bincount, no loop over nodes)."""
    nodes = np.asarray(nodes, dtype=np.int64)
    distances = np.asarray(distances, dtype=np.float64)
    keep = (distances > min_distance) & (distances <= max_distance)
    nodes, rounded = nodes[keep], np.round(distances[keep])
    if nodes.size == 0:
        raise SpectrumUndefinedError(f"no distance lies in ({min_distance:g}, {max_distance:g}]")
    node_ids, node_row = np.unique(nodes, return_inverse=True)
    per_node = np.bincount(node_row, minlength=node_ids.size)
    usable = per_node > min_neighbours
    if not usable.any():
        raise SpectrumUndefinedError(
            f"no node has more than {min_neighbours} distances in ({min_distance:g}, {max_distance:g}]"
        )
    # Re-number the usable nodes 0..n-1 and drop the others' distances.
    new_row = np.cumsum(usable) - 1
    in_use = usable[node_row]
    row, rounded = new_row[node_row[in_use]], rounded[in_use]
    radii = np.unique(rounded)
    if radii.size < 2:
        raise SpectrumUndefinedError("all usable distances round to one radius; no scaling to fit")
    column = np.searchsorted(radii, rounded)
    num_nodes = int(usable.sum())
    cells = np.bincount(row * radii.size + column, minlength=num_nodes * radii.size)
    masses = 1.0 + np.cumsum(cells.reshape(num_nodes, radii.size), axis=1)
    return NodeMasses(radii=radii, masses=masses, nodes=node_ids[usable])


def log_partition_function(masses: np.ndarray, q: np.ndarray) -> np.ndarray:
    """ln Z_q(r) = ln sum_i (N_i(r)/N_i(d))^q, shape (len(q), R).

    mu only takes the values N/M of the distinct (mass, total mass) pairs, so mu^q is evaluated once per
    pair and q, and a sparse (radius x pair) count matrix sums the nodes: one sparse-dense product, no exp
    per (q, node, radius).
    """
    masses = np.asarray(masses, dtype=np.int64)
    q = np.asarray(q, dtype=np.float64)
    largest = int(masses[:, -1].max())
    if np.abs(q).max() * np.log(largest * masses.shape[0]) > _MAX_LOG_TERM:
        raise SpectrumUndefinedError(
            f"|q| up to {np.abs(q).max():g} overflows float64 for masses up to {largest}"
        )
    base = largest + 1
    pairs, pair_index = np.unique(masses * base + masses[:, -1:], return_inverse=True)
    num_nodes, num_radii = masses.shape
    radius_index = np.broadcast_to(np.arange(num_radii), masses.shape).ravel()
    counts = csr_matrix(
        (np.ones(masses.size), (radius_index, pair_index.ravel())), shape=(num_radii, pairs.size)
    )
    log_mu = np.log(pairs // base) - np.log(pairs % base)
    return np.log(counts @ np.exp(np.multiply.outer(log_mu, q))).T


def mass_exponents(radii: np.ndarray, log_partition: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tau(q) as the slope of ln Z_q(r) vs ln(r/d) for all q in one lstsq; also each fit's R^2."""
    log_r = np.log(radii / radii[-1])
    design = np.stack([log_r, np.ones_like(log_r)], axis=1)
    coef, *_ = np.linalg.lstsq(design, log_partition.T, rcond=None)
    residual = log_partition.T - design @ coef
    total = log_partition.T - log_partition.T.mean(axis=0)
    total_ss = (total**2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total_ss > 0, 1.0 - (residual**2).sum(axis=0) / total_ss, 1.0)
    return coef[0], r2


def legendre_transform(q: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha = d tau/dq (second-order finite differences on the q grid) and f(alpha) = q*alpha - tau."""
    q = np.asarray(q, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    alpha = np.gradient(tau, q, edge_order=2)
    return alpha, q * alpha - tau


def generalized_dimensions(q: np.ndarray, tau: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """D(q) = tau(q)/(q-1); at q = 1 the limit d tau/dq = alpha(1) is used."""
    q = np.asarray(q, dtype=np.float64)
    at_one = np.isclose(q, 1.0, rtol=0.0, atol=1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        dims = np.asarray(tau, dtype=np.float64) / (q - 1.0)
    return np.where(at_one, alpha, dims)


def spectrum_summary(alpha: np.ndarray, f_alpha: np.ndarray) -> tuple[float, float]:
    """alpha_0 (alpha at the peak of f: regularity) and width max(alpha) - min(alpha) (heterogeneity)."""
    return float(alpha[int(np.argmax(f_alpha))]), float(alpha.max() - alpha.min())


def emergence_degree(
    alpha_0: np.ndarray | float, width: np.ndarray | float, alpha_0_ref: float, width_ref: float
) -> np.ndarray:
    """E(t) = (w(t)/w(0)) * ln(alpha_0(0)/alpha_0(t)) relative to the reference (first) checkpoint."""
    alpha_0 = np.asarray(alpha_0, dtype=np.float64)
    width = np.asarray(width, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (width / width_ref) * np.log(alpha_0_ref / alpha_0)


@dataclass(frozen=True)
class MultifractalSpectrum:
    """Everything NeuroMFA reports for one network sample."""

    q: np.ndarray
    radii: np.ndarray
    log_partition: np.ndarray  # ln Z_q(r), (len(q), len(radii))
    tau: np.ndarray
    tau_fit_r2: np.ndarray
    alpha: np.ndarray
    f_alpha: np.ndarray
    generalized_dimension: np.ndarray
    alpha_0: float
    width: float
    num_nodes: int


def multifractal_spectrum(
    nodes: np.ndarray,
    distances: np.ndarray,
    q: np.ndarray | None = None,
    min_distance: float = 1.0,
    max_distance: float = 150.0,
    min_neighbours: int = 10,
) -> MultifractalSpectrum:
    """The full spectrum from (node, distance) pairs; raises SpectrumUndefinedError when it has no support."""
    q = default_q_grid() if q is None else np.asarray(q, dtype=np.float64)
    box = node_masses(nodes, distances, min_distance, max_distance, min_neighbours)
    log_z = log_partition_function(box.masses, q)
    tau, r2 = mass_exponents(box.radii, log_z)
    alpha, f_alpha = legendre_transform(q, tau)
    alpha_0, width = spectrum_summary(alpha, f_alpha)
    return MultifractalSpectrum(
        q=q,
        radii=box.radii,
        log_partition=log_z,
        tau=tau,
        tau_fit_r2=r2,
        alpha=alpha,
        f_alpha=f_alpha,
        generalized_dimension=generalized_dimensions(q, tau, alpha),
        alpha_0=alpha_0,
        width=width,
        num_nodes=int(box.nodes.size),
    )
