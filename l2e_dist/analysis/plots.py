"""Figures (matplotlib, PNG) for l2e-analyze reports and for comparing training runs' logs (l2e-plot).

Every function builds a `matplotlib.figure.Figure` (no pyplot global state), labels every axis, and returns it;
`save_png` writes it atomically. Colours distinguish runs/models, line styles distinguish layers or series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from l2e_dist.fileio import atomic_write

Series = tuple[np.ndarray, np.ndarray]  # (steps, values)
_L2E_TAG = re.compile(r"^(?:valid/)?l2e/layer(\d+)/(\w+)$")
# Per-layer L2E scalars of the trainer, in panel order: (name, y label, log scale when spanning a decade).
L2E_METRICS = (
    ("threshold", "threshold tau", True),
    ("selected_frac", "selected fraction", False),
    ("fkr", "false killing rate", False),
    ("mean_score", "mean MS score", False),
    ("reg", "L2E regularizer", False),
    ("frac_above_ref", "held-out frac >= ref score", False),
)
_STYLES = ("-", "--", ":", "-.")


def save_png(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG via a temporary file in the same directory."""
    path = Path(path)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))


def _grid(count: int, max_cols: int = 4, size: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, list]:
    cols = max(1, min(max_cols, count))
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


# ---------------------------------------------------------------------------------------------- l2e-analyze


def _layer_ids(report: Mapping) -> list[int]:
    return sorted({layer["layer"] for model in report["models"] for layer in model["layers"]})


def _highlight_ratio(report: Mapping) -> float:
    """The ratio whose threshold is marked in the score figure: 2% (the paper's default) when analysed."""
    ratios = report["settings"]["ratios"]
    return min(ratios, key=lambda p: abs(p - 0.02))


