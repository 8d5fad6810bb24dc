"""l2e-analyze's work: monosemanticity of every chosen layer of one or more models on the same labelled sample.

Per model: record the MLP activations of the chosen layers (one forward pass over the sample, float32 memory
maps in a scratch directory), then analyse the layers one at a time (`monosemanticity.analyze_layer`: exact
statistics, scores, thresholds, FKR(p), per-feature scores and K-S). Writes `analysis.json` and the figures of
`plots.plot_analysis`. Every model sees the same tokens, so their reports are directly comparable.

Per layer, `analysis.json` holds (p = inhibition ratio, tau(p) = the layer's (1-p) score quantile):
  score        mean, max, quantiles and a log10 histogram of all (token, neuron) scores
  thresholds   per p: tau, selected_frac (pairs with phi >= tau: p up to ties), neurons_selected_frac (neurons
               with at least one selected pair), fkr and selected_known (its denominator)
  reference    per fixed score s: frac_above (comparable across models, unlike tau(p))
  features     per feature: tokens, mean_score (feature-conditioned), ks (vs all scores), neurons_best (neurons
               whose l* it is), histogram
  top_neurons  the most feature-selective neurons: mean score on l* / mean score over all tokens
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from l2e_dist.analysis.activations import load_gptneox, record_activations
from l2e_dist.analysis.monosemanticity import DEFAULT_EPS, DEFAULT_RATIOS, analyze_layer
from l2e_dist.analysis.samples import LabelledTokens
from l2e_dist.config_utils import ConfigError
from l2e_dist.errors import UserError
from l2e_dist.fileio import atomic_write_text
from l2e_dist.l2e.config import L2EConfig

REPORT_FORMAT = "l2e-analyze/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AnalysisError(UserError, ValueError):
    """A user-facing problem with the analysis inputs (one line, with the fix)."""


@dataclass
class AnalyzeSettings:
    layers: str = "all"  # all | mid2 | mid_third | comma-separated 0-based indices
    activation: str = "post_act"  # post_act | pre_act
    eps: float = DEFAULT_EPS
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    reference_scores: list[float] = field(default_factory=lambda: [10.0])
    top_neurons: int = 10
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> None:
        if self.activation not in ("post_act", "pre_act"):
            raise AnalysisError(f"--activation must be post_act or pre_act, got {self.activation!r}")
        if not self.ratios or any(not 0.0 < p < 1.0 for p in self.ratios):
            raise AnalysisError(f"--ratios must be fractions in (0, 1), e.g. 0.02 for 2%, got {self.ratios}")
        if self.eps < 0:
            raise AnalysisError(f"--eps must be >= 0, got {self.eps}")
        if self.batch_size < 1:
            raise AnalysisError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype not in _DTYPES:
            raise AnalysisError(f"--dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """'all', 'mid2', 'mid_third' or '0,3,5' -> sorted 0-based layer indices of a `num_layers`-layer model."""
    if spec == "all":
        return list(range(num_layers))
    try:
        layers: str | list[int] = spec if spec in ("mid2", "mid_third") else [int(x) for x in spec.split(",")]
        return L2EConfig(layers=layers).resolve_layers(num_layers)
    except ValueError as exc:  # int() on a bad item, or ConfigError
        message = str(exc).split(": ", 1)[-1] if isinstance(exc, ConfigError) else f"cannot parse {spec!r}"
        raise AnalysisError(f"--layers: {message} (use all, mid2, mid_third or e.g. 0,3)") from None


def analyze_model(label: str, path: str, sample: LabelledTokens, settings: AnalyzeSettings, scratch: str,
                  progress: bool = True) -> dict:
    """The report entry of one model: settings-independent facts plus one `analyze_layer` dict per layer."""
    started = time.perf_counter()
    model = load_gptneox(path, dtype=_DTYPES[settings.dtype], device=settings.device)
    config = model.config
    largest = int(sample.tokens.max())
    if largest >= config.vocab_size:
        raise AnalysisError(f"token id {largest} >= the vocabulary size {config.vocab_size} of {path}: the data "
                            "was tokenized with another tokenizer")
    if sample.tokens.shape[1] > config.max_position_embeddings:
        raise AnalysisError(f"--seq-length {sample.tokens.shape[1]} exceeds {path}'s max_position_embeddings "
                            f"{config.max_position_embeddings}")
    layers = resolve_layers(settings.layers, config.num_hidden_layers)
    store_dir = tempfile.mkdtemp(prefix="l2e-analyze-", dir=scratch)
    try:
        stores = record_activations(model, sample.tokens, layers, store_dir, where=settings.activation,
                                    batch_size=settings.batch_size, progress=progress)
        del model
        features = sample.features.reshape(-1)
        results = []
        for lid in tqdm(layers, desc=f"analyse {label}", unit="layer", disable=not progress, dynamic_ncols=True):
            results.append({"layer": lid, **analyze_layer(
                stores[lid], features, sample.feature_names, eps=settings.eps, ratios=tuple(settings.ratios),
                reference_scores=tuple(settings.reference_scores), top_neurons=settings.top_neurons)})
            os.remove(stores.pop(lid).filename)  # free the disk as soon as a layer is done
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    return {"label": label, "path": str(path), "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "seconds": round(time.perf_counter() - started, 3), "layers": results}


def run_analysis(models: list[tuple[str, str]], sample: LabelledTokens, settings: AnalyzeSettings,
                 out_dir: str | Path, *, scratch_dir: str | None = None, progress: bool = True) -> dict:
    """Analyse each (label, path) model on `sample`; write `analysis.json` and the figures into `out_dir`."""
    from l2e_dist.analysis.plots import plot_analysis

    settings.validate()
    if sample.num_tokens < 2:
        raise AnalysisError(f"the sample has {sample.num_tokens} token(s); statistics need at least 2")
    labels = [label for label, _ in models]
    if not models or len(set(labels)) != len(labels):
        raise AnalysisError(f"give at least one model, with unique labels (got {labels})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = sample.features.reshape(-1)
    report = {
        "format": REPORT_FORMAT,
        "settings": asdict(settings),
        "data": {**sample.source, "tokens": sample.num_tokens, "rows": int(sample.tokens.shape[0]),
                 "seq_length": int(sample.tokens.shape[1]), "feature_names": sample.feature_names,
                 "feature_tokens": np.bincount(features[features >= 0],
                                               minlength=len(sample.feature_names)).tolist(),
                 "unknown_tokens": int(np.count_nonzero(features < 0))},
        "models": [analyze_model(label, path, sample, settings, scratch_dir or str(out), progress)
                   for label, path in models],
    }
    report["figures"] = [p.name for p in plot_analysis(report, out)]
    atomic_write_text(out / "analysis.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    return report
