"""NeuroMFA over training checkpoints: spectra per checkpoint, emergence degree per run, JSON and figures.

`analyse_state_dict` runs the multifractal analysis (`multifractal`) on every sampled neuron network
(`neuromfa_network`) of one HF GPTNeoX state dict and averages the samples; `analyse_run` does that for
each checkpoint of a run and adds E(t); `write_report` writes
neuromfa.json, spectra.png and metrics.png for several runs (e.g. L2E on and off) overlaid.
E(t) is relative to t = 0: the run's step-0 snapshot (added from the run's directory when not given), else
the first checkpoint, with a warning naming it.
`neuromfa_summary` is the cheap per-step entry point for TensorBoard logging during training.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from l2e_dist.analysis.multifractal import (
    MultifractalSpectrum,
    SpectrumUndefinedError,
    default_q_grid,
    emergence_degree,
    multifractal_spectrum,
)
from l2e_dist.analysis.neuromfa_network import (
    NetworkShape,
    NeuroMFAError,
    NeuronSample,
    build_network,
    direct_distances,
    is_block_weight,
    load_gptneox_state,
    sample_neuron_indices,
    shortest_path_distances,
)
from l2e_dist.config_utils import ConfigError
from l2e_dist.fileio import atomic_write

REPORT_FORMAT = "l2e-neuromfa/1"
_LOG = logging.getLogger(__name__)
_STEP_IN_NAME = re.compile(r"(?:global_step|step|iter|checkpoint)[-_]?(\d+)")


@dataclass
class NeuroMFASettings:
    """Analysis settings; defaults are the paper's (direct-edge distances as in the authors' code)."""

    distance: Literal["direct", "shortest"] = "direct"
    num_samples: int = 10
    seed: int = 0
    hidden_per_layer: int = 32
    intermediate_per_layer: int = 64
    q_min: float = -3.0
    q_max: float = 3.0
    q_step: float = 0.1
    min_distance: float = 1.0
    max_distance: float = 150.0
    min_neighbours: int = 10

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("num_samples", "must be at least 1")
        if not (self.q_step > 0 and self.q_max > self.q_min):
            raise ConfigError("q_step", "need q_step > 0 and q_max > q_min")
        if len(self.q) < 3:
            raise ConfigError("q_step", "the q grid needs at least 3 points for the Legendre transform")
        if not 0 <= self.min_distance < self.max_distance:
            raise ConfigError("max_distance", "need 0 <= min_distance < max_distance")
        if self.min_neighbours < 0:
            raise ConfigError("min_neighbours", "must be >= 0 (a node needs more distances than this)")

    @property
    def q(self) -> np.ndarray:
        return default_q_grid(self.q_min, self.q_max, self.q_step)

    def samples(self, config: Any) -> list[NeuronSample]:
        """The run's fixed neuron samples for a model of this config."""
        return sample_neuron_indices(
            config, self.num_samples, self.seed, self.hidden_per_layer, self.intermediate_per_layer
        )


@dataclass(frozen=True)
class CheckpointAnalysis:
    """Per-sample spectra of one checkpoint (None where a sample has no spectrum) and their mean."""

    spectra: list[MultifractalSpectrum | None]
    alpha_0: float
    alpha_0_std: float
    width: float
    width_std: float
    mean_tau: np.ndarray
    mean_alpha: np.ndarray
    mean_f_alpha: np.ndarray
    mean_generalized_dimension: np.ndarray


def _sample_spectrum(
    state_dict: Mapping[str, Any], config: Any, sample: NeuronSample, settings: NeuroMFASettings
) -> MultifractalSpectrum:
    network = build_network(state_dict, config, sample)
    if settings.distance == "shortest":
        nodes, distances = shortest_path_distances(network, settings.max_distance)
    else:
        nodes, distances = direct_distances(network)
    return multifractal_spectrum(
        nodes, distances, settings.q, settings.min_distance, settings.max_distance, settings.min_neighbours
    )


