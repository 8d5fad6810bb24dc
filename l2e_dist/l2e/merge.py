"""The step boundary: merge each layer's all-reduced sums into its statistics (calibrate the threshold on its
first scored step), fold in FKR, report the step's metric increments; then move the thresholds of all selecting
layers at once (`move_thresholds`: one set of small-tensor ops for every layer, not one per layer)."""

from __future__ import annotations

import torch
from torch import Tensor

from l2e_dist.l2e import fkr
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.reduction import COUNT, FKR_DEN, FKR_NUM, N_HI, N_LO, N_SEL, NUM_SCALARS, REG, SCORE, Slots
from l2e_dist.l2e.statistics import LayerState, merge_step
from l2e_dist.l2e.threshold import HIST_BINS, histogram_quantile, update_threshold

# Metric accumulators per layer (summed over the steps since the last metrics() call).
M_SEL, M_SEL_ELEMS, M_REG, M_REG_STEPS, M_SCORE, M_SCORE_ELEMS, M_FKR_NUM, M_FKR_DEN = range(8)
NUM_METRICS = 8


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
