"""Stopping a run whose loss has diverged, per precision.

- fp32: the first non-finite step loss stops the run (nothing skips the update: the weights are lost).
- bf16: DeepSpeed skips an optimizer step whose gradient norm is not finite, so one bad batch is survivable;
  `train.nonfinite_patience` consecutive steps with a non-finite loss (or a skipped update) stop the run.
- fp16: overflowing steps are normal (dynamic loss scaling halves the scale and skips the step); the run is
  lost only when the scale sits at its minimum and the steps still overflow, `train.nonfinite_patience` steps
  in a row. DeepSpeed's own bare "loss scale already at minimum" exception is switched off so that this one
  line, naming the step and the fix, is what the user sees.
"""

from __future__ import annotations

import math

FP16_MIN_LOSS_SCALE = 1.0  # deepspeed_config's fp16.min_loss_scale


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite: the run stops (exit 1) with this one-line message."""


class NonFiniteGuard:
    def __init__(self, precision: str, patience: int, min_loss_scale: float = FP16_MIN_LOSS_SCALE):
        self.precision = precision
        self.patience = patience
        self.min_loss_scale = min_loss_scale
        self.streak = 0  # consecutive bad steps so far
        self.skipped_steps = 0  # steps whose update DeepSpeed skipped, over the run

    def after_step(self, step: int, loss: float, step_applied: bool, loss_scale: float | None) -> None:
        """Called once per optimizer step with its mean LM loss (this rank's), whether DeepSpeed applied the
        update, and the current fp16 loss scale. Raises TrainingDiverged when the run cannot recover."""
        finite = math.isfinite(loss)
        if not step_applied:
            self.skipped_steps += 1
        if self.precision == "fp32":
            if not finite:
                raise TrainingDiverged(f"loss is {loss} at step {step} in fp32: lower optimizer.lr (or raise "
                                       "optimizer.warmup_fraction) and restart from the last checkpoint")
            return
        if self.precision == "bf16":
            bad = not finite or not step_applied
            what = "non-finite loss (or gradient)"
            fix = "lower optimizer.lr"
        else:  # fp16: an overflow only counts once the scale cannot go lower
            at_minimum = loss_scale is not None and loss_scale <= self.min_loss_scale
            bad = (not step_applied or not finite) and at_minimum
            what = f"overflow at the minimum fp16 loss scale {self.min_loss_scale:g}"
            fix = "use deepspeed.precision=bf16 or lower optimizer.lr"
        self.streak = self.streak + 1 if bad else 0
        if self.streak >= self.patience:
            raise TrainingDiverged(
                f"{self.streak} consecutive steps with {what} in {self.precision}, up to step {step} "
                f"(loss {loss}; train.nonfinite_patience={self.patience}): {fix} and restart from the last "
                "checkpoint"
            )


def disable_deepspeed_min_scale_error(engine) -> None:
    """DeepSpeed's dynamic loss scaler raises a bare Exception at the minimum scale; NonFiniteGuard decides."""
    for owner in (engine.optimizer, getattr(engine.optimizer, "loss_scale_config", None)):
        scaler = getattr(owner, "loss_scaler", None)
        if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
            scaler.raise_error_at_min_scale = False


def optimizer_loss_scale(engine) -> float | None:
    """The current fp16 loss scale of a DeepSpeed engine's optimizer (None without one)."""
    optimizer = engine.optimizer
    config = getattr(optimizer, "loss_scale_config", None)
    if config is not None:
        return float(config.cur_scale)
    scale = getattr(optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    return None if scale is None else float(scale)