def plot_score_distributions(report: Mapping) -> Figure:
    """Per layer: distribution of log10 MS scores of every (token, neuron) pair, one line per model."""
    layers = _layer_ids(report)
    figure, axes = _grid(len(layers))
    ratio = _highlight_ratio(report)
    edges = np.asarray(report["models"][0]["layers"][0]["score"]["log10_edges"])  # shared by every histogram
    occupied = [i for model in report["models"] for entry in model["layers"]
                for i in np.flatnonzero(entry["score"]["histogram"])]
    x_range = (edges[min(occupied)] - 0.5, edges[max(occupied) + 1] + 0.5)
    for ax, lid in zip(axes, layers):
        for k, model in enumerate(report["models"]):
            entry = next((e for e in model["layers"] if e["layer"] == lid), None)
            if entry is None:
                continue
            counts = np.asarray(entry["score"]["histogram"], dtype=np.float64)
            ax.stairs(counts / max(counts.sum(), 1.0), edges, color=f"C{k}", label=model["label"])
            tau = next(t["tau"] for t in entry["thresholds"] if t["p"] == ratio)
            if tau > 0:
                ax.axvline(math.log10(tau), color=f"C{k}", ls="--", lw=1.0)
        ax.set_xlim(*x_range)
        ax.set_title(f"layer {lid} (dashed: tau at p={ratio:.1%})")
        ax.set_xlabel("log10 monosemanticity score")
        ax.set_ylabel("fraction of (token, neuron) pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def plot_fkr(report: Mapping) -> Figure:
    """FKR(p) and the fraction of neurons with at least one selected pair, per layer (and model)."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    ax_fkr, ax_neurons = figure.subplots(1, 2)
    layers = _layer_ids(report)
    multi = len(report["models"]) > 1
    for m, model in enumerate(report["models"]):
        for entry in model["layers"]:
            color = f"C{layers.index(entry['layer']) % 10}"
            label = f"{model['label']} layer {entry['layer']}" if multi else f"layer {entry['layer']}"
            ps = np.array([t["p"] for t in entry["thresholds"]]) * 100
            fkr = np.array([np.nan if t["fkr"] is None else t["fkr"] for t in entry["thresholds"]])
            neurons = np.array([t["neurons_selected_frac"] for t in entry["thresholds"]])
            style = dict(color=color, ls=_STYLES[m % len(_STYLES)], marker="o", ms=3, label=label)
            ax_fkr.plot(ps, fkr, **style)
            ax_neurons.plot(ps, neurons, **style)
    ax_fkr.set_title("false killing rate vs inhibition ratio")
    ax_fkr.set_ylabel("FKR")
    ax_neurons.set_title("neurons with >= 1 selected pair")
    ax_neurons.set_ylabel("fraction of neurons")
    for ax in (ax_fkr, ax_neurons):
        ax.set_xlabel("inhibition ratio p (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def plot_features(report: Mapping) -> Figure:
    """Per model, layer x feature heatmaps: K-S statistic (feature-conditioned vs all scores) and the share of
    neurons whose best feature (l*) it is."""
    names = report["data"]["feature_names"]
    layers = _layer_ids(report)
    models = report["models"]
    figure = Figure(figsize=(max(6.0, 0.45 * len(names) + 3) * 2, max(3.0, 0.35 * len(layers) + 2) * len(models)),
                    layout="constrained")
    axes = figure.subplots(len(models), 2, squeeze=False)
    for row, model in enumerate(models):
        ks = np.full((len(layers), len(names)), np.nan)
        share = np.full((len(layers), len(names)), np.nan)
        for entry in model["layers"]:
            i = layers.index(entry["layer"])
            for j, feature in enumerate(entry["features"]):
                ks[i, j] = np.nan if feature["ks"] is None else feature["ks"]
                share[i, j] = feature["neurons_best"] / entry["neurons"]
        for ax, values, title in ((axes[row][0], ks, "K-S statistic vs all scores"),
                                  (axes[row][1], share, "share of neurons with l* = feature")):
            image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(np.nanmax(values), 1e-9)
                              if np.isfinite(values).any() else 1.0)
            ax.set_title(f"{model['label']}: {title}")
            ax.set_xlabel("feature")
            ax.set_ylabel("layer")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(layers)), [str(lid) for lid in layers])
            figure.colorbar(image, ax=ax)
    return figure


def plot_analysis(report: Mapping, out_dir: str | Path) -> list[Path]:
    """Write scores.png, fkr.png and (when the data has feature labels) features.png into `out_dir`."""
    out = Path(out_dir)
    paths = [save_png(plot_score_distributions(report), out / "scores.png"),
             save_png(plot_fkr(report), out / "fkr.png")]
    if report["data"]["feature_names"]:
        paths.append(save_png(plot_features(report), out / "features.png"))
    return paths


# ---------------------------------------------------------------------------------------------- l2e-plot


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (weight 0 = no smoothing)."""
    if weight <= 0:
        return values
    out = np.empty(len(values))
    last = 0.0
    for i, value in enumerate(values):
        last = last * weight + (1.0 - weight) * value
        out[i] = last / (1.0 - weight ** (i + 1))
    return out


def plot_runs(runs: Mapping[str, Mapping[str, Series]], *, smooth: float = 0.0, title: str | None = None) -> Figure:
    """One figure comparing runs: train/valid loss and learning rate, then one row per L2E metric with one
    panel per layer (runs without L2E simply have no line there)."""
    per_layer: dict[str, set[int]] = {}
    for scalars in runs.values():
        for tag in scalars:
            match = _L2E_TAG.match(tag)
            if match:
                per_layer.setdefault(match.group(2), set()).add(int(match.group(1)))
    metrics = [m for m in L2E_METRICS if m[0] in per_layer]
    layers = sorted(set().union(*per_layer.values())) if per_layer else []
    cols = max(2, len(layers))
    figure = Figure(figsize=(4.2 * cols, 3.2 * (1 + len(metrics))), layout="constrained")
    axes = figure.subplots(1 + len(metrics), cols, squeeze=False)
    if title:
        figure.suptitle(title)
    ax_loss, ax_lr = axes[0][0], axes[0][1]
    for ax in axes[0][2:]:
        ax.set_visible(False)
    for k, (label, scalars) in enumerate(runs.items()):
        for tag, style, name in (("train/loss", "-", "train"), ("valid/loss", "--", "valid")):
            if tag in scalars:
                steps, values = scalars[tag]
                ax_loss.plot(steps, ema(values, smooth), color=f"C{k}", ls=style, label=f"{label} {name}")
        if "train/lr" in scalars:
            ax_lr.plot(*scalars["train/lr"], color=f"C{k}", label=label)
    ax_loss.set_title("loss")
    ax_loss.set_ylabel("LM loss")
    ax_lr.set_title("learning rate")
    ax_lr.set_ylabel("lr")
    for row, (metric, ylabel, log) in enumerate(metrics, start=1):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(layers) or layers[col] not in per_layer[metric]:
                ax.set_visible(False)
                continue
            lid = layers[col]
            for k, (label, scalars) in enumerate(runs.items()):
                tag = next((t for t in (f"l2e/layer{lid}/{metric}", f"valid/l2e/layer{lid}/{metric}")
                            if t in scalars), None)
                if tag is not None:
                    steps, values = scalars[tag]
                    ax.plot(steps, ema(values, smooth), color=f"C{k}", label=label)
            ax.set_title(f"layer {lid}: {metric}")
            ax.set_ylabel(ylabel)
            shown = np.concatenate([line.get_ydata() for line in ax.lines])
            if log and shown.min() > 0 and shown.max() > 10 * shown.min():  # log only when it spans a decade
                ax.set_yscale("log")
    for ax in axes.ravel():
        if ax.get_visible():
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    return figure