def analyse_state_dict(
    state_dict: Mapping[str, Any],
    config: Any,
    samples: Sequence[NeuronSample],
    settings: NeuroMFASettings | None = None,
) -> CheckpointAnalysis:
    """Spectrum of every sample; a sample without a spectrum (no usable node) warns and counts as NaN."""
    settings = settings or NeuroMFASettings()
    spectra: list[MultifractalSpectrum | None] = []
    for index, sample in enumerate(samples):
        try:
            spectra.append(_sample_spectrum(state_dict, config, sample, settings))
        except SpectrumUndefinedError as exc:
            warnings.warn(f"NeuroMFA sample {index}: no spectrum ({exc})", RuntimeWarning, stacklevel=2)
            spectra.append(None)
    defined = [s for s in spectra if s is not None]

    def mean(name: str, std: bool = False) -> Any:
        """Mean (or std) over the defined samples, elementwise for curves; NaN when none is defined."""
        if not defined:
            return math.nan if name in ("alpha_0", "width") else np.full(settings.q.size, np.nan)
        values = np.array([getattr(s, name) for s in defined])
        return values.std(axis=0) if std else values.mean(axis=0)

    return CheckpointAnalysis(
        spectra=spectra,
        alpha_0=float(mean("alpha_0")),
        alpha_0_std=float(mean("alpha_0", std=True)),
        width=float(mean("width")),
        width_std=float(mean("width", std=True)),
        mean_tau=mean("tau"),
        mean_alpha=mean("alpha"),
        mean_f_alpha=mean("f_alpha"),
        mean_generalized_dimension=mean("generalized_dimension"),
    )


