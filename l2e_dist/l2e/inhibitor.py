"""The L2E / MEmeL inhibition engine: online neuron statistics, retrieval, regularizer and reverse deactivation.

The engine knows nothing of DeepSpeed or megatron: it is handed one layer's activation tensor at a time
(`apply`) and torch.distributed process groups. Formulas: /work/shared/docs/l2e-method.md. Design decisions:

1. One statistics update per micro-batch. Scoring and selection inside a micro-batch use the statistics and
   threshold as they were BEFORE it. `apply()` only writes local per-neuron sums into a device buffer (no host
   sync): count, sum(z - c), sum((z - c)^2) with shift c = the running mean (numerically stable and exact under
   summation across ranks), the count of phi >= tau, the regularizer value, score sums and, with FKR, per-feature
   score sums. `finish_micro_batch()` (call it after backward) packs every layer into ONE fp64 buffer, does ONE
   all_reduce over `reduce_group`, then applies the exact MEmeL merge with forgetting and the threshold update.
   Every rank therefore holds identical statistics and thresholds, equal to one process seeing the global batch.
2. Tensor parallelism: the buffer is full layer width; each TP rank writes its own neuron slice (zeros elsewhere)
   and only TP rank 0 writes the token count, so the all_reduce over the DP x TP group gives every rank the full
   statistics. State is kept full width on every rank, so a checkpoint loads at any TP/DP layout.
3. Activation recomputation: a second `apply()` for a layer within one micro-batch is a recompute. It records
   nothing and contributes no regularizer, but runs the same autograd operations (non-reentrant checkpointing
   matches saved tensors by order) and returns exactly the same output (state is unchanged until
   `finish_micro_batch`). The regularizer needs autograd in the first forward, so with method l2e use
   non-reentrant checkpointing (torch.utils.checkpoint(..., use_reentrant=False)); a no-grad training-mode
   forward raises.
4. Threshold: one scalar tau per layer. Nothing is scored before `late_start` merged micro-batches. The first
   scored micro-batch only calibrates (selects nothing): its global phi go into a 4096-bin histogram, log-spaced
   over [1e-6, 1e10] (bin width 0.9% of the value), carried in the same fused buffer on that micro-batch only, and
   tau starts at the histogram's (1-p) quantile (log-interpolated within a bin). Afterwards
   tau <- tau * exp(threshold_lr * (f - p)) with f the global fraction of phi >= tau over the whole layer.
5. Regularizer (l2e): L_MS = lambda * SUM_selected log((z - mu)^2 + delta) with mu constant. The term returned by
   `regularization_loss()` is scaled so that after the usual averaging of micro-batch losses over DP ranks and
   over micro_batches_per_step its gradient is that of the step's global regularizer: "sum" multiplies the local
   sum by dp_size * micro_batches_per_step, "mean" divides it by the local token count. Each TP rank adds the sum
   over its own neuron slice. Its gradient comes from a custom autograd function, in one of two forms:
   on the CPU the forward compacts the selected pairs (nonzero(), free of host syncs there) and saves only their
   indices and derivatives (~p of the elements), so the log, the count and the backward touch only those; on an
   accelerator, where nonzero() would wait for the device, the forward stays dense and the backward saves only z
   (already kept by the next matmul) and recomputes the mask. Threshold retrieval compares (z - mu)^2 with the
   per-neuron bound tau / inv_denom, so the scores phi are not materialised unless needed (top-k, calibration,
   FKR). The L2E path is a few element-wise passes per inhibited layer plus the one fused all_reduce.
6. memel: reverse deactivation on selected pairs, z' = -D z + stopgrad(mu + D z) (value mu, gradient -D), with
   per-token top-k over the full layer (TP: local top-k, all_gather of k values over tp_group; memel only).
   Ties at the k-th value select all tied pairs.
7. Online FKR: per neuron l*_j = argmax_l of the mean score per feature accumulated over training (all-reduced in
   the same buffer); FKR = #(selected, feature known, feature != l*_j) / #(selected, feature known), with l* as
   of before the micro-batch; tokens labelled -1 (unknown) are left out of both counts.

`metrics()` returns averages over the micro-batches finished since its previous call and resets them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from l2e_dist.l2e.config import L2EConfig

HIST_BINS = 4096
HIST_LOG_MIN = math.log(1e-6)
HIST_LOG_MAX = math.log(1e10)
_MIN_DENOM = 1e-30  # keeps 1/denominator finite in fp32 when a whole layer is constant

# Scalars per layer in the fused buffer.
_COUNT, _NSEL, _REG, _SCORE, _FKR_NUM, _FKR_DEN = range(6)
_NUM_SCALARS = 6

# Metric accumulators per layer.
_M_SEL, _M_SEL_ELEMS, _M_REG, _M_REG_MBS, _M_SCORE, _M_SCORE_ELEMS, _M_FKR_NUM, _M_FKR_DEN = range(8)
_NUM_METRICS = 8


@dataclass
class _LayerState:
    mean: Tensor  # [W] fp64
    var: Tensor  # [W] fp64, unbiased
    num_obs: Tensor  # fp64 scalar: m, the (possibly forgotten) number of past observations
    tau: Tensor  # fp64 scalar
    feat_score: Tensor  # [F, W] fp64: accumulated sum of phi per feature
    feat_count: Tensor  # [F] fp64: accumulated token count per feature
    n_merged: int = 0
    tau_ready: bool = False
    fkr_ready: bool = False
    # Derived for scoring; rebuilt after every merge and on load.
    inv_denom: Tensor = field(default=None)  # type: ignore[assignment]
    bound: Tensor = field(default=None)  # type: ignore[assignment]  # tau / inv_denom: phi >= tau <=> (z-mu)^2 >= bound
    best_feature: Tensor = field(default=None)  # type: ignore[assignment]


@dataclass
class _Slots:
    """Offsets of one layer's quantities in the fused buffer of the current micro-batch."""

    base: int
    scoring: bool
    calibrating: bool
    selecting: bool
    hist: int = -1
    feat: int = -1
    shift_dtype: torch.dtype = torch.float64

    @property
    def s1(self) -> int:
        return self.base

    def s2(self, width: int) -> int:
        return self.base + width

    def scalars(self, width: int) -> int:
        return self.base + 2 * width


