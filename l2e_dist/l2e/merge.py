"""The step boundary: merge each layer's all-reduced sums into its statistics (calibrate the threshold on its
first scored step), fold in FKR, move the threshold, report the step's metric increments. A layer whose sums hold
a NaN/inf merges nothing, and too many such steps in a row stop the run (`check_diverged`).

The step's one host read brings every layer's finite flag and scalars (token count, bracket counts, regularizer
and score sums, FKR counts); everything scalar (threshold, counts, metrics) is then host arithmetic, and only the
per-neuron moments stay device tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from l2e_dist.errors import UserError
from l2e_dist.l2e import fkr
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.reduction import (
    COUNT,
    FKR_DEN,
    FKR_NUM,
    N_HI,
    N_LO,
    N_SEL,
    NUM_SCALARS,
    REG,
    SCORE,
    Slots,
    finite_regions,
)
from l2e_dist.l2e.statistics import LayerState, merge_step, refresh_derived
from l2e_dist.l2e.threshold import HIST_BINS, histogram_quantile, update_threshold

# Metric accumulators per layer (summed over the steps since the last metrics() call).
M_SEL, M_SEL_ELEMS, M_REG, M_REG_STEPS, M_SCORE, M_SCORE_ELEMS, M_FKR_NUM, M_FKR_DEN = range(8)
NUM_METRICS = 8


class NonFiniteActivations(UserError, RuntimeError):
    """Raised after `l2e.max_nonfinite_steps` consecutive steps with NaN/inf activations in one layer. The
    finite check follows the step's all-reduce, so every rank raises it: the CLI prints one line, exit 2."""

    agreed = True


def merge_layers(layers: dict[int, LayerState], slots: dict[int, Slots], buf: Tensor, cfg: L2EConfig, width: int,
                 shift_dtype: torch.dtype, num_features: int, step_labelled: bool) -> list[list[float]]:
    """The whole step boundary for every layer, given the all-reduced step buffer: merge the finite layers,
    count the others' non-finite step, refresh the derived quantities. Returns each layer's metric increments
    (NUM_METRICS numbers, zeros for a layer that merged nothing), in `slots`' order."""
    scalars = torch.stack([buf[s.scalars:s.scalars + NUM_SCALARS] for s in slots.values()])
    finite = finite_regions(buf, slots).to(torch.float64)
    host = torch.cat([finite[:, None], scalars], dim=1).tolist()  # the one host read per optimizer step
    rows = []
    for (ok, *sc), (lid, layer_slots) in zip(host, slots.items(), strict=True):
        st = layers[lid]
        if not ok:
            st.nonfinite_steps += 1
            st.consecutive_nonfinite += 1
            rows.append([0.0] * NUM_METRICS)
            continue
        st.consecutive_nonfinite = 0
        rows.append(merge_layer(st, layer_slots, buf, sc, cfg, width, shift_dtype, num_features, step_labelled))
        refresh_derived(st, cfg.eps)
    return rows


def merge_layer(st: LayerState, slots: Slots, buf: Tensor, sc: list[float], cfg: L2EConfig, width: int,
                shift_dtype: torch.dtype, num_features: int, step_labelled: bool) -> list[float]:
    """Merge one layer's global sums of the step (already all-reduced; `sc` its scalars, read to the host) into
    `st`: the moments, tau's calibration on the layer's first scored step or its update on a selecting step,
    FKR. Returns the layer's metric increments (indexed by the M_ constants). `shift_dtype`: the dtype the
    step's mu was used in (the sums are taken around that rounded mu). The caller refreshes the derived
    quantities (`refresh_derived`)."""
    b = sc[COUNT]
    shift = st.mean.to(shift_dtype).to(torch.float64)  # the mu the sums were taken around
    merge_step(st, b, buf[slots.s1], buf[slots.s2], shift, cfg.forget_steps)
    elements = b * width
    if slots.calibrating:
        st.tau = histogram_quantile(buf[slots.hist:slots.hist + HIST_BINS], 1.0 - cfg.inhibit_ratio)
        st.tau_ready = True
    elif slots.selecting and cfg.uses_threshold:
        st.tau, st.half_width = update_threshold(st.tau, st.half_width, (sc[N_LO], sc[N_SEL], sc[N_HI]), elements,
                                                 cfg.inhibit_ratio, cfg.threshold_lr)
    if num_features and slots.scoring:
        fkr.merge_features(st, buf, slots, num_features, step_labelled)
    row = [0.0] * NUM_METRICS
    if slots.selecting:
        row[M_SEL], row[M_SEL_ELEMS], row[M_REG_STEPS] = sc[N_SEL], elements, 1.0
        row[M_REG] = cfg.reg_lambda * sc[REG] if cfg.reduction == "sum" else cfg.reg_lambda * sc[REG] / b
    if slots.scoring:
        row[M_SCORE], row[M_SCORE_ELEMS] = sc[SCORE], elements
    row[M_FKR_NUM], row[M_FKR_DEN] = sc[FKR_NUM], sc[FKR_DEN]
    return row


def check_diverged(layers: dict[int, LayerState], max_nonfinite_steps: int, step: int) -> None:
    """Stop the run once a layer's activations were non-finite in `max_nonfinite_steps` consecutive steps."""
    for lid, st in layers.items():
        if st.consecutive_nonfinite >= max_nonfinite_steps:
            raise NonFiniteActivations(
                f"L2E layer {lid}: NaN/inf activations in {st.consecutive_nonfinite} consecutive optimizer steps "
                f"(the last one is step {step}): the model diverged; lower optimizer.lr or resume from an "
                f"earlier checkpoint (l2e.max_nonfinite_steps sets the limit)")


def metric_values(rows: list[list[float]], layers: dict[int, LayerState], cfg: L2EConfig) -> dict[str, float]:
    """The logged per-layer figures from the metric sums `rows` (one per layer, in `layers`' order): averages
    over the steps summed."""
    out: dict[str, float] = {}
    for row, (lid, st) in zip(rows, layers.items(), strict=True):
        prefix = f"l2e/layer{lid}/"
        if cfg.uses_threshold and st.tau_ready:
            out[prefix + "threshold"] = st.tau
        if row[M_SEL_ELEMS] > 0:
            out[prefix + "selected_frac"] = row[M_SEL] / row[M_SEL_ELEMS]
        if row[M_REG_STEPS] > 0 and cfg.method == "l2e":
            out[prefix + "reg"] = row[M_REG] / row[M_REG_STEPS]
        if row[M_SCORE_ELEMS] > 0:
            out[prefix + "mean_score"] = row[M_SCORE] / row[M_SCORE_ELEMS]
        if row[M_FKR_DEN] > 0:
            out[prefix + "fkr"] = row[M_FKR_NUM] / row[M_FKR_DEN]
        out[prefix + "nonfinite_steps"] = float(st.nonfinite_steps)
    return out
