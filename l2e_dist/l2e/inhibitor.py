"""The L2E / MEmeL inhibition engine: what happens to one layer's activations, and what happens at a step's end.

The engine knows nothing of DeepSpeed or megatron: it is handed one layer's activation tensor at a time
(`apply`) and torch.distributed process groups, and the trainer tells it where an optimizer step ends
(`end_step`). What one step is, and every design choice, is written down in docs/l2e-method.md ("One step of
the engine"); the pieces live in statistics.py (moments and their merge), merge.py (one layer's step
boundary), threshold.py (tau), selection.py (which pairs), regularizer.py (regularizer and reverse
deactivation), fkr.py (online FKR) and reduction.py (the fused buffer and all_reduce).

Call order per optimizer step: for each micro-batch `apply` (via the forward hooks) -> loss +
`regularization_loss()` -> backward -> `finish_micro_batch()`; after the optimizer step `end_step(applied)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2e_dist.l2e import cpu_scan, fkr, merge, reduction
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.merge import NUM_METRICS
from l2e_dist.l2e.reduction import COUNT, N_HI, N_LO, N_SEL, REG, SCORE, Slots
from l2e_dist.l2e.regularizer import (
    CompactReverseDeactivation,
    CompactSelectedLogSquare,
    DenseSelectedLogSquare,
    ReverseDeactivation,
    compact_selection,
    log_square_terms,
    loss_scale,
    selected_log_square,
)
from l2e_dist.l2e.selection import (
    Selection,
    at_least,
    bracket_bounds,
    count_true,
    flat_nonzero,
    kth_score_per_token,
    score_bracket,
    threshold_indices,
)
from l2e_dist.l2e.state_io import load_layer_states, save_layer_states
from l2e_dist.l2e.statistics import LayerState, fresh_state, refresh_derived
from l2e_dist.l2e.threshold import HIST_BINS, histogram_counts


class L2EInhibitor:
    """Online monosemanticity statistics and inhibition for the MLP activations of a few layers."""

    def __init__(self, cfg: L2EConfig, layer_ids: list[int], num_neurons: int, *, tp_rank: int = 0,
                 tp_size: int = 1, reduce_group=None, tp_group=None, dp_size: int = 1,
                 micro_batches_per_step: int = 1, device: str | torch.device = "cpu"):
        if num_neurons % tp_size != 0:
            raise ValueError(f"num_neurons={num_neurons} is not divisible by tp_size={tp_size}")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank} outside [0, tp_size={tp_size})")
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"duplicate layer ids {layer_ids}")
        if cfg.enabled and not cfg.uses_threshold and tp_size > 1 and tp_group is None:
            raise ValueError("top-k retrieval with tp_size > 1 needs tp_group (top-k spans the whole layer)")
        if cfg.enabled and cfg.fkr and cfg.num_features <= 0:
            raise ValueError("l2e.fkr needs num_features > 0 (the number of feature labels of the data)")
        self.cfg = cfg
        self.layer_ids = list(layer_ids)
        self.num_neurons = num_neurons
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_width = num_neurons // tp_size
        self._neurons = slice(tp_rank * self.local_width, (tp_rank + 1) * self.local_width)
        self.reduce_group = reduce_group
        self.tp_group = tp_group
        self.dp_size = dp_size
        self.micro_batches_per_step = micro_batches_per_step
        self.device = torch.device(device)
        self.training = True
        self.collective_count = 0  # collectives issued by this engine (one all_reduce per optimizer step for l2e)
        self.steps_ended = 0  # end_step() calls that merged (applied optimizer steps with recorded micro-batches)
        self._num_features = cfg.num_features if cfg.fkr else 0
        self._layers = {lid: fresh_state(num_neurons, self._num_features, self.device) for lid in self.layer_ids}
        for st in self._layers.values():
            refresh_derived(st, cfg.eps)
        self._metric_acc = [[0.0] * NUM_METRICS for _ in self.layer_ids]  # host sums since the last metrics()
        # CPU (compact) scratch for z - mu, reused across layers and calls: a fresh multi-MB temporary on every
        # call costs page faults there. Nothing that outlives apply() points into it.
        # The threshold compares' bool mask likewise (dtype torch.bool).
        self._scratch: dict[torch.dtype, Tensor] = {}
        if cfg.enabled and self._fused_scan() and compact_selection(self.device):
            cpu_scan.available()  # build (first run on a machine: ~1 min) or load it now, not inside a step
        self._reset_step()

    # ------------------------------------------------------------------ public API

    def train(self, mode: bool = True) -> L2EInhibitor:
        self.training = mode
        return self

    def eval(self) -> L2EInhibitor:
        return self.train(False)

    def set_features(self, feature_ids: Tensor | None) -> None:
        """Feature label per token for online FKR (same leading shape as the activations, -1 = unknown).
        Applies to the current micro-batch only; `finish_micro_batch` clears it."""
        self._features = None if feature_ids is None else feature_ids.to(self.device).reshape(-1).long()

    def apply(self, layer_id: int, z: Tensor) -> Tensor:
        """Add this rank's slice `z[..., num_neurons // tp_size]` to the step's sums and inhibit selected pairs
        (scored with the state as of before the step)."""
        if not self.training or not self.cfg.enabled:
            return z
        if layer_id not in self._layers:
            raise KeyError(f"layer {layer_id} is not inhibited (inhibited layers: {self.layer_ids})")
        if z.shape[-1] != self.local_width:
            raise ValueError(f"layer {layer_id}: activation width {z.shape[-1]} != num_neurons/tp_size = "
                             f"{self.local_width}")
        recompute = layer_id in self._recorded
        if not recompute and self.cfg.method == "l2e" and not torch.is_grad_enabled():
            raise RuntimeError("L2EInhibitor.apply ran with autograd disabled in training mode: the L2E regularizer "
                               "needs the graph; use non-reentrant activation checkpointing "
                               "(use_reentrant=False) and put the model/inhibitor in eval() for no-grad forwards")
        st, slots = self._layers[layer_id], self._step_slots()[layer_id]
        flat = z.reshape(-1, self.local_width)
        regularize = slots.selecting and self.cfg.method == "l2e"
        # selection as flat indices (CPU); MEmeL's indexed deactivation writes into a contiguous copy of z
        compact = slots.selecting and compact_selection(z.device) and (regularize or z.is_contiguous())
        with torch.no_grad():
            ev, reg_value, coef = self._evaluate(st, slots, flat, record=not recompute, compact=compact,
                                                 regularize=regularize)
        if not recompute:
            self._recorded.add(layer_id)
        if regularize:
            if compact:
                out, term = CompactSelectedLogSquare.apply(z, reg_value, ev.index, coef)
            else:
                out, term = DenseSelectedLogSquare.apply(z, reg_value, ev.mu, ev.bound, ev.inv_denom, ev.thr,
                                                         self.cfg.delta)
            if not recompute:
                self._reg_terms[layer_id] = term * loss_scale(self.cfg, flat.shape[0], self.dp_size,
                                                               self.micro_batches_per_step)
            return out
        elif slots.selecting and self.cfg.method == "memel":
            if compact:
                return CompactReverseDeactivation.apply(z, ev.index, ev.mu.to(z.dtype), self.cfg.rd_strength)
            return ReverseDeactivation.apply(z, ev.selected.reshape(z.shape), ev.mu.to(z.dtype),
                                             self.cfg.rd_strength)
        return z

    def selected_mask(self, layer_id: int, z: Tensor) -> Tensor | None:
        """The (token, neuron) pairs apply() selects for `z` with the current state (bool, z's shape).

        None while the layer selects nothing (before late_start, or on the threshold-calibration step).
        Records nothing; with top-k retrieval and tp_size > 1 it all_gathers over tp_group like apply().
        """
        st = self._layers[layer_id]
        if not self._phase(st)[2]:
            return None
        flat = z.reshape(-1, self.local_width)
        with torch.no_grad():
            ev = Selection(mu=st.mean[self._neurons].to(self._compute_dtype(flat)))
            ev.inv_denom = st.inv_denom[self._neurons].to(ev.mu.dtype)
            d2 = (flat - ev.mu).square_()
            self._select_dense(st, ev, d2)
        return ev.selected.reshape(z.shape)

    def scores(self, layer_id: int, z: Tensor) -> Tensor | None:
        """Monosemanticity scores phi of this rank's slice `z` with the current statistics (z's shape, fp32 or
        fp64); None before any statistics exist. Records nothing: for held-out measurements and analysis."""
        st = self._layers[layer_id]
        if st.n_merged == 0:
            return None
        flat = z.reshape(-1, self.local_width)
        cdt = self._compute_dtype(flat)
        with torch.no_grad():
            phi = (flat - st.mean[self._neurons].to(cdt)).square_().mul_(st.inv_denom[self._neurons].to(cdt))
        return phi.reshape(z.shape)

    def regularization_loss(self) -> Tensor:
        """Differentiable scalar to add to this micro-batch's loss (zero when nothing is selected)."""
        if not self._reg_terms:
            return torch.zeros((), device=self.device)
        return sum(self._reg_terms.values())

    def finish_micro_batch(self) -> None:
        """After backward: checks that every layer ran, and clears the micro-batch's terms (sums stay)."""
        if self.training and self.cfg.enabled and self._recorded:
            missing = [lid for lid in self.layer_ids if lid not in self._recorded]
            if missing:
                raise RuntimeError(f"finish_micro_batch: layers {missing} were not applied in this micro-batch "
                                   "(every inhibited layer must run once per micro-batch on every rank)")
            self._micro_batches += 1
        self._recorded = set()
        self._reg_terms = {}
        self._features = None

    def end_step(self, applied: bool = True, step: int | None = None) -> None:
        """At the optimizer-step boundary (after the optimizer step): ONE fused all_reduce of every layer's sums
        over the step's micro-batches, then the merge and the threshold update. `applied=False` (an fp16
        overflow-skipped step) discards the step's sums: the L2E state stays as the optimizer's does.

        Layers whose sums hold a NaN/inf merge nothing; after `max_nonfinite_steps` consecutive such steps this
        raises NonFiniteActivations naming the layer and the step (`step`: the trainer's step number, for it)."""
        if self._recorded:
            raise RuntimeError("end_step: call finish_micro_batch() after each micro-batch's backward first")
        # not applied: the same decision on every rank (DeepSpeed agrees on overflow), so no collective either
        if self._buf is None or self._micro_batches == 0 or not self.cfg.enabled or not applied:
            self._reset_step()
            return
        if reduction.all_reduce_step(self._buf, self.reduce_group):
            self.collective_count += 1
        rows = merge.merge_layers(self._layers, self._slots, self._buf, self.cfg, self.num_neurons, self._shift_dtype,
                                  self._num_features, self._step_labelled)
        self._metric_acc = [[a + b for a, b in zip(acc, row)] for acc, row in zip(self._metric_acc, rows)]
        self.steps_ended += 1
        self._reset_step()
        merge.check_diverged(self._layers, self.cfg.max_nonfinite_steps,
                             step if step is not None else self.steps_ended)

    def metrics(self) -> dict[str, float]:
        """Per-layer averages over the optimizer steps ended since the previous call (then reset)."""
        out = merge.metric_values(self._metric_acc, self._layers, self.cfg)
        self._metric_acc = [[0.0] * NUM_METRICS for _ in self.layer_ids]
        return out

    def state_dict(self) -> dict:
        """Full-width statistics and thresholds (identical on every rank; independent of the TP/DP layout)."""
        return save_layer_states(self._layers, self.num_neurons)

    def load_state_dict(self, sd: dict, writer_micro_batches_per_step: int | None = None) -> None:
        """Restore a state_dict(). A legacy v1 state (per micro-batch) loads only when the run that wrote it had
        one micro-batch per step (`writer_micro_batches_per_step` == 1), where it means the same."""
        self._layers = load_layer_states(sd, self.num_neurons, self.layer_ids, self._num_features, self.device,
                                         accept_v1=writer_micro_batches_per_step == 1)
        for st in self._layers.values():
            refresh_derived(st, self.cfg.eps)
        self._reset_step()

    # ------------------------------------------------------------------ internals

    def _reset_step(self) -> None:
        self._recorded: set[int] = set()
        self._slots: dict[int, Slots] | None = None
        self._buf: Tensor | None = None
        self._reg_terms: dict[int, Tensor] = {}
        self._features: Tensor | None = None
        self._micro_batches = 0
        self._step_labelled = False
        self._shift_dtype = torch.float64
        self._step_constants: dict[tuple[int, torch.dtype | str], tuple] = {}

    def _step_slots(self) -> dict[int, Slots]:
        """The step buffer's layout, made on the step's first apply() (host counters only: same on every rank)."""
        if self._slots is None:
            phases = {lid: self._phase(self._layers[lid]) for lid in self.layer_ids}
            self._slots, size = reduction.layout(phases, self.num_neurons, self._num_features)
            self._buf = torch.zeros(size, dtype=torch.float64, device=self.device)
        return self._slots

    def _phase(self, st: LayerState) -> tuple[bool, bool, bool]:
        """(scoring, calibrating, selecting) for the current step; host counters only, same on every rank."""
        scoring = st.n_merged >= self.cfg.start_after
        calibrating = scoring and self.cfg.uses_threshold and not st.tau_ready
        return scoring, calibrating, scoring and not calibrating

    def _constants(self, st: LayerState, dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """This rank's slice of (mu, inv_denom, the bracket bounds) in `dtype`: fixed for the whole step (the
        state changes only at end_step), so converted once per step and layer, not on every apply()."""
        key = (id(st), dtype)
        if key not in self._step_constants:
            neurons = self._neurons
            self._step_constants[key] = (st.mean[neurons].to(dtype), st.inv_denom[neurons].to(dtype),
                                         bracket_bounds(st.bound[neurons], st.half_width, dtype))
        return self._step_constants[key]

    def _bracket(self, st: LayerState) -> tuple[float, float, float]:
        """The threshold bracket (tau/r, tau, tau*r) on the host, once per step and layer (compact path: CPU)."""
        key = (id(st), "bracket")
        if key not in self._step_constants:
            self._step_constants[key] = score_bracket(st.tau, st.half_width)
        return self._step_constants[key]

    @staticmethod
    def _compute_dtype(flat: Tensor) -> torch.dtype:
        return torch.float64 if flat.dtype == torch.float64 else torch.float32

    def _deviation(self, flat: Tensor, mu: Tensor, scratch: bool) -> Tensor:
        """z - mu in the compute dtype (bf16/fp16 activations are promoted here): THE fp32 temporary."""
        if not scratch:
            return torch.sub(flat, mu)
        return torch.sub(flat, mu, out=self._scratch_view(mu.dtype, flat))

    def _scratch_view(self, dtype: torch.dtype, like: Tensor) -> Tensor:
        """A reused buffer of `dtype` shaped like `like` (grown when too small)."""
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            buf = self._scratch[dtype] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buf[:like.numel()].view(like.shape)

    def _evaluate(self, st: LayerState, slots: Slots, flat: Tensor, *, record: bool, compact: bool,
                  regularize: bool) -> tuple[Selection, Tensor | None, Tensor | None]:
        """Sums, selection and regularizer value for one apply() (no host sync). Works through ONE
        activation-sized temporary d = z - mu, squared in place once its sum is taken; a recompute (`record`
        False) adds nothing to the sums but returns the same selection."""
        cfg, buf, neurons = self.cfg, self._buf, self._neurons
        consts = self._constants(st, self._compute_dtype(flat))
        ev = Selection(mu=consts[0])
        self._shift_dtype = ev.mu.dtype
        need_phi = slots.calibrating or (record and slots.scoring and self._features is not None
                                         and self._num_features > 0)
        if compact and not need_phi and self._fused_scan() and cpu_scan.usable(flat, ev.mu):
            return self._evaluate_fused(st, slots, flat, ev, consts[1], record, regularize)
        d = self._deviation(flat, ev.mu, scratch=compact)
        if record:
            buf[slots.s1][neurons] += d.sum(0)
            if self.tp_rank == 0:
                buf[slots.scalar(COUNT)] += flat.shape[0]
        d2 = d.square_()  # from here on d holds (z - mu)^2
        d_sum_sq = None
        if record:
            d_sum_sq = d2.sum(0)
            buf[slots.s2][neurons] += d_sum_sq
        if slots.scoring:
            ev.inv_denom = consts[1]
            if record:
                buf[slots.scalar(SCORE)] += (d_sum_sq * ev.inv_denom).sum()
        reg_value = coef = None
        if slots.selecting:
            if compact:
                neuron = self._select_compact(st, slots, ev, d2, record)
                if regularize:
                    reg_value, coef = selected_log_square(flat, ev.mu, ev.index, cfg.delta, neuron)
            else:
                self._select_dense(st, ev, d2, slots if record else None)
        if regularize and not compact:
            # SUM_selected log(d2 + delta): in place on d2 unless the scores are still needed below.
            shifted = d2 + cfg.delta if need_phi else d2.add_(cfg.delta)
            reg_value = shifted.log_().masked_fill_(~ev.selected, 0.0).sum()
        if record and regularize:
            buf[slots.scalar(REG)] += reg_value
        if need_phi:
            phi = ev.phi if ev.phi is not None else d2.mul_(ev.inv_denom)
            if record and self._features is not None and self._num_features:
                if ev.selected is None and ev.index is not None:  # compact selection: FKR needs the mask
                    ev.selected = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
                    ev.selected.view(-1)[ev.index] = True
                fkr.record_features(buf, slots, st, self._features, phi, ev.selected, self._num_features, neurons,
                                    self.tp_rank == 0)
                self._step_labelled = True
            if record and slots.calibrating:
                buf[slots.hist:slots.hist + HIST_BINS] += histogram_counts(phi)
        return ev, reg_value, coef

    def _fused_scan(self) -> bool:
        """Whether the CPU kernel does this layout's selecting scan: threshold retrieval, or top-1 at TP = 1
        (top-1 over TP slices needs the other slices' maxima first)."""
        return self.cfg.uses_threshold or (min(self.cfg.topk, self.num_neurons) == 1 and self.tp_size == 1)

    def _evaluate_fused(self, st: LayerState, slots: Slots, flat: Tensor, ev: Selection, inv_denom: Tensor,
                        record: bool, regularize: bool) -> tuple[Selection, Tensor | None, Tensor | None]:
        """_evaluate's selecting compact step in one pass of the CPU kernel (cpu_scan.py), no temporary."""
        buf, neurons = self._buf, self._neurons
        ev.inv_denom = inv_denom
        if self.cfg.uses_threshold:
            ev.index, d, sum1, sum2, n_lo, n_hi = cpu_scan.threshold_scan(flat, ev.mu, inv_denom, *self._bracket(st))
        else:
            ev.index, d, sum1, sum2 = cpu_scan.top1_scan(flat, ev.mu, inv_denom)
        reg_value, coef = log_square_terms(d, self.cfg.delta) if regularize else (None, None)
        if record:
            buf[slots.s1][neurons] += sum1
            buf[slots.s2][neurons] += sum2
            if self.tp_rank == 0:
                buf[slots.scalar(COUNT)] += flat.shape[0]
            buf[slots.scalar(SCORE)] += (sum2 * inv_denom).sum()
            if self.cfg.uses_threshold:
                self._add_bracket_counts(slots, n_lo, ev.index.numel(), n_hi)
            else:
                buf[slots.scalar(N_SEL)] += ev.index.numel()
            if regularize:
                buf[slots.scalar(REG)] += reg_value
        return ev, reg_value, coef

    def _add_bracket_counts(self, slots: Slots, n_lo, n_sel, n_hi) -> None:
        """Add one apply()'s counts of scores >= tau/r, tau, tau*r to the step's sums (threshold.py's input)."""
        buf = self._buf
        buf[slots.scalar(N_LO)] += n_lo
        buf[slots.scalar(N_SEL)] += n_sel
        buf[slots.scalar(N_HI)] += n_hi

    def _select_dense(self, st: LayerState, ev: Selection, d2: Tensor, slots: Slots | None = None) -> None:
        """Selection as a mask (threshold or per-token top-k); with `slots`, adds the counts to the sums."""
        buf = self._buf
        if self.cfg.uses_threshold:
            lo, ev.bound, hi = self._constants(st, d2.dtype)[2]
            ev.selected = at_least(d2, ev.bound)
            if slots is not None:
                self._add_bracket_counts(slots, count_true(at_least(d2, lo)), count_true(ev.selected),
                                         count_true(at_least(d2, hi)))
            return
        # top-k needs the scores themselves (in place unless the dense regularizer still needs d2)
        ev.phi = d2 * ev.inv_denom if self.cfg.method == "l2e" else d2.mul_(ev.inv_denom)
        ev.thr = kth_score_per_token(ev.phi, min(self.cfg.topk, self.num_neurons), self.tp_size, self.tp_group)
        self.collective_count += self.tp_size > 1
        ev.selected = at_least(ev.phi, ev.thr)
        if slots is not None:
            buf[slots.scalar(N_SEL)] += count_true(ev.selected)

    def _select_compact(self, st: LayerState, slots: Slots, ev: Selection, d2: Tensor,
                        record: bool) -> Tensor | None:
        """Selection as flat indices (CPU) into ev.index; returns their neurons where already known."""
        if not self.cfg.uses_threshold:
            self._select_dense(st, ev, d2, slots if record else None)
            ev.index = flat_nonzero(ev.selected)
            return None
        # compares the scores with tau: d2 becomes phi in place (and serves FKR / calibration below)
        ev.phi = d2.mul_(ev.inv_denom)
        n_lo, ev.index, neuron, n_hi = threshold_indices(ev.phi, *self._bracket(st),
                                                         self._scratch_view(torch.bool, d2).numpy())
        if record:
            self._add_bracket_counts(slots, n_lo, ev.index.numel(), n_hi)
        return neuron
