"""The engine: L2E or MEmeL inhibition of a few layers' MLP neurons, driven by the trainer step by step.

What happens to one layer's activations is reference.py (the dense pass, read it first) or its CPU form
cpu_backend.py; this module keeps the per-layer state, the step's fused sums (step_sums.py) and the protocol:

    for each micro-batch:
        with inhibitor.micro_batch(features) as l2e:   # the forward hooks call apply() per inhibited layer
            loss = lm_loss + l2e.loss()                 # the regularizer, scaled for DeepSpeed's averaging
            backward
    after the optimizer step: inhibitor.end_step(applied)  # one all_reduce, then the merge per layer

It knows nothing of DeepSpeed or megatron: it gets torch.distributed process groups. docs/l2e-method.md ("One
step of the engine") is the map.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor

from l2e_dist.l2e import cpu_scan, step_sums
from l2e_dist.l2e.compiled_backend import compiled_pass
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.cpu_backend import Scratch, cpu_pass, kernel_serves
from l2e_dist.l2e.reference import LayerPass, MethodSettings, PassSums, Phase, StepConstants, dense_pass
from l2e_dist.l2e.state_io import load_layer_states, save_layer_states
from l2e_dist.l2e.statistics import LayerState, fresh_state, refresh_derived
from l2e_dist.l2e.step_sums import (
    N_ABOVE_HIGH,
    N_ABOVE_LOW,
    N_SELECTED,
    NUM_METRICS,
    REG_SUM,
    SCORE_SUM,
    TOKENS,
    Slots,
)
from l2e_dist.l2e.threshold import HIST_BINS, histogram_counts

BACKENDS = ("auto", "dense", "cpu", "compiled")  # auto: "cpu" for CPU activations, "dense" elsewhere


def loss_scale(cfg: L2EConfig, local_tokens: int, dp_size: int, micro_batches_per_step: int) -> float:
    """The factor on one micro-batch's regularizer value such that, after DeepSpeed's averaging over DP ranks
    and micro-batches, the gradient is that of the step's global regularizer: "sum" multiplies the local sum
    back, "mean" divides it by the local token count."""
    if cfg.reduction == "sum":
        return cfg.reg_lambda * dp_size * micro_batches_per_step
    return cfg.reg_lambda / max(local_tokens, 1)


class MicroBatch:
    """One micro-batch of the engine's protocol (`L2EInhibitor.micro_batch`): the FKR labels go in on entry,
    `loss()` hands out the L2E term after the forward, and the exit closes the micro-batch."""

    def __init__(self, inhibitor: L2EInhibitor | None, features: Tensor | None):
        self.inhibitor = inhibitor
        self.features = features

    def __enter__(self) -> MicroBatch:
        if self.inhibitor is not None:
            self.inhibitor.set_features(self.features)
        return self

    def loss(self) -> Tensor | float:
        """The L2E term to add to this micro-batch's loss (0 without an inhibitor or before anything selects).
        Call it after the forward: it checks that every inhibited layer ran."""
        if self.inhibitor is None:
            return 0.0
        self.inhibitor.check_all_layers_ran("loss()")
        return self.inhibitor.regularization_loss()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.inhibitor is None:
            return
        if exc_type is None:
            self.inhibitor.finish_micro_batch()
        else:  # the error is what matters: drop the micro-batch's terms without checking it
            self.inhibitor.discard_micro_batch()


class L2EInhibitor:
    """The engine for `cfg.method`: "l2e" (moving-threshold retrieval + the log-square regularizer) or "memel"
    (per-token top-k retrieval + reverse deactivation), over the MLP activations of `layer_ids`.

    `backend`: "auto" runs cpu_backend.py for CPU activations and reference.py's dense pass elsewhere; "dense" or
    "cpu" forces one; "compiled" runs the dense pass under torch.compile (compiled_backend.py). The tests prove
    them equal."""

    def __init__(self, cfg: L2EConfig, layer_ids: list[int], num_neurons: int, *, tp_rank: int = 0,
                 tp_size: int = 1, reduce_group=None, tp_group=None, dp_size: int = 1,
                 micro_batches_per_step: int = 1, device: str | torch.device = "cpu", backend: str = "auto"):
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
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: one of {BACKENDS}")
        self.cfg = cfg
        self.layer_ids = list(layer_ids)
        self.num_neurons = num_neurons
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_width = num_neurons // tp_size
        self._neurons = slice(tp_rank * self.local_width, (tp_rank + 1) * self.local_width)
        self.reduce_group = reduce_group
        self.dp_size = dp_size
        self.micro_batches_per_step = micro_batches_per_step
        self.device = torch.device(device)
        self.backend = backend
        self.settings = MethodSettings(cfg.method, cfg.uses_threshold, min(cfg.topk, num_neurons), cfg.delta,
                                       cfg.rd_strength, tp_size, tp_group)
        self.training = True
        self.collective_count = 0  # collectives issued by this engine (one all_reduce per optimizer step for l2e)
        self.steps_ended = 0  # end_step() calls that merged (applied optimizer steps with recorded micro-batches)
        self._num_features = cfg.num_features if cfg.fkr else 0
        self._layers = {lid: fresh_state(num_neurons, self._num_features, self.device) for lid in self.layer_ids}
        for state in self._layers.values():
            refresh_derived(state, cfg.eps)
        self._metric_sums = [[0.0] * NUM_METRICS for _ in self.layer_ids]  # host sums since the last metrics()
        self._scratch = Scratch()
        self._compiled_pass = compiled_pass(self.settings) if backend == "compiled" else None
        if cfg.enabled and kernel_serves(self.settings) and self.device.type == "cpu" and backend in ("auto", "cpu"):
            cpu_scan.available()  # build (once per machine: a compile) or load it now, not inside a step
        self._reset_step()

    # ------------------------------------------------------------------ public API

    def train(self, mode: bool = True) -> L2EInhibitor:
        self.training = mode
        return self

    def eval(self) -> L2EInhibitor:
        return self.train(False)

    def micro_batch(self, features: Tensor | None = None) -> MicroBatch:
        """The context of one micro-batch (module docstring); `features`: FKR labels per token or None."""
        return MicroBatch(self, features)

    def set_features(self, feature_ids: Tensor | None) -> None:
        """Feature label per token for online FKR (same leading shape as the activations, -1 = unknown).
        Applies to the current micro-batch only; `finish_micro_batch` clears it."""
        self._features = None if feature_ids is None else feature_ids.to(self.device).reshape(-1).long()

    def apply(self, layer_id: int, z: Tensor) -> Tensor:
        """The forward hook's call: one pass over this rank's slice `z[..., num_neurons // tp_size]` with the state
        as of before the step; adds the pass's sums to the step's and returns what the layer passes on. A second
        call for a layer within a micro-batch is an activation recomputation: the same autograd operations and
        output (non-reentrant checkpointing matches saved tensors by order), nothing added."""
        if not self.training or not self.cfg.enabled:
            return z
        if layer_id not in self._layers:
            raise KeyError(f"layer {layer_id} is not inhibited (inhibited layers: {self.layer_ids})")
        if z.shape[-1] != self.local_width:
            raise ValueError(f"layer {layer_id}: activation width {z.shape[-1]} != num_neurons/tp_size = "
                             f"{self.local_width}")
        first_pass = layer_id not in self._applied
        if first_pass and self.cfg.method == "l2e" and not torch.is_grad_enabled():
            raise RuntimeError("L2EInhibitor.apply ran with autograd disabled in training mode: the L2E regularizer "
                               "needs the graph; use non-reentrant activation checkpointing "
                               "(use_reentrant=False) and put the model/inhibitor in eval() for no-grad forwards")
        self._applied.add(layer_id)
        state, slots = self._layers[layer_id], self._step_slots()[layer_id]
        if not first_pass and slots.phase is not Phase.SELECTING:
            return z  # a recompute of a pass that only collects sums
        labelled = first_pass and self._features is not None and self._num_features > 0
        result = self._pass(z, state, slots.phase, want_scores=labelled and slots.phase.scoring)
        if first_pass:
            self._record(layer_id, state, slots, result, labelled)
        return result.output

    def selected_mask(self, layer_id: int, z: Tensor) -> Tensor | None:
        """The (token, neuron) pairs apply() selects for `z` with the current state (bool, z's shape); None while
        the layer selects nothing. Records nothing; with top-k retrieval and tp_size > 1 it all_gathers over the
        TP group like apply()."""
        state = self._layers[layer_id]
        if self._phase(state) is not Phase.SELECTING:
            return None
        with torch.no_grad():
            result = self._pass(z.detach(), state, Phase.SELECTING, want_scores=False, backend="dense")
        return result.selected.reshape(z.shape)

    def scores(self, layer_id: int, z: Tensor) -> Tensor | None:
        """Monosemanticity scores phi of this rank's slice `z` with the current statistics (z's shape, fp32 or
        fp64); None before any statistics exist. Records nothing: for held-out measurements and analysis."""
        state = self._layers[layer_id]
        if state.n_merged == 0:
            return None
        flat = z.reshape(-1, self.local_width)
        dtype = _compute_dtype(flat)
        with torch.no_grad():
            deviation = flat - state.mean[self._neurons].to(dtype)
            phi = deviation.square_().mul_(state.inv_denom[self._neurons].to(dtype))
        return phi.reshape(z.shape)

    def regularization_loss(self) -> Tensor:
        """This micro-batch's scaled L2E term (zero when nothing is selected); the trainer takes it through
        `micro_batch(...).loss()`, which first checks that the forward ran."""
        if not self._reg_terms:
            return torch.zeros((), device=self.device)
        return sum(self._reg_terms.values())

    def check_all_layers_ran(self, where: str) -> None:
        """Raise unless every inhibited layer was applied in this micro-batch (training with the engine on)."""
        if not (self.training and self.cfg.enabled):
            return
        missing = [lid for lid in self.layer_ids if lid not in self._applied]
        if missing:
            raise RuntimeError(f"{where}: layers {missing} were not applied in this micro-batch (every inhibited "
                               "layer must run once per micro-batch on every rank, before the L2E loss is taken)")

    def finish_micro_batch(self) -> None:
        """After backward: checks that every layer ran, and clears the micro-batch's terms (sums stay)."""
        if self._applied:
            self.check_all_layers_ran("finish_micro_batch")
            if self.training and self.cfg.enabled:
                self._micro_batches += 1
        self.discard_micro_batch()

    def discard_micro_batch(self) -> None:
        """Clear the micro-batch's terms and labels without checks (the sums it added stay)."""
        self._applied = set()
        self._reg_terms = {}
        self._features = None

    def end_step(self, applied: bool = True, step: int | None = None) -> None:
        """At the optimizer-step boundary (after the optimizer step): ONE fused all_reduce of every layer's sums
        over the step's micro-batches, then the merge and the threshold update. `applied=False` (an fp16
        overflow-skipped step) discards the step's sums: the L2E state stays as the optimizer's does.

        Layers whose sums hold a NaN/inf merge nothing; after `max_nonfinite_steps` consecutive such steps this
        raises NonFiniteActivations naming the layer and the step (`step`: the trainer's step number, for it)."""
        if self._applied:
            raise RuntimeError("end_step: call finish_micro_batch() after each micro-batch's backward first")
        # not applied: the same decision on every rank (DeepSpeed agrees on overflow), so no collective either
        if self._buf is None or self._micro_batches == 0 or not self.cfg.enabled or not applied:
            self._reset_step()
            return
        if step_sums.all_reduce_step(self._buf, self.reduce_group):
            self.collective_count += 1
        rows = step_sums.merge_layers(self._layers, self._slots, self._buf, self.cfg, self.num_neurons, self._shift_dtype,
                                  self._num_features, self._step_labelled)
        self._metric_sums = [[a + b for a, b in zip(acc, row)] for acc, row in zip(self._metric_sums, rows)]
        self.steps_ended += 1
        self._reset_step()
        step_sums.check_diverged(self._layers, self.cfg.max_nonfinite_steps,
                             step if step is not None else self.steps_ended)

    def metrics(self) -> dict[str, float]:
        """Per-layer averages over the optimizer steps ended since the previous call (then reset)."""
        out = step_sums.metric_values(self._metric_sums, self._layers, self.cfg)
        self._metric_sums = [[0.0] * NUM_METRICS for _ in self.layer_ids]
        return out

    def state_dict(self) -> dict:
        """Full-width statistics and thresholds (identical on every rank; independent of the TP/DP layout)."""
        return save_layer_states(self._layers, self.num_neurons)

    def load_state_dict(self, sd: dict, writer_micro_batches_per_step: int | None = None) -> None:
        """Restore a state_dict(). A legacy v1 state (per micro-batch) loads only when the run that wrote it had
        one micro-batch per step (`writer_micro_batches_per_step` == 1), where it means the same."""
        self._layers = load_layer_states(sd, self.num_neurons, self.layer_ids, self._num_features, self.device,
                                         accept_v1=writer_micro_batches_per_step == 1)
        for state in self._layers.values():
            refresh_derived(state, self.cfg.eps)
        self._reset_step()

    # ------------------------------------------------------------------ internals

    def _reset_step(self) -> None:
        self._applied: set[int] = set()  # layers applied in the current micro-batch (a second call: recompute)
        self._slots: dict[int, Slots] | None = None
        self._buf: Tensor | None = None
        self._reg_terms: dict[int, Tensor] = {}
        self._features: Tensor | None = None
        self._micro_batches = 0
        self._step_labelled = False
        self._shift_dtype = torch.float64
        self._step_constants: dict[tuple[int, torch.dtype], StepConstants] = {}

    def _step_slots(self) -> dict[int, Slots]:
        """The step buffer's layout, made on the step's first apply() (host counters only: same on every rank)."""
        if self._slots is None:
            phases = {lid: self._phase(self._layers[lid]) for lid in self.layer_ids}
            self._slots, size = step_sums.layout(phases, self.num_neurons, self._num_features)
            self._buf = torch.zeros(size, dtype=torch.float64, device=self.device)
        return self._slots

    def _phase(self, state: LayerState) -> Phase:
        if state.n_merged < self.cfg.start_after:
            return Phase.COLLECTING
        if self.cfg.uses_threshold and not state.tau_ready:
            return Phase.CALIBRATING
        return Phase.SELECTING

    def _constants(self, state: LayerState, dtype: torch.dtype) -> StepConstants:
        """This rank's slice of the layer's state in `dtype`, converted once per step and layer."""
        key = (id(state), dtype)
        if key not in self._step_constants:
            n = self._neurons
            self._step_constants[key] = StepConstants.of(state.mean[n], state.inv_denom[n], state.bound[n],
                                                         state.tau, state.half_width, dtype)
        return self._step_constants[key]

    def _pass(self, z: Tensor, state: LayerState, phase: Phase, want_scores: bool,
              backend: str | None = None) -> LayerPass:
        """One layer pass through the chosen backend: ONE call, an immutable result."""
        flat = z.reshape(-1, self.local_width)
        constants = self._constants(state, _compute_dtype(flat))
        self._shift_dtype = constants.mean.dtype
        if phase is Phase.SELECTING and not self.settings.uses_threshold and self.tp_size > 1:
            self.collective_count += 1  # the top-k's all_gather over the TP group
        backend = backend or self.backend
        if backend == "cpu" or (backend == "auto" and z.device.type == "cpu"):
            return cpu_pass(z, flat, constants, self.settings, phase, want_scores, self._scratch)
        if backend == "compiled":
            return self._compiled_pass(z, flat, constants, self.settings, phase, want_scores)
        return dense_pass(z, flat, constants, self.settings, phase, want_scores)

    def _record(self, layer_id: int, state: LayerState, slots: Slots, result: LayerPass, labelled: bool) -> None:
        """A first pass's share of the step: its sums, the scaled regularizer term, FKR and calibration input."""
        self._add_sums(slots, result.sums)
        if result.reg_term is not None:
            self._reg_terms[layer_id] = result.reg_term * loss_scale(
                self.cfg, result.sums.tokens, self.dp_size, self.micro_batches_per_step)
        if labelled and result.scores is not None:
            step_sums.record_features(self._buf, slots, state, self._features, result.scores,
                                result.selected_mask(result.scores.shape), self._num_features, self._neurons,
                                self.tp_rank == 0)
            self._step_labelled = True
        if slots.phase is Phase.CALIBRATING:  # last use of the scores: histogram_counts works in place
            self._buf[slots.hist:slots.hist + HIST_BINS] += histogram_counts(result.scores)

    def _add_sums(self, slots: Slots, sums: PassSums) -> None:
        """Add one pass's sums into the step buffer: full width, this rank's neurons; the token count from TP
        rank 0 only, so that one all_reduce over TP x DP gives the global sums."""
        buf = self._buf
        buf[slots.sum_dev][self._neurons] += sums.sum_dev
        buf[slots.sum_sq_dev][self._neurons] += sums.sum_sq_dev
        if self.tp_rank == 0:
            buf[slots.scalar(TOKENS)] += sums.tokens
        for which, value in ((SCORE_SUM, sums.score_sum), (N_ABOVE_LOW, sums.n_above_low),
                             (N_SELECTED, sums.n_selected), (N_ABOVE_HIGH, sums.n_above_high),
                             (REG_SUM, sums.reg_sum)):
            if value is not None:
                buf[slots.scalar(which)] += value


def _compute_dtype(flat: Tensor) -> torch.dtype:
    """fp64 activations are scored in fp64, everything else (fp32, bf16, fp16) in fp32."""
    return torch.float64 if flat.dtype == torch.float64 else torch.float32