@dataclass
class _Evaluation:
    """Per-element quantities of one apply() call, in the compute dtype (fp64 for fp64 input, else fp32)."""

    mu: Tensor
    d: Tensor = None  # type: ignore[assignment]  # z - mu
    d2: Tensor = None  # type: ignore[assignment]
    inv_denom: Tensor | None = None
    phi: Tensor | None = None  # only where needed: top-k retrieval, calibration, FKR, scores()
    bound: Tensor | None = None  # threshold retrieval: per-neuron bound on d2 (tau / inv_denom)
    thr: Tensor | None = None  # top-k retrieval: the k-th score per token [tokens, 1]
    selected: Tensor | None = None  # bool [tokens, local_width]
    index: Tensor | None = None  # flat indices of the selected pairs (compact selection only)


def _compact_selection(device: torch.device) -> bool:
    """Work on the selected pairs through an index list (compaction) where that costs no host sync: on the CPU.
    On an accelerator nonzero() waits for the device, so there the selection stays a dense mask and the
    regularizer's backward recomputes it (a few element-wise passes, no sync)."""
    return device.type == "cpu"


def _top_values(x: Tensor, k: int) -> Tensor:
    """The k largest values of each row, [rows, k] (a max-reduction for k = 1, the MEmeL default)."""
    return x.amax(dim=1, keepdim=True) if k == 1 else x.topk(k, dim=1).values


