"""Rank-0 metrics: the console (plain lines in a log file, a progress bar on a terminal), TensorBoard events,
a JSONL log, optional Weights & Biases (continuing the same W&B run when a job is requeued or resumed).

Every other rank gets a logger that does nothing, so the training loop never branches on the rank.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from l2e_dist.console import write_line
from l2e_dist.fileio import atomic_write_text
from l2e_dist.training.progress import short, train_line, use_progress_bar, valid_line

WANDB_ID_FILE = "wandb_run_id"  # in output_dir: a resumed or requeued job logs into the same W&B run


class MetricsLogger:
    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "l2e-dist",
        wandb_mode: str = "offline",
        progress_bar: bool = True,
        run_config: dict | None = None,
        tokens_per_step: int | None = None,
    ):
        self.enabled = enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.total_tokens = total_steps * tokens_per_step if tokens_per_step else None
        self._t0 = time.monotonic()  # ETA: wall time per step so far, eval and checkpoint writes included
        self._tb = self._wandb = self._bar = None
        self._jsonl = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb:
            self._wandb = init_wandb(out, wandb_project, wandb_mode, run_config or {})
        if use_progress_bar(progress_bar, sys.stdout):
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stdout)

    @property
    def has_progress_bar(self) -> bool:
        return self._bar is not None

    def log(self, step: int, metrics: dict[str, Any], console: bool = True, window_steps: int | None = None) -> None:
        """Record scalars for `step` (optimizer steps done). Non-finite values are kept as strings in JSONL.
        `window_steps`: how many steps the rates (tokens/s, step time) were measured over, for their label."""
        if not self.enabled:
            return
        record = {
            "step": step,
            **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()},
        }
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if console:
            self._print(self.console_line(step, metrics, window_steps))

    def console_line(self, step: int, metrics: dict[str, Any], window_steps: int | None = None) -> str:
        if any(key.startswith("train/") for key in metrics):
            return train_line(step, self.total_steps, metrics, total_tokens=self.total_tokens,
                              window_steps=window_steps, eta_s=self.eta_s(step))
        return valid_line(step, self.total_steps, metrics)

    def eta_s(self, step: int) -> float | None:
        """Remaining steps x the wall time per step this process has taken so far (None before its first)."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (self.total_steps - step) * (time.monotonic() - self._t0) / done

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)  # above the bar, which is redrawn below it
        else:
            write_line(line)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_histogram(tag, values, step)

    def advance(self, steps: int = 1, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: short(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        """Idempotent: the bar is gone before the end-of-run summary prints."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()
        self._bar = self._tb = self._wandb = self._jsonl = None
        self.enabled = False


def wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of this output directory: read from `wandb_run_id`, or drawn and written there first."""
    path = output_dir / WANDB_ID_FILE
    if path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
    atomic_write_text(path, run_id + "\n")
    return run_id


def init_wandb(output_dir: Path, project: str, mode: str, run_config: dict):
    """wandb.init on the directory's run id with resume="allow": a requeued job continues its W&B run (and its
    step axis) instead of starting a new one; a fresh directory starts a new run under a new id."""
    import wandb as wandb_lib  # optional dependency (the `wandb` extra)

    os.environ.setdefault("WANDB_MODE", mode)
    return wandb_lib.init(project=project, dir=str(output_dir), config=run_config, id=wandb_run_id(output_dir),
                          name=output_dir.resolve().name, resume="allow")
