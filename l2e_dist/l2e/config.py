"""The `l2e:` section of the run config (see docs/l2e-method.md for the method).

Defaults follow the L2E paper (Mid-2 layers, p = 2%, lambda = 1e-9, n_f = 10, eps = 0.01); choices the papers
leave open are ours and documented on the fields below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from l2e_dist.config_utils import ConfigError

LAYER_PRESETS = ("mid2", "mid_third")


@dataclass
class L2EConfig:
    """Monosemantic-neuron inhibition settings.

    One step is one optimizer step's global batch (all micro-batches, all ranks): statistics, threshold and FKR
    counts merge once at its end, and `forget_steps`, `late_start` count optimizer steps (docs/l2e-method.md).

    `threshold_lr` (ours, default 0.5, in (0, 1]): each step tau moves this fraction of the way (in log space)
    to the step's (1 - p) quantile located by its bracket counts (l2e_dist/l2e/threshold.py); 1 jumps to it,
    smaller values average over steps (steady-state lag-1 autocorrelation of the selected fraction ~ -lr/2).
    `max_nonfinite_steps` (ours, default 5): a step whose activations in a layer hold NaN/inf merges nothing into
    that layer; this many consecutive such steps stop the run with an error naming the layer.
    """

    # none: plain training, nothing attached; l2e: moving-threshold retrieval + L_MS regularizer; memel: the
    # MEmeL baseline (per-token top-k retrieval, reverse deactivation).
    method: Literal["l2e", "memel", "none"] = "none"
    # "mid2": 0-based L//2-1 and L//2; "mid_third": round(L/3) layers centred in the stack; or an explicit list.
    layers: str | list[int] = "mid2"
    # Where the model places its probe; the engine itself only sees the tensor it is given.
    activation: Literal["post_act", "pre_act"] = "post_act"
    # auto: moving threshold for l2e, per-token top-k for memel.
    retrieval: Literal["auto", "threshold", "topk"] = "auto"
    inhibit_ratio: float = 0.02  # p: fraction of (token, neuron) pairs selected (paper: 0.01-0.03)
    topk: int = 1  # retrieval=topk: neurons selected per token
    reg_lambda: float = 1e-9  # lambda of L_MS = lambda * SUM log((z - mu)^2 + delta) (paper: 1e-9 to 1e-11)
    # sum: the paper's SUM over the global batch; mean: divided by the global token count.
    reduction: Literal["sum", "mean"] = "sum"
    # bf16, ZeRO 0/1 only. activation: the regularizer's gradient is added to the bf16 activation gradient,
    # where a small lambda rounds away; fp32: a separate backward of the regularizer, so that its weight
    # gradients enter DeepSpeed's fp32 gradient buffers apart from the LM's, reduced in fp32
    # (training/l2e_precision.py; one more partial backward per micro-batch, fp32 gradient communication).
    grad_precision: Literal["activation", "fp32"] = "activation"
    # Which implementation of the same pass runs (equal results): auto: the CPU kernel path for CPU activations,
    # the dense pass elsewhere; dense / cpu: forced; compiled: the dense pass under torch.compile (one fused
    # graph per phase; for accelerators, where the eager dense pass is ~14 activation-sized kernels per layer).
    backend: Literal["auto", "dense", "cpu", "compiled"] = "auto"
    delta: float = 1e-6  # keeps log((z - mu)^2 + delta) finite
    eps: float = 0.01  # score phi = (z - mu)^2 / (var + eps x the layer's mean var)
    # Counted in optimizer steps: statistics and the threshold update once per step.
    forget_steps: int = 10
    late_start: int | None = None  # steps merged before scoring starts; None: forget_steps
    threshold_lr: float = 0.5  # fraction of the way (log space) tau moves to the step's quantile (ours)
    max_nonfinite_steps: int = 5  # consecutive NaN/inf steps in a layer that stop the run (ours)
    rd_strength: float = 1.0  # memel: reverse deactivation scale (gradient x -rd_strength)
    fkr: bool = False  # report the False Killing Rate online (needs per-document feature labels)
    num_features: int = 0  # 0: the number of feature labels of the data (the trainer fills it in)
    # Held-out check reported at validation: fraction of (token, neuron) pairs of the inhibited layers whose score
    # (with the run's own statistics) is >= this FIXED value, comparable across runs (L2E on/off).
    eval_reference_score: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def start_after(self) -> int:
        """Number of merged optimizer steps before scoring starts (late_start, default forget_steps)."""
        return self.forget_steps if self.late_start is None else self.late_start

    @property
    def uses_threshold(self) -> bool:
        if self.retrieval == "auto":
            return self.method == "l2e"
        return self.retrieval == "threshold"

    def validate(self) -> None:
        if not 0.0 < self.inhibit_ratio <= 0.5:
            raise ConfigError("inhibit_ratio", f"must be in (0, 0.5], got {self.inhibit_ratio} (paper: 0.01-0.03)")
        if self.topk < 1:
            raise ConfigError("topk", f"must be >= 1, got {self.topk}")
        if self.reg_lambda < 0:
            raise ConfigError("reg_lambda", f"must be >= 0, got {self.reg_lambda} (paper: 1e-9 to 1e-11)")
        if self.delta <= 0:
            raise ConfigError("delta", f"must be > 0 (it keeps log((z-mu)^2 + delta) finite), got {self.delta}")
        if self.eps < 0:
            raise ConfigError("eps", f"must be >= 0, got {self.eps}")
        if self.forget_steps < 1:
            raise ConfigError("forget_steps", f"must be >= 1, got {self.forget_steps}")
        if self.late_start is not None and self.late_start < 1:
            raise ConfigError("late_start", f"must be >= 1 (or null for forget_steps), got {self.late_start}")
        if not 0.0 < self.threshold_lr <= 1.0:
            raise ConfigError("threshold_lr", f"must be in (0, 1] (the fraction of the way to the step's quantile "
                                              f"moved per step; default 0.5), got {self.threshold_lr}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError("max_nonfinite_steps", f"must be >= 1 (consecutive NaN/inf steps before the run "
                                                     f"stops), got {self.max_nonfinite_steps}")
        if self.rd_strength <= 0:
            raise ConfigError("rd_strength", f"must be > 0, got {self.rd_strength}")
        if self.num_features < 0:
            raise ConfigError("num_features", f"must be >= 0, got {self.num_features}")
        if self.eval_reference_score <= 0:
            raise ConfigError("eval_reference_score", f"must be > 0, got {self.eval_reference_score}")
        self._validate_layers()

    def _validate_layers(self) -> None:
        if isinstance(self.layers, str):
            if self.layers not in LAYER_PRESETS:
                raise ConfigError("layers", f"must be one of {list(LAYER_PRESETS)} or a list of 0-based layer "
                                            f"indices, got {self.layers!r}")
            return
        if not self.layers:
            raise ConfigError("layers", "empty list: give at least one 0-based layer index or 'mid2'")
        if any(i < 0 for i in self.layers):
            raise ConfigError("layers", f"indices must be >= 0 (0-based), got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("layers", f"duplicate layer index in {self.layers}")

    def resolve_layers(self, num_layers: int) -> list[int]:
        """0-based indices of the inhibited layers for a model with `num_layers` transformer layers."""
        self._validate_layers()
        if self.layers == "mid2":
            if num_layers < 2:
                raise ConfigError("layers", f"'mid2' needs at least 2 layers, the model has {num_layers}")
            return [num_layers // 2 - 1, num_layers // 2]
        if self.layers == "mid_third":
            if num_layers < 1:
                raise ConfigError("layers", f"'mid_third' needs at least 1 layer, the model has {num_layers}")
            count = max(1, round(num_layers / 3))
            start = (num_layers - count) // 2
            return list(range(start, start + count))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ConfigError("layers", f"indices {bad} out of range for a model with {num_layers} layers "
                                        f"(valid: 0..{num_layers - 1})")
        return sorted(self.layers)
