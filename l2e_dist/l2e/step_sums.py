"""One optimizer step's sums of every inhibited layer: their fp64 buffer, its one all_reduce, and their merge into
each layer's state at the step's end.

Buffer layout per layer: [sum(z - mu) (W) | sum((z - mu)^2) (W) | scalars | histogram (calibration step only) |
per-feature score sums (F x W) and token counts (F) (online FKR only)]. It is full layer width: each TP rank
adds its own neuron slice (zeros elsewhere) and only TP rank 0 adds the token count, so ONE all_reduce over
the TP x DP group gives every rank the global sums. The layout depends on host counters only, so it is the
same on every rank.

At the step's end (`merge_layers`) one host read brings every layer's finite flag and scalars (token count,
threshold counts, regularizer and score sums, FKR counts); everything scalar (threshold, counts, metrics) is then
host arithmetic, and only the per-neuron moments stay device tensors. A layer whose sums hold a NaN/inf merges
nothing, and too many such steps in a row stop the run (`check_diverged`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from l2e_dist.errors import UserError
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.reference import Phase
from l2e_dist.l2e.statistics import LayerState, merge_step, refresh_derived
from l2e_dist.l2e.threshold import HIST_BINS, histogram_quantile, update_threshold

# Scalars per layer: token count; #phi >= tau/r, >= tau, >= tau*r (the counts threshold.py moves tau with);
# the regularizer sum SUM log(d^2 + delta); the score sum; FKR numerator and denominator.
TOKENS, N_ABOVE_LOW, N_SELECTED, N_ABOVE_HIGH, REG_SUM, SCORE_SUM, FKR_NUM, FKR_DEN = range(8)
NUM_SCALARS = 8


@dataclass
class Slots:
    """Offsets of one layer's quantities in the step buffer, and what the layer does this step."""

    base: int
    width: int
    phase: Phase
    hist: int = -1  # tau's calibration histogram (calibrating step only)
    feat: int = -1  # online FKR: per-feature score sums and token counts

    @property
    def sum_dev(self) -> slice:
        """sum(z - mu) per neuron."""
        return slice(self.base, self.base + self.width)

    @property
    def sum_sq_dev(self) -> slice:
        """sum((z - mu)^2) per neuron."""
        return slice(self.base + self.width, self.base + 2 * self.width)

    @property
    def scalars(self) -> int:
        return self.base + 2 * self.width

    def scalar(self, which: int) -> int:
        return self.scalars + which


def layout(phases: dict[int, Phase], width: int, num_features: int) -> tuple[dict[int, Slots], int]:
    """Slots per layer from its phase; returns them and the buffer length."""
    offset, slots = 0, {}
    for lid, phase in phases.items():
        s = Slots(base=offset, width=width, phase=phase)
        offset += 2 * width + NUM_SCALARS
        if phase is Phase.CALIBRATING:
            s.hist, offset = offset, offset + HIST_BINS
        if num_features:
            s.feat, offset = offset, offset + num_features * (width + 1)
        slots[lid] = s
    return slots, offset


def all_reduce_step(buf: Tensor, group) -> bool:
    """Sum the step buffer over `group` (None: a single process). Returns whether a collective was issued."""
    if group is None:
        return False
    dist.all_reduce(buf, group=group)
    return True


def finite_regions(buf: Tensor, slots: dict[int, Slots]) -> Tensor:
    """Per layer (in `slots` order), whether its moments and scalars are all finite: bool [layers] on device."""
    return torch.stack([buf[s.base:s.scalars + NUM_SCALARS].isfinite().all() for s in slots.values()])


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
    for (ok, *totals), (lid, layer_slots) in zip(host, slots.items(), strict=True):
        state = layers[lid]
        if not ok:
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            rows.append([0.0] * NUM_METRICS)
            continue
        state.consecutive_nonfinite = 0
        rows.append(merge_layer(state, layer_slots, buf, totals, cfg, width, shift_dtype, num_features, step_labelled))
        refresh_derived(state, cfg.eps)
    return rows


def merge_layer(state: LayerState, slots: Slots, buf: Tensor, totals: list[float], cfg: L2EConfig, width: int,
                shift_dtype: torch.dtype, num_features: int, step_labelled: bool) -> list[float]:
    """Merge one layer's global sums of the step (already all-reduced; `totals` its scalars, read to the host) into
    `state`: the moments, tau's calibration on the layer's first scored step or its update on a selecting step,
    FKR. Returns the layer's metric increments (indexed by the M_ constants). `shift_dtype`: the dtype the
    step's mu was used in (the sums are taken around that rounded mu). The caller refreshes the derived
    quantities (`refresh_derived`)."""
    b = totals[TOKENS]
    shift = state.mean.to(shift_dtype).to(torch.float64)  # the mu the sums were taken around
    merge_step(state, b, buf[slots.sum_dev], buf[slots.sum_sq_dev], shift, cfg.forget_steps)
    elements = b * width
    if slots.phase is Phase.CALIBRATING:
        state.tau = histogram_quantile(buf[slots.hist:slots.hist + HIST_BINS], 1.0 - cfg.inhibit_ratio)
        state.tau_ready = True
    elif slots.phase is Phase.SELECTING and cfg.uses_threshold:
        counts = (totals[N_ABOVE_LOW], totals[N_SELECTED], totals[N_ABOVE_HIGH])
        state.tau, state.half_width = update_threshold(state.tau, state.half_width, counts, elements,
                                                       cfg.inhibit_ratio, cfg.threshold_lr)
    if num_features and slots.phase.scoring:
        merge_features(state, buf, slots, num_features, step_labelled)
    row = [0.0] * NUM_METRICS
    if slots.phase is Phase.SELECTING:
        row[M_SEL], row[M_SEL_ELEMS], row[M_REG_STEPS] = totals[N_SELECTED], elements, 1.0
        row[M_REG] = cfg.reg_lambda * totals[REG_SUM] / (1.0 if cfg.reduction == "sum" else b)
    if slots.phase.scoring:
        row[M_SCORE], row[M_SCORE_ELEMS] = totals[SCORE_SUM], elements
    row[M_FKR_NUM], row[M_FKR_DEN] = totals[FKR_NUM], totals[FKR_DEN]
    return row