def neuromfa_summary(
    state_dict_hf: Mapping[str, Any],
    config: Any,
    sample_indices: Sequence[NeuronSample],
    settings: NeuroMFASettings | None = None,
    reference: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Scalars for TensorBoard during training: neuromfa/alpha_0, width (and their std over samples).

    Pass the summary of the first step as `reference` to also get neuromfa/emergence, E(t) relative to it.
    `sample_indices` must stay the same for the whole run (e.g. `NeuroMFASettings().samples(config)`).
    """
    result = analyse_state_dict(state_dict_hf, config, sample_indices, settings)
    summary = {
        "neuromfa/alpha_0": result.alpha_0,
        "neuromfa/alpha_0_std": result.alpha_0_std,
        "neuromfa/width": result.width,
        "neuromfa/width_std": result.width_std,
    }
    if reference is not None:
        summary["neuromfa/emergence"] = float(
            emergence_degree(
                result.alpha_0, result.width, reference["neuromfa/alpha_0"], reference["neuromfa/width"]
            )
        )
    return summary


def step_from_path(path: str | Path) -> int | None:
    """Training step from the innermost path component naming one (step1000, global_step1000, iter_0001000)."""
    for part in reversed(Path(path).parts):
        match = _STEP_IN_NAME.search(part)
        if match:
            return int(match.group(1))
    return None


def run_checkpoints(path: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the models a run directory holds, by step: its snapshots (`snapshots/step<N>`, or the
    step<N> directories of an `l2e-convert to-hf --all` output); without any, its resume checkpoints
    (`checkpoints/global_step<N>`, with a warning: keep_last_n pruned the early ones). [] for a single model."""
    from l2e_dist.checkpoint.manifest import list_checkpoints
    from l2e_dist.checkpoint.snapshots import is_model_directory, run_snapshots

    path = Path(path)
    found = run_snapshots(path)
    if not found and path.is_dir() and not is_model_directory(path):
        found = list_checkpoints(path / "checkpoints")
        if found:
            warnings.warn(
                f"{path} has no snapshots: using its resume checkpoints {[s for s, _ in found]}, which keep_last_n "
                "prunes (train with train.save_schedule=pythia to keep step 0 and the early steps)",
                stacklevel=2,
            )
    return found


def initialization_snapshot(checkpoints: Sequence[tuple[int, Path]]) -> Path | None:
    """The step-0 snapshot of the run the checkpoints belong to: one of them, else a `step0` next to the
    first (a snapshots/ directory or an --all export), else the run's snapshots/step0 for `global_step<N>`."""
    for step, path in checkpoints:
        if step == 0:
            return path
    if not checkpoints:
        return None
    parent = Path(checkpoints[0][1]).parent
    for candidate in (parent / "step0", parent.parent / "snapshots" / "step0"):
        if candidate.is_dir():
            return candidate
    return None


def checkpoint_steps(
    paths: Sequence[str | Path], steps: Sequence[int] | None = None
) -> list[tuple[int, Path]]:
    """(step, path) sorted by step, steps given explicitly or parsed from the paths; a run directory stands
    for all its snapshots (`run_checkpoints`)."""
    expanded: list[str | Path] = []
    for path in paths:
        series = run_checkpoints(path)
        if series and steps is not None:
            raise NeuroMFAError(f"'{path}' is a run directory (steps from its snapshots): do not pass --steps")
        if series:
            expanded.extend(p for _, p in series)
        else:
            expanded.append(path)
    paths = expanded
    if steps is not None:
        if len(steps) != len(paths):
            raise NeuroMFAError(
                f"got {len(steps)} --steps for {len(paths)} checkpoints; give one step per checkpoint"
            )
        pairs = [(int(s), Path(p)) for s, p in zip(steps, paths)]
    else:
        pairs = []
        for path in paths:
            step = step_from_path(path)
            if step is None:
                raise NeuroMFAError(
                    f"no training step in checkpoint path '{path}' (expected e.g. step1000 or global_step1000); "
                    "pass --steps"
                )
            pairs.append((step, Path(path)))
    found = [s for s, _ in pairs]
    if len(set(found)) != len(found):
        raise NeuroMFAError(f"two checkpoints of one run have the same step ({sorted(found)}); pass --steps")
    return sorted(pairs, key=lambda pair: pair[0])


def _floats(values: Any) -> Any:
    """numpy -> JSON lists with NaN/inf as null (strict JSON)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        value = float(array)
        return value if math.isfinite(value) else None
    return [_floats(v) for v in array]


def _spectrum_json(spectrum: MultifractalSpectrum | None, with_partition: bool) -> dict[str, Any] | None:
    if spectrum is None:
        return None
    data = {
        "alpha_0": _floats(spectrum.alpha_0),
        "width": _floats(spectrum.width),
        "num_nodes": spectrum.num_nodes,
        "tau": _floats(spectrum.tau),
        "tau_fit_r2": _floats(spectrum.tau_fit_r2),
        "alpha": _floats(spectrum.alpha),
        "f_alpha": _floats(spectrum.f_alpha),
        "generalized_dimension": _floats(spectrum.generalized_dimension),
    }
    if with_partition:
        data["radii"] = _floats(spectrum.radii)
        data["log_partition"] = _floats(spectrum.log_partition)
    return data


def analyse_run(
    label: str,
    checkpoints: Sequence[tuple[int, Path]],
    settings: NeuroMFASettings,
    with_partition: bool = False,
) -> dict[str, Any]:
    """Analyse every checkpoint of one run on the same neuron samples; the JSON-ready run record."""
    if not checkpoints:
        raise NeuroMFAError(f"run '{label}' has no checkpoints")
    checkpoints = sorted(checkpoints, key=lambda pair: pair[0])
    initialization = initialization_snapshot(checkpoints)
    if initialization is not None and checkpoints[0][0] != 0:
        checkpoints = [(0, initialization), *checkpoints]
    reference_step, reference_path = checkpoints[0]
    if reference_step == 0:
        _LOG.info("%s: E(t) relative to step 0, the initialization (%s)", label, reference_path)
    else:
        warnings.warn(
            f"run '{label}' has no step-0 snapshot: E(t) is measured relative to step {reference_step} "
            f"({reference_path}), not to the initialization (keep one with train.save_schedule=pythia or "
            "train.extra_save_steps=[0, ...])",
            RuntimeWarning,
            stacklevel=2,
        )
    samples: list[NeuronSample] | None = None
    shape: NetworkShape | None = None
    records = []
    for step, path in checkpoints:
        started = time.perf_counter()
        state, config = load_gptneox_state(path, key_filter=is_block_weight)
        this_shape = NetworkShape.from_config(config)
        if shape is None:
            shape, samples = this_shape, settings.samples(config)
        elif this_shape != shape:
            raise NeuroMFAError(f"checkpoint '{path}' has shape {this_shape}, the run's first has {shape}")
        result = analyse_state_dict(state, config, samples, settings)
        records.append(
            {
                "step": step,
                "path": str(path),
                "alpha_0": _floats(result.alpha_0),
                "alpha_0_std": _floats(result.alpha_0_std),
                "width": _floats(result.width),
                "width_std": _floats(result.width_std),
                "mean_spectrum": {
                    "tau": _floats(result.mean_tau),
                    "alpha": _floats(result.mean_alpha),
                    "f_alpha": _floats(result.mean_f_alpha),
                    "generalized_dimension": _floats(result.mean_generalized_dimension),
                },
                "samples": [_spectrum_json(s, with_partition) for s in result.spectra],
            }
        )
        _LOG.info(
            "%s step %d: alpha_0=%.4f width=%.4f (%.2fs, %s)",
            label,
            step,
            result.alpha_0,
            result.width,
            time.perf_counter() - started,
            path,
        )
    alpha_0 = np.array([np.nan if r["alpha_0"] is None else r["alpha_0"] for r in records])
    width = np.array([np.nan if r["width"] is None else r["width"] for r in records])
    emergence = emergence_degree(alpha_0, width, alpha_0[0], width[0])
    for record, value in zip(records, emergence):
        record["emergence"] = _floats(value)
    return {
        "label": label,
        "emergence_reference": {"step": reference_step, "path": str(reference_path),
                                "initialization": reference_step == 0},
        "shape": asdict(shape),
        "sample_indices": [s.to_json() for s in samples],
        "checkpoints": records,
    }


def _step_axis(ax: Any, steps: np.ndarray) -> None:
    """Symlog step axis when checkpoints span several decades (Pythia's log-spaced early steps)."""
    positive = steps[steps > 0]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_xscale("symlog", linthresh=float(positive.min()))


def _step_norm(steps: np.ndarray) -> Any:
    from matplotlib.colors import Normalize, SymLogNorm

    low, high = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    positive = steps[steps > 0]
    if positive.size and positive.max() / positive.min() > 100:
        return SymLogNorm(linthresh=float(positive.min()), vmin=low, vmax=high)
    return Normalize(vmin=low, vmax=high)


def plot_spectra(report: Mapping[str, Any], path: Path) -> None:
    """f(alpha) of each checkpoint (mean over samples), coloured by training step; one panel per run."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    runs = report["runs"]
    figure = Figure(figsize=(5 * len(runs), 4.2), layout="constrained")
    axes = figure.subplots(1, len(runs), squeeze=False, sharey=True)[0]
    for ax, run in zip(axes, runs):
        steps = np.array([c["step"] for c in run["checkpoints"]], dtype=np.float64)
        norm, cmap = _step_norm(steps), colormaps["viridis"]
        for checkpoint in run["checkpoints"]:
            spectrum = checkpoint["mean_spectrum"]
            alpha = np.array(spectrum["alpha"], dtype=np.float64)
            f_alpha = np.array(spectrum["f_alpha"], dtype=np.float64)
            ax.plot(alpha, f_alpha, color=cmap(norm(checkpoint["step"])), lw=1.4)
        ax.set_title(run["label"])
        ax.set_xlabel(r"$\alpha$")
        ax.grid(alpha=0.3)
        figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step")
    axes[0].set_ylabel(r"$f(\alpha)$")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def plot_metrics(report: Mapping[str, Any], path: Path) -> None:
    """alpha_0, width (mean +- std over samples) and E(t) against training step, runs overlaid."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.2), layout="constrained")
    axes = figure.subplots(1, 3)
    panels = (
        ("alpha_0", r"$\alpha_0$ (regularity)"),
        ("width", "width (heterogeneity)"),
        ("emergence", "emergence degree E(t)"),
    )
    all_steps = []
    for run in report["runs"]:
        steps = np.array([c["step"] for c in run["checkpoints"]], dtype=np.float64)
        all_steps.append(steps)
        for ax, (key, _title) in zip(axes, panels):
            values = np.array([c[key] for c in run["checkpoints"]], dtype=np.float64)
            std = np.array([c.get(f"{key}_std", 0.0) for c in run["checkpoints"]], dtype=np.float64)
            ax.errorbar(steps, values, yerr=std, marker="o", ms=3, capsize=2, label=run["label"])
    for ax, (_key, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        _step_axis(ax, np.concatenate(all_steps))
    axes[2].axhline(0.0, color="0.5", lw=0.8)
    axes[0].legend()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def load_report(path: str | Path) -> dict[str, Any]:
    """A neuromfa.json written earlier (to overlay its runs on new ones)."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NeuroMFAError(f"cannot read NeuroMFA report '{path}': {exc}") from exc
    if report.get("format") != REPORT_FORMAT:
        raise NeuroMFAError(f"'{path}' is not a {REPORT_FORMAT} report (format: {report.get('format')!r})")
    return report


def write_report(
    runs: Sequence[tuple[str, Sequence[tuple[int, Path]]]],
    settings: NeuroMFASettings,
    out_dir: str | Path,
    previous_reports: Sequence[str | Path] = (),
    with_partition: bool = False,
) -> dict[str, Any]:
    """Analyse each (label, [(step, path)...]) run, add runs of earlier reports, write JSON and figures."""
    settings_json = asdict(settings)
    report_runs = []
    for previous in previous_reports:
        old = load_report(previous)
        if old["settings"] != settings_json:
            raise NeuroMFAError(
                f"cannot overlay '{previous}': its settings {old['settings']} differ from {settings_json}"
            )
        report_runs.extend(old["runs"])
    report_runs.extend(analyse_run(label, ckpts, settings, with_partition) for label, ckpts in runs)
    labels = [run["label"] for run in report_runs]
    if len(set(labels)) != len(labels):
        raise NeuroMFAError(f"run labels must be unique, got {labels}; name runs with --run LABEL ...")
    if not report_runs:
        raise NeuroMFAError("nothing to analyse: give checkpoints, --run LABEL CHECKPOINT..., or --from-json")
    report = {
        "format": REPORT_FORMAT,
        "settings": settings_json,
        "q": _floats(settings.q),
        "runs": report_runs,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, allow_nan=False)
    atomic_write(out / "neuromfa.json", lambda tmp: Path(tmp).write_text(text))
    plot_spectra(report, out / "spectra.png")
    plot_metrics(report, out / "metrics.png")
    return report
