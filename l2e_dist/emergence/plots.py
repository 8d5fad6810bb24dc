"""Figures of a sweep: R_k/S along one axis, network dashed, fitted model solid, one colour per skill,
one panel per inhibition method side by side (same seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from l2e_dist.fileio import atomic_write  # noqa: E402

AXIS_LETTER = {"time": "T", "data": "D", "width": "N"}


def plot_axis(axis: str, data: dict[str, Any], path: Path) -> None:
    """Write one PNG for one axis of a sweep summary (sweep.summarize_axis's dict)."""
    methods = list(data["methods"])
    fig, panels = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4.0), sharey=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for panel, method in zip(panels[0], methods):
        result = data["methods"][method]
        for k, (net, model) in enumerate(zip(result["network"]["mean"], result["model_dense"]["strengths"])):
            colour = colours(k % 10)
            panel.plot(data["x"], net, linestyle="--", marker=".", markersize=3, color=colour,
                       label=f"skill {k + 1} network")
            panel.plot(result["model_dense"]["x"], model, linestyle="-", color=colour, alpha=0.8,
                       label=f"skill {k + 1} model")
        if axis == "data":
            panel.set_xscale("log")
        panel.axhline(0.5, color="grey", linewidth=0.5)
        panel.set_xlabel(data["x_label"])
        panel.set_title(f"{method}: theta_{AXIS_LETTER[axis]} = {result['theta']:.3g}")
        panel.grid(alpha=0.3)
    panels[0][0].set_ylabel("R_k / S")
    panels[0][-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