def check_diverged(layers: dict[int, LayerState], max_nonfinite_steps: int, step: int) -> None:
    """Stop the run once a layer's activations were non-finite in `max_nonfinite_steps` consecutive steps."""
    for lid, state in layers.items():
        if state.consecutive_nonfinite >= max_nonfinite_steps:
            raise NonFiniteActivations(
                f"L2E layer {lid}: NaN/inf activations in {state.consecutive_nonfinite} consecutive optimizer steps "
                f"(the last one is step {step}): the model diverged; lower optimizer.lr or resume from an "
                f"earlier checkpoint (l2e.max_nonfinite_steps sets the limit)")


def metric_values(rows: list[list[float]], layers: dict[int, LayerState], cfg: L2EConfig) -> dict[str, float]:
    """The logged per-layer figures from the metric sums `rows` (one per layer, in `layers`' order): averages
    over the steps summed."""
    out: dict[str, float] = {}
    for row, (lid, state) in zip(rows, layers.items(), strict=True):
        prefix = f"l2e/layer{lid}/"
        if cfg.uses_threshold and state.tau_ready:
            out[prefix + "threshold"] = state.tau
        if row[M_SEL_ELEMS] > 0:
            out[prefix + "selected_frac"] = row[M_SEL] / row[M_SEL_ELEMS]
        if row[M_REG_STEPS] > 0 and cfg.method == "l2e":
            out[prefix + "reg"] = row[M_REG] / row[M_REG_STEPS]
        if row[M_SCORE_ELEMS] > 0:
            out[prefix + "mean_score"] = row[M_SCORE] / row[M_SCORE_ELEMS]
        if row[M_FKR_DEN] > 0:
            out[prefix + "fkr"] = row[M_FKR_NUM] / row[M_FKR_DEN]
        out[prefix + "nonfinite_steps"] = float(state.nonfinite_steps)
    return out


# ------------------------------------------------------------------ online FKR (method doc, section 5)
# Per neuron j, l*_j = argmax_l of the mean score over tokens with feature l (summed in the step buffer and merged
# at the step's end); per step FKR = #(selected, feature known, feature != l*_j) / #(selected, feature known),
# with l* as of before the step. Tokens labelled -1 (unknown) count in neither.


def record_features(buf: Tensor, slots: Slots, state: LayerState, feats: Tensor, phi: Tensor, selected: Tensor | None,
                    num_features: int, neurons: slice, count_tokens: bool) -> None:
    """Add this micro-batch's per-feature score sums (this rank's neuron slice) and FKR counts to `buf`."""
    if feats.numel() != phi.shape[0]:
        raise ValueError(f"set_features got {feats.numel()} labels for {phi.shape[0]} tokens")
    nf, width = num_features, slots.width
    one_hot = feats[:, None] == torch.arange(nf, device=feats.device)[None, :]  # unknown (-1): all False
    region = buf[slots.feat:slots.feat + nf * width].view(nf, width)
    region[:, neurons] += one_hot.to(phi.dtype).T @ phi
    if count_tokens:
        buf[slots.feat + nf * width:slots.feat + nf * (width + 1)] += one_hot.sum(0)
    if selected is not None and state.fkr_ready:
        known_sel = selected & ((feats >= 0) & (feats < nf))[:, None]
        wrong = known_sel & (feats[:, None] != state.best_feature[None, neurons])
        buf[slots.scalar(FKR_NUM)] += wrong.sum()
        buf[slots.scalar(FKR_DEN)] += known_sel.sum()


def merge_features(state: LayerState, buf: Tensor, slots: Slots, num_features: int, labelled: bool) -> None:
    """Add the step's per-feature score sums and token counts to the layer's FKR accumulators."""
    nf, width = num_features, slots.width
    state.feat_score = state.feat_score + buf[slots.feat:slots.feat + nf * width].view(nf, width)
    state.feat_count = state.feat_count + buf[slots.feat + nf * width:slots.feat + nf * (width + 1)]
    state.fkr_ready = state.fkr_ready or labelled
