"""Rank-0 metrics: progress bar + console line, TensorBoard events, a JSONL log, optional Weights & Biases.

Every other rank gets a logger that does nothing, so the training loop never branches on the rank.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm


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
    ):
        self.enabled = enabled
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
            import wandb as wandb_lib  # optional dependency

            os.environ.setdefault("WANDB_MODE", wandb_mode)
            self._wandb = wandb_lib.init(project=wandb_project, dir=str(out), config=run_config or {})
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        """Record scalars for `step` (optimizer steps done). Non-finite values are kept as strings in JSONL."""
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
            line = _console_line(metrics)
            if self._bar is not None:
                self._bar.write(f"step {step}: {line}")
            else:
                print(f"step {step}: {line}", flush=True)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_histogram(tag, values, step)

    def advance(self, steps: int = 1, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()


_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)l2e/layer(?P<layer>\d+)/(?P<name>\w+)$")
_ABBREV = {"threshold": "thr", "selected_frac": "sel", "mean_score": "score", "frac_above_ref": "above_ref"}


def _console_line(metrics: dict[str, Any]) -> str:
    """`loss 6.1 | lr 0.001 | ... | L1[thr 5.2 sel 0.02 reg 0.003] L2[...]`: per-layer L2E figures grouped."""
    plain, layers = [], {}
    for key, value in metrics.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            plain.append(_fmt(key, value))
        else:
            tag = f"{match['prefix']}L{match['layer']}"
            layers.setdefault(tag, []).append(f"{_ABBREV.get(match['name'], match['name'])} {_short(value)}")
    groups = [f"{tag}[{' '.join(items)}]" for tag, items in layers.items()]
    return " | ".join(plain + ([" ".join(groups)] if groups else []))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt(key: str, value: Any) -> str:
    return f"{key.removeprefix('train/')} {_short(value)}"
