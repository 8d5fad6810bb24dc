"""The step boundary: merge each layer's all-reduced sums into its statistics (calibrate the threshold on its
first scored step), fold in FKR, report the step's metric increments; then move the thresholds of all selecting
layers at once (`move_thresholds`: one set of small-tensor ops for every layer, not one per layer). A layer
whose sums hold a NaN/inf merges nothing, and too many such steps in a row stop the run (`check_diverged`)."""

from __future__ import annotations

import torch
from torch import Tensor

from l2e_dist.errors import UserError
from l2e_dist.l2e import fkr, reduction
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.reduction import COUNT, FKR_DEN, FKR_NUM, N_HI, N_LO, N_SEL, NUM_SCALARS, REG, SCORE, Slots
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
                 shift_dtype: torch.dtype, num_features: int, step_labelled: bool) -> Tensor:
    """The whole step boundary for every layer, given the all-reduced step buffer: merge the finite layers,
    count the others' non-finite step, move the thresholds, refresh the derived quantities. Returns the
    metric increments [layers, NUM_METRICS] (zeros for a layer that merged nothing)."""
    finite = reduction.finite_regions(buf, slots).tolist()  # the one host read per optimizer step
    rows, merged = [], []
    for ok, lid in zip(finite, slots, strict=True):
        st = layers[lid]
        if ok:
            st.consecutive_nonfinite = 0
            rows.append(merge_layer(st, slots[lid], buf, cfg, width, shift_dtype, num_features, step_labelled))
            merged.append(lid)
        else:
            st.nonfinite_steps += 1
            st.consecutive_nonfinite += 1
            rows.append(torch.zeros(NUM_METRICS, dtype=torch.float64, device=buf.device))
    move_thresholds([(layers[lid], slots[lid]) for lid in merged], buf, cfg, width)
    for lid in merged:
        refresh_derived(layers[lid], cfg.eps)
    return torch.stack(rows)


def check_diverged(layers: dict[int, LayerState], max_nonfinite_steps: int, step: int) -> None:
    """Stop the run once a layer's activations were non-finite in `max_nonfinite_steps` consecutive steps."""
    for lid, st in layers.items():
        if st.consecutive_nonfinite >= max_nonfinite_steps:
            raise NonFiniteActivations(
                f"L2E layer {lid}: NaN/inf activations in {st.consecutive_nonfinite} consecutive optimizer steps "
                f"(the last one is step {step}): the model diverged; lower optimizer.lr or resume from an "
                f"earlier checkpoint (l2e.max_nonfinite_steps sets the limit)")


def metric_values(acc: Tensor, layers: dict[int, LayerState], cfg: L2EConfig) -> dict[str, float]:
    """The logged per-layer figures from the metric sums `acc` [layers, NUM_METRICS], rows in `layers`' order
    (averages over steps)."""
    rows = acc.tolist()
    taus = torch.stack([st.tau for st in layers.values()]).tolist()
    out: dict[str, float] = {}
    for row, (lid, st), tau in zip(rows, layers.items(), taus, strict=True):
        prefix = f"l2e/layer{lid}/"
        if cfg.uses_threshold and st.tau_ready:
            out[prefix + "threshold"] = tau
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


def merge_layer(st: LayerState, slots: Slots, buf: Tensor, cfg: L2EConfig, width: int, shift_dtype: torch.dtype,
                num_features: int, step_labelled: bool) -> Tensor:
    """Merge one layer's global sums of the step (already all-reduced) into `st` (calibrating tau on the layer's
    first scored step); returns the layer's metric increments (a row indexed by the constants above). `shift_dtype`: the dtype the step's mu was used
    in (the sums are taken around that rounded mu). The caller then moves the thresholds (`move_thresholds`)
    and refreshes the derived quantities (`refresh_derived`)."""
    sc = buf[slots.scalars:slots.scalars + NUM_SCALARS]
    b = sc[COUNT]
    shift = st.mean.to(shift_dtype).to(torch.float64)  # the mu the sums were taken around
    merge_step(st, b, buf[slots.s1], buf[slots.s2], shift, cfg.forget_steps)
    elements = b * width
    if slots.calibrating:
        st.tau = histogram_quantile(buf[slots.hist:slots.hist + HIST_BINS], 1.0 - cfg.inhibit_ratio)
        st.tau_ready = True
    if num_features and slots.scoring:
        fkr.merge_features(st, buf, slots, num_features, step_labelled)
    zero = torch.zeros((), dtype=torch.float64, device=buf.device)
    reg = cfg.reg_lambda * sc[REG] if cfg.reduction == "sum" else cfg.reg_lambda * sc[REG] / b
    sel, scoring = slots.selecting, slots.scoring
    return torch.stack([
        sc[N_SEL] if sel else zero, elements if sel else zero, reg if sel else zero,
        torch.ones_like(zero) if sel else zero, sc[SCORE] if scoring else zero, elements if scoring else zero,
        sc[FKR_NUM], sc[FKR_DEN],
    ])


def move_thresholds(merged: list[tuple[LayerState, Slots]], buf: Tensor, cfg: L2EConfig, width: int) -> None:
    """The threshold update of the merged layers that selected this step, from their bracket counts, in one
    update vectorised over the layers."""
    moving = [(st, slots) for st, slots in merged if slots.selecting and cfg.uses_threshold]
    if not moving:
        return
    scalars = torch.stack([buf[slots.scalars:slots.scalars + NUM_SCALARS] for _, slots in moving])
    taus = torch.stack([st.tau for st, _ in moving])
    widths = torch.stack([st.half_width for st, _ in moving])
    new_taus, new_widths = update_threshold(taus, widths, scalars[:, N_LO:N_HI + 1], scalars[:, COUNT] * width,
                                            cfg.inhibit_ratio, cfg.threshold_lr)
    for (st, _), tau, half_width in zip(moving, new_taus.unbind(), new_widths.unbind(), strict=True):
        st.tau, st.half_width = tau, half_width