class _SelectedLogSquare(torch.autograd.Function):
    """value = SUM_selected log((z - mu)^2 + delta); backward recomputes the selection from z (z is kept anyway by
    the next matmul): with threshold retrieval (z - mu)^2 >= bound, with top-k (z - mu)^2 * inv_denom >= thr."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, mu: Tensor, bound: Tensor | None, inv_denom: Tensor | None,
                thr: Tensor | None, delta: float):
        ctx.save_for_backward(z, mu, bound, inv_denom, thr)
        ctx.delta = delta
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, mu, bound, inv_denom, thr = ctx.saved_tensors
        d = z.reshape(-1, z.shape[-1]) - mu
        d2 = d * d
        selected = d2 >= bound if bound is not None else d2 * inv_denom >= thr
        grad = torch.where(selected, d.div_(d2.add_(ctx.delta)), 0.0).mul_(2.0 * grad_out)
        return grad.reshape(z.shape).to(z.dtype), None, None, None, None, None, None


class _CompactSelectedLogSquare(torch.autograd.Function):
    """value = SUM_selected log((z - mu)^2 + delta) given the selected pairs' flat indices and their derivatives
    coef = 2 (z - mu) / ((z - mu)^2 + delta), computed in the forward: the backward writes only those."""

    @staticmethod
    def forward(ctx, z: Tensor, value: Tensor, index: Tensor, coef: Tensor):
        ctx.save_for_backward(index, coef)
        ctx.shape, ctx.dtype = z.shape, z.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        index, coef = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=coef.device)
        grad.view(-1).index_put_((index,), (coef * grad_out).to(ctx.dtype))
        return grad, None, None, None


class _ReverseDeactivation(torch.autograd.Function):
    """z' = -D z + stopgrad(mu + D z) on selected pairs: forward value mu, gradient multiplied by -D."""

    @staticmethod
    def forward(ctx, z: Tensor, selected: Tensor, mu: Tensor, strength: float):
        ctx.save_for_backward(selected)
        ctx.strength = strength
        return torch.where(selected, mu, z)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (selected,) = ctx.saved_tensors
        return torch.where(selected, -ctx.strength * grad_out, grad_out), None, None, None


def _hist_quantile(hist: Tensor, q: float) -> Tensor:
    """q-quantile of the values counted in the log-spaced histogram `hist` (fp64, on device, no host sync)."""
    width = (HIST_LOG_MAX - HIST_LOG_MIN) / HIST_BINS
    cum = hist.cumsum(0)
    target = q * cum[-1]
    idx = torch.searchsorted(cum, target.reshape(1)).clamp(max=HIST_BINS - 1)[0]
    below = cum[idx] - hist[idx]
    frac = ((target - below) / hist[idx].clamp_min(1.0)).clamp(0.0, 1.0)
    return torch.exp(HIST_LOG_MIN + width * (idx.to(torch.float64) + frac))


