"""The L2E state in checkpoints: full-width per-layer tensors and counters, independent of the TP/DP layout.

Format "l2e-inhibitor-v2" counts optimizer steps (`n_merged`, forgetting, late start). The earlier
"l2e-inhibitor-v1" counted global micro-batches; it is the same thing when the writing run had one micro-batch
per step (gradient accumulation 1), which the v1 state itself does not record, so a v1 state loads only when
the caller says so (`L2EStateError` otherwise, with what to do).
"""

from __future__ import annotations

import math

import torch

from l2e_dist.l2e.statistics import LayerState
from l2e_dist.l2e.threshold import INITIAL_HALF_WIDTH

FORMAT = "l2e-inhibitor-v2"
LEGACY_FORMAT = "l2e-inhibitor-v1"
_TENSORS = ("mean", "var", "feat_score", "feat_count")
_NUMBERS = ("num_obs", "tau", "half_width")  # host floats in LayerState, 0-d fp64 tensors in the checkpoint
_V1_DEFAULTS = {"half_width": INITIAL_HALF_WIDTH}  # what a v1 state lacks
_COUNTERS = ("n_merged", "nonfinite_steps", "consecutive_nonfinite")
_FLAGS = ("tau_ready", "fkr_ready")


class L2EStateError(ValueError):
    """An L2E state that cannot continue this run; the message says what to do."""


def save_layer_states(layers: dict[int, LayerState], num_neurons: int) -> dict:
    out = {}
    for lid, state in layers.items():
        entry = {key: getattr(state, key).cpu().clone() for key in _TENSORS}
        entry.update({key: torch.tensor(float(getattr(state, key)), dtype=torch.float64) for key in _NUMBERS})
        entry.update({key: int(getattr(state, key)) for key in _COUNTERS})
        entry.update({key: bool(getattr(state, key)) for key in _FLAGS})
        out[lid] = entry
    return {"format": FORMAT, "step_unit": "optimizer_step", "num_neurons": num_neurons, "layers": out}


def load_layer_states(sd: dict, num_neurons: int, layer_ids: list[int], num_features: int, device: torch.device,
                      *, accept_v1: bool = False) -> dict[int, LayerState]:
    fmt = sd.get("format") if isinstance(sd, dict) else None
    if fmt == LEGACY_FORMAT and not accept_v1:
        raise L2EStateError(
            "the checkpoint's L2E state is format l2e-inhibitor-v1, counted per micro-batch by a run with gradient "
            "accumulation (or of unknown layout); this version counts optimizer steps and cannot continue those "
            "dynamics: resume with the l2e-dist version that wrote it, or start afresh in a new train.output_dir "
            "with train.init_from=<checkpoint> (weights only)")
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise L2EStateError(f"not an L2E inhibitor state (format={fmt!r})")
    if sd["num_neurons"] != num_neurons:
        raise L2EStateError(f"L2E state has {sd['num_neurons']} neurons per layer, this model has {num_neurons}")
    if sorted(sd["layers"]) != sorted(layer_ids):
        raise L2EStateError(f"L2E state covers layers {sorted(sd['layers'])}, the config selects "
                            f"{sorted(layer_ids)}: resume with the same l2e.layers")
    layers = {}
    for lid, saved in sd["layers"].items():
        if saved["feat_count"].numel() != num_features:
            raise L2EStateError(f"L2E state has {saved['feat_count'].numel()} FKR features, the config has "
                                f"{num_features}: resume with the same l2e.fkr/num_features")
        tensors = {key: saved[key].to(device=device, dtype=torch.float64).clone() for key in _TENSORS}
        numbers = {key: float(saved[key] if key in saved else _V1_DEFAULTS[key]) for key in _NUMBERS}
        finite = all(bool(t.isfinite().all()) for t in tensors.values()) and all(map(math.isfinite, numbers.values()))
        if not finite:
            raise L2EStateError(f"L2E state of layer {lid} holds NaN/inf: the checkpoint is corrupt; resume from "
                                "an earlier one")
        counters = {key: int(saved.get(key, 0)) for key in _COUNTERS}
        flags = {key: bool(saved[key]) for key in _FLAGS}
        layers[lid] = LayerState(**tensors, **numbers, **counters, **flags)
    return {lid: layers[lid] for lid in layer_ids}