def _hist_counts(phi: Tensor) -> Tensor:
    width = (HIST_LOG_MAX - HIST_LOG_MIN) / HIST_BINS
    log_phi = torch.nan_to_num(torch.log(phi.reshape(-1)), nan=HIST_LOG_MIN, neginf=HIST_LOG_MIN,
                               posinf=HIST_LOG_MAX)
    idx = ((log_phi - HIST_LOG_MIN) / width).floor().clamp(0, HIST_BINS - 1).long()
    # bincount syncs with the host on CUDA; this runs on one micro-batch per training run.
    return torch.bincount(idx, minlength=HIST_BINS)


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
        self.cfg = cfg
        self.layer_ids = list(layer_ids)
        self.num_neurons = num_neurons
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_width = num_neurons // tp_size
        self._lo = tp_rank * self.local_width
        self._hi = self._lo + self.local_width
        self.reduce_group = reduce_group
        self.tp_group = tp_group
        self.dp_size = dp_size
        self.micro_batches_per_step = micro_batches_per_step
        self.device = torch.device(device)
        self.training = True
        self.collective_count = 0  # collectives issued by this engine (one all_reduce per micro-batch for l2e)
        if cfg.enabled and cfg.fkr and cfg.num_features <= 0:
            raise ValueError("l2e.fkr needs num_features > 0 (the number of feature labels of the data)")
        self._num_features = cfg.num_features if cfg.fkr else 0
        self._layers = {lid: self._fresh_state() for lid in self.layer_ids}
        self._metric_acc = torch.zeros(len(self.layer_ids), _NUM_METRICS, dtype=torch.float64, device=self.device)
        # Compact selection (CPU) reuses these [tokens, width] buffers for z - mu, its square and the mask: fresh
        # multi-MB temporaries on every call cost page faults there. Nothing that outlives apply() points into them.
        self._scratch: dict[tuple[str, torch.dtype], Tensor] = {}
        self._reset_micro_batch()

    # ------------------------------------------------------------------ public API

    def train(self, mode: bool = True) -> L2EInhibitor:
        self.training = mode
        return self

    def eval(self) -> L2EInhibitor:
        return self.train(False)

    def set_features(self, feature_ids: Tensor | None) -> None:
        """Feature label per token for online FKR (same leading shape as the activations, -1 = unknown).

        Applies to the current micro-batch only; `finish_micro_batch` clears it.
        """
        self._features = None if feature_ids is None else feature_ids.to(self.device).reshape(-1).long()

    def apply(self, layer_id: int, z: Tensor) -> Tensor:
        """Record statistics for this rank's slice `z[..., num_neurons // tp_size]` and inhibit selected pairs."""
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
        st = self._layers[layer_id]
        slots = self._slots()[layer_id]
        flat = z.reshape(-1, self.local_width)
        tokens = flat.shape[0]
        regularize = slots.selecting and self.cfg.method == "l2e"
        compact = regularize and _compact_selection(z.device)
        need_phi = slots.calibrating or (slots.scoring and self._num_features > 0 and self._features is not None)
        with torch.no_grad():
            ev = self._evaluate(st, flat, scoring=slots.scoring, selecting=slots.selecting, need_phi=need_phi,
                                compact=compact)
            if not recompute:
                slots.shift_dtype = ev.d.dtype
                self._record(layer_id, st, slots, ev, tokens)
            if compact:
                d_sel = ev.d.view(-1).index_select(0, ev.index)
                shifted = d_sel * d_sel + self.cfg.delta
                coef = 2.0 * d_sel / shifted
                reg_value = shifted.log_().sum()
            elif regularize:  # the last use of d2: shift it in place
                reg_value = torch.special.xlogy(ev.selected, ev.d2.add_(self.cfg.delta)).sum()
            if regularize:
                if recompute:
                    reg_value = torch.zeros((), dtype=ev.d.dtype, device=z.device)
                else:
                    self._buf[slots.scalars(self.num_neurons) + _REG] = reg_value
        if regularize:
            if compact:
                term = _CompactSelectedLogSquare.apply(z, reg_value, ev.index, coef)
            else:
                term = _SelectedLogSquare.apply(z, reg_value, ev.mu, ev.bound, ev.inv_denom, ev.thr, self.cfg.delta)
            if not recompute:
                self._reg_terms[layer_id] = term * self._reg_scale(tokens)
        elif slots.selecting and self.cfg.method == "memel":
            return _ReverseDeactivation.apply(z, ev.selected.reshape(z.shape), ev.mu.to(z.dtype),
                                              self.cfg.rd_strength)
        return z

    def selected_mask(self, layer_id: int, z: Tensor) -> Tensor | None:
        """The (token, neuron) pairs apply() selects for `z` with the current state (bool, z's shape).

        None while the layer selects nothing (before late_start, or on the threshold-calibration micro-batch).
        Records nothing; with top-k retrieval and tp_size > 1 it all_gathers over tp_group like apply().
        """
        st = self._layers[layer_id]
        *_, selecting = self._phase(st)
        if not selecting:
            return None
        with torch.no_grad():
            ev = self._evaluate(st, z.reshape(-1, self.local_width), scoring=True, selecting=True)
        return ev.selected.reshape(z.shape)

    def scores(self, layer_id: int, z: Tensor) -> Tensor | None:
        """Monosemanticity scores phi of this rank's slice `z` with the current statistics (z's shape, fp32 or
        fp64); None before any statistics exist. Records nothing: for held-out measurements and analysis."""
        st = self._layers[layer_id]
        if st.n_merged == 0:
            return None
        with torch.no_grad():
            ev = self._evaluate(st, z.reshape(-1, self.local_width), scoring=True, selecting=False, need_phi=True)
        return ev.phi.reshape(z.shape)

    def regularization_loss(self) -> Tensor:
        """Differentiable scalar to add to this micro-batch's loss (zero when nothing is selected)."""
        if not self._reg_terms:
            return torch.zeros((), device=self.device)
        return sum(self._reg_terms.values())

    def finish_micro_batch(self) -> None:
        """After backward: ONE fused all_reduce of every layer's sums, then merge statistics and move thresholds."""
        if not self.training or not self.cfg.enabled or not self._recorded:
            self._reset_micro_batch()
            return
        missing = [lid for lid in self.layer_ids if lid not in self._recorded]
        if missing:
            raise RuntimeError(f"finish_micro_batch: layers {missing} were not applied in this micro-batch "
                               "(every inhibited layer must run once per micro-batch on every rank)")
        buf = self._buf
        if self.reduce_group is not None:
            dist.all_reduce(buf, group=self.reduce_group)
            self.collective_count += 1
        metric_rows = []
        for lid in self.layer_ids:
            metric_rows.append(self._merge(self._layers[lid], self._layout[lid], buf))
        self._metric_acc += torch.stack(metric_rows)
        self._reset_micro_batch()

    def metrics(self) -> dict[str, float]:
        """Per-layer averages over the micro-batches finished since the previous call (then reset)."""
        acc = self._metric_acc.tolist()
        taus = torch.stack([self._layers[lid].tau for lid in self.layer_ids]).tolist()
        out: dict[str, float] = {}
        for row, lid, tau in zip(acc, self.layer_ids, taus):
            prefix = f"l2e/layer{lid}/"
            if self.cfg.uses_threshold and self._layers[lid].tau_ready:
                out[prefix + "threshold"] = tau
            if row[_M_SEL_ELEMS] > 0:
                out[prefix + "selected_frac"] = row[_M_SEL] / row[_M_SEL_ELEMS]
            if row[_M_REG_MBS] > 0 and self.cfg.method == "l2e":
                out[prefix + "reg"] = row[_M_REG] / row[_M_REG_MBS]
            if row[_M_SCORE_ELEMS] > 0:
                out[prefix + "mean_score"] = row[_M_SCORE] / row[_M_SCORE_ELEMS]
            if row[_M_FKR_DEN] > 0:
                out[prefix + "fkr"] = row[_M_FKR_NUM] / row[_M_FKR_DEN]
        self._metric_acc.zero_()
        return out

    def state_dict(self) -> dict:
        """Full-width statistics and thresholds (identical on every rank; independent of the TP/DP layout)."""
        layers = {}
        for lid, st in self._layers.items():
            layers[lid] = {
                "mean": st.mean.cpu().clone(), "var": st.var.cpu().clone(), "num_obs": st.num_obs.cpu().clone(),
                "tau": st.tau.cpu().clone(), "feat_score": st.feat_score.cpu().clone(),
                "feat_count": st.feat_count.cpu().clone(), "n_merged": st.n_merged, "tau_ready": st.tau_ready,
                "fkr_ready": st.fkr_ready,
            }
        return {"format": "l2e-inhibitor-v1", "num_neurons": self.num_neurons, "layers": layers}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != "l2e-inhibitor-v1":
            raise ValueError(f"not an L2E inhibitor state (format={sd.get('format')!r})")
        if sd["num_neurons"] != self.num_neurons:
            raise ValueError(f"L2E state has {sd['num_neurons']} neurons per layer, this model has "
                             f"{self.num_neurons}")
        if sorted(sd["layers"]) != sorted(self.layer_ids):
            raise ValueError(f"L2E state covers layers {sorted(sd['layers'])}, the config selects "
                             f"{sorted(self.layer_ids)}: resume with the same l2e.layers")
        for lid, saved in sd["layers"].items():
            if saved["feat_count"].numel() != self._num_features:
                raise ValueError(f"L2E state has {saved['feat_count'].numel()} FKR features, the config has "
                                 f"{self._num_features}: resume with the same l2e.fkr/num_features")

            def to_dev(t: Tensor) -> Tensor:
                return t.to(device=self.device, dtype=torch.float64).clone()

            st = _LayerState(mean=to_dev(saved["mean"]), var=to_dev(saved["var"]), num_obs=to_dev(saved["num_obs"]),
                             tau=to_dev(saved["tau"]), feat_score=to_dev(saved["feat_score"]),
                             feat_count=to_dev(saved["feat_count"]), n_merged=int(saved["n_merged"]),
                             tau_ready=bool(saved["tau_ready"]), fkr_ready=bool(saved["fkr_ready"]))
            self._refresh_derived(st)
            self._layers[lid] = st
        self._reset_micro_batch()

    # ------------------------------------------------------------------ internals

    def _fresh_state(self) -> _LayerState:
        f64 = dict(dtype=torch.float64, device=self.device)
        st = _LayerState(mean=torch.zeros(self.num_neurons, **f64), var=torch.zeros(self.num_neurons, **f64),
                         num_obs=torch.zeros((), **f64), tau=torch.ones((), **f64),
                         feat_score=torch.zeros(self._num_features, self.num_neurons, **f64),
                         feat_count=torch.zeros(self._num_features, **f64))
        self._refresh_derived(st)
        return st

    def _refresh_derived(self, st: _LayerState) -> None:
        denom = (st.var + self.cfg.eps * st.var.mean()).clamp_min(_MIN_DENOM)
        st.inv_denom = 1.0 / denom
        st.bound = st.tau * denom
        if self._num_features:
            mean_score = st.feat_score / st.feat_count.clamp_min(1.0)[:, None]
            mean_score = torch.where(st.feat_count[:, None] > 0, mean_score, -math.inf)
            st.best_feature = mean_score.argmax(dim=0)

    def _reset_micro_batch(self) -> None:
        self._recorded: set[int] = set()
        self._layout: dict[int, _Slots] | None = None
        self._buf: Tensor | None = None
        self._reg_terms: dict[int, Tensor] = {}
        self._features: Tensor | None = None

    def _slots(self) -> dict[int, _Slots]:
        """Layout of the fused buffer for this micro-batch (same on every rank: it depends on host counters only)."""
        if self._layout is not None:
            return self._layout
        width, offset, layout = self.num_neurons, 0, {}
        for lid in self.layer_ids:
            scoring, calibrating, selecting = self._phase(self._layers[lid])
            slots = _Slots(base=offset, scoring=scoring, calibrating=calibrating, selecting=selecting)
            offset += 2 * width + _NUM_SCALARS
            if calibrating:
                slots.hist, offset = offset, offset + HIST_BINS
            if self._num_features:
                slots.feat, offset = offset, offset + self._num_features * (width + 1)
            layout[lid] = slots
        self._layout = layout
        self._buf = torch.zeros(offset, dtype=torch.float64, device=self.device)
        return layout

    def _phase(self, st: _LayerState) -> tuple[bool, bool, bool]:
        """(scoring, calibrating, selecting) for the next micro-batch; host counters only, same on every rank."""
        scoring = st.n_merged >= self.cfg.start_after
        calibrating = scoring and self.cfg.uses_threshold and not st.tau_ready
        return scoring, calibrating, scoring and not calibrating

    def _evaluate(self, st: _LayerState, flat: Tensor, *, scoring: bool, selecting: bool, need_phi: bool = False,
                  compact: bool = False) -> _Evaluation:
        """Deviations, scores and selection of activations `flat` [tokens, local_width] (element-wise, no sync).

        Threshold retrieval compares (z - mu)^2 with the per-neuron bound tau / inv_denom, so the scores phi
        themselves are only materialised where they are needed (`need_phi`, top-k retrieval)."""
        cdt = torch.float64 if flat.dtype == torch.float64 else torch.float32
        ev = _Evaluation(mu=st.mean[self._lo:self._hi].to(cdt))
        work = (lambda name, dtype: self._scratch_buffer(name, flat.shape, dtype, flat.device)) if compact \
            else (lambda name, dtype: None)
        ev.d = torch.sub(flat, ev.mu, out=work("d", cdt))  # promotes bf16/fp16 activations to fp32 in this pass
        ev.d2 = torch.mul(ev.d, ev.d, out=work("d2", cdt))
        if scoring:
            ev.inv_denom = st.inv_denom[self._lo:self._hi].to(cdt)
            if need_phi or not self.cfg.uses_threshold:
                ev.phi = ev.d2 * ev.inv_denom
        if selecting:
            if self.cfg.uses_threshold:
                ev.bound = st.bound[self._lo:self._hi].to(cdt)
                ev.selected = torch.ge(ev.d2, ev.bound, out=work("selected", torch.bool))
            else:
                ev.thr = self._kth_score_per_token(ev.phi)
                ev.selected = ev.phi >= ev.thr
            if compact:
                ev.index = ev.selected.view(-1).nonzero().squeeze(1)
        return ev

    def _scratch_buffer(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (name, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < shape.numel() or buf.device != device:
            buf = self._scratch[key] = torch.empty(shape.numel(), dtype=dtype, device=device)
        return buf[:shape.numel()].view(shape)

    def _kth_score_per_token(self, phi: Tensor) -> Tensor:
        """k-th largest score of each token over the full layer, shape [tokens, 1]."""
        k = min(self.cfg.topk, self.num_neurons)
        top = _top_values(phi, min(k, self.local_width))
        if self.tp_size > 1:
            parts = [torch.empty_like(top) for _ in range(self.tp_size)]
            dist.all_gather(parts, top.contiguous(), group=self.tp_group)
            self.collective_count += 1
            top = _top_values(torch.cat(parts, dim=1), k)
        return top[:, k - 1:k]

    def _reg_scale(self, local_tokens: int) -> float:
        if self.cfg.reduction == "sum":
            return self.cfg.reg_lambda * self.dp_size * self.micro_batches_per_step
        return self.cfg.reg_lambda / max(local_tokens, 1)

    def _record(self, layer_id: int, st: _LayerState, slots: _Slots, ev: _Evaluation, tokens: int) -> None:
        """Write this rank's local sums into the fused buffer (device ops only; the regularizer value is written
        by apply())."""
        width, lo, hi, buf = self.num_neurons, self._lo, self._hi, self._buf
        selected = ev.selected
        buf[slots.s1 + lo:slots.s1 + hi] = ev.d.sum(0)
        d2_sum = ev.d2.sum(0)
        buf[slots.s2(width) + lo:slots.s2(width) + hi] = d2_sum
        sc = slots.scalars(width)
        if self.tp_rank == 0:
            buf[sc + _COUNT] = tokens
        if selected is not None:
            buf[sc + _NSEL] = ev.index.numel() if ev.index is not None else selected.sum()
        if ev.inv_denom is not None:  # scoring: SUM phi = SUM_j inv_denom_j * SUM_tokens d2
            buf[sc + _SCORE] = (d2_sum * ev.inv_denom).sum()
        if slots.calibrating:
            buf[slots.hist:slots.hist + HIST_BINS] = _hist_counts(ev.phi)
        if self._num_features and ev.inv_denom is not None and self._features is not None:
            self._record_features(st, slots, ev.phi, selected, tokens)
        self._recorded.add(layer_id)

    def _record_features(self, st: _LayerState, slots: _Slots, phi: Tensor, selected: Tensor | None,
                         tokens: int) -> None:
        feats = self._features
        if feats.numel() != tokens:
            raise ValueError(f"set_features got {feats.numel()} labels for {tokens} tokens")
        nf, width, buf = self._num_features, self.num_neurons, self._buf
        one_hot = feats[:, None] == torch.arange(nf, device=feats.device)[None, :]  # unknown (-1): all False
        region = buf[slots.feat:slots.feat + nf * width].view(nf, width)
        region[:, self._lo:self._hi] = one_hot.to(phi.dtype).T @ phi
        if self.tp_rank == 0:
            buf[slots.feat + nf * width:slots.feat + nf * (width + 1)] = one_hot.sum(0)
        if selected is not None and st.fkr_ready:
            known_sel = selected & ((feats >= 0) & (feats < nf))[:, None]
            wrong = known_sel & (feats[:, None] != st.best_feature[None, self._lo:self._hi])
            sc = slots.scalars(width)
            buf[sc + _FKR_NUM] = wrong.sum()
            buf[sc + _FKR_DEN] = known_sel.sum()

    def _merge(self, st: _LayerState, slots: _Slots, buf: Tensor) -> Tensor:
        """Exact MEmeL merge with forgetting and the threshold update; returns this layer's metric increments."""
        cfg, width = self.cfg, self.num_neurons
        sc = buf[slots.scalars(width):slots.scalars(width) + _NUM_SCALARS]
        b = sc[_COUNT]
        shift = st.mean.to(slots.shift_dtype).to(torch.float64)
        batch_dev = buf[slots.s1:slots.s1 + width] / b
        batch_mean = shift + batch_dev
        batch_var = (buf[slots.s2(width):slots.s2(width) + width] / b - batch_dev * batch_dev).clamp_min(0.0)
        m = cfg.forget_steps * b if st.n_merged >= cfg.forget_steps else st.num_obs
        n = m + b
        diff = st.mean - batch_mean
        new_mean = (m * st.mean + b * batch_mean) / n
        n1 = (n - 1.0).clamp_min(1.0)
        new_var = m * b * diff * diff / (n1 * n) + (b * batch_var + (m - 1.0) * st.var) / n1
        st.mean, st.var, st.num_obs = new_mean, new_var.clamp_min(0.0), n
        st.n_merged += 1

        elements = b * width
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        if slots.calibrating:
            st.tau = _hist_quantile(buf[slots.hist:slots.hist + HIST_BINS], 1.0 - cfg.inhibit_ratio)
            st.tau_ready = True
        elif slots.selecting and cfg.uses_threshold:
            frac = sc[_NSEL] / elements
            st.tau = st.tau * torch.exp(cfg.threshold_lr * (frac - cfg.inhibit_ratio))
        if self._num_features and slots.scoring:
            nf = self._num_features
            st.feat_score = st.feat_score + buf[slots.feat:slots.feat + nf * width].view(nf, width)
            st.feat_count = st.feat_count + buf[slots.feat + nf * width:slots.feat + nf * (width + 1)]
            st.fkr_ready = st.fkr_ready or self._features is not None
        self._refresh_derived(st)

        reg = cfg.reg_lambda * sc[_REG] if cfg.reduction == "sum" else cfg.reg_lambda * sc[_REG] / b
        selecting, scoring = slots.selecting, slots.scoring
        return torch.stack([
            sc[_NSEL] if selecting else zero, elements if selecting else zero,
            reg if selecting else zero, torch.ones_like(zero) if selecting else zero,
            sc[_SCORE] if scoring else zero, elements if scoring else zero,
            sc[_FKR_NUM], sc[_FKR_DEN],
        ])
