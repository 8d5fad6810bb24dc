"""The console form of the logged metrics: one plain, timestamped line per log interval.

    2026-01-31T12:00:05Z train step 50/200 | tokens 102K/410K | loss 6.214 | lr 1.94e-03 |
        tok/s 9.81K (last 10 steps) | TFLOP/s/device 0.0312 | step_time 0.209s | grad_norm 0.812 | ETA 0:00:31 |
        l2e L1[thr 5.21 sel 0.02 reg 0.0031 score 1.7] L2[...]          (one line in the log)

Fields are `name value` pairs separated by ` | `, so a log can be grepped and parsed. Every figure is kept in
metrics.jsonl and TensorBoard; the console leaves out what is only noise there (a zero count of non-finite
steps). A progress bar is drawn only on a terminal: in a file its carriage-return redraws are megabytes of
garbage.
"""

from __future__ import annotations

import math
import re
from typing import Any, TextIO

from l2e_dist.console import utc_timestamp

SEPARATOR = " | "
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)l2e/layer(?P<layer>\d+)/(?P<name>\w+)$")
_ABBREV = {"threshold": "thr", "selected_frac": "sel", "mean_score": "score", "frac_above_ref": "above_ref"}
_ZERO_IS_NOISE = {"nonfinite_steps", "skipped_steps"}  # counts whose usual value 0 says nothing on the console
# Keys the train line shows in a fixed place and form (the rest follow as `name value`).
_PLACED = {"train/loss", "train/lr", "train/tokens", "train/tokens_per_s", "train/tflops_per_device", "train/mfu",
           "train/step_time_s", "train/grad_norm", "train/max_rss_gib", "train/max_mem_gib"}


def use_progress_bar(allowed: bool, stream: TextIO) -> bool:
    """A redrawn bar only where a person watches it: `logging.progress_bar` and `stream` is a terminal."""
    isatty = getattr(stream, "isatty", None)
    return bool(allowed and isatty is not None and isatty())


def human_count(value: float) -> str:
    """1234 -> 1.23K, 3e11 -> 300B: three significant digits and an SI-style suffix (tokens, tokens/s)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= 0.9995 * scale:  # what rounds to 1000 of the unit below is 1 of this one
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    """`H:MM:SS`, with days in front past 24 h (`3d 04:05:06`); `?` when not known yet."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {hours:02d}:{rest // 60:02d}:{rest % 60:02d}" if days else text


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def train_line(step: int, total_steps: int, metrics: dict[str, Any], *, total_tokens: float | None = None,
               window_steps: int | None = None, eta_s: float | None = None, timestamp: str | None = None) -> str:
    """The console line of one log interval's training metrics (see the module docstring)."""
    fields = [f"step {step}/{total_steps}"]
    if "train/tokens" in metrics:
        total = f"/{human_count(total_tokens)}" if total_tokens else ""
        fields.append(f"tokens {human_count(metrics['train/tokens'])}{total}")
    if "train/loss" in metrics:
        fields.append(f"loss {metrics['train/loss']:.4f}")
    if "train/lr" in metrics:
        fields.append(f"lr {metrics['train/lr']:.3e}")
    if "train/tokens_per_s" in metrics:
        window = f" (last {window_steps} step{'s' if window_steps != 1 else ''})" if window_steps else ""
        fields.append(f"tok/s {human_count(metrics['train/tokens_per_s'])}{window}")
    if "train/tflops_per_device" in metrics:
        fields.append(f"TFLOP/s/device {metrics['train/tflops_per_device']:.3g}")
    if metrics.get("train/mfu") is not None:
        fields.append(f"MFU {100 * metrics['train/mfu']:.1f}%")
    if "train/step_time_s" in metrics:
        fields.append(f"step_time {metrics['train/step_time_s']:.3g}s")
    if "train/grad_norm" in metrics:
        fields.append(f"grad_norm {metrics['train/grad_norm']:.4g}")
    for key, name in (("train/max_mem_gib", "gpu_mem"), ("train/max_rss_gib", "rss")):
        if key in metrics:
            fields.append(f"{name} {metrics[key]:.3g}GiB")
    if eta_s is not None:
        fields.append(f"ETA {duration(eta_s)}")
    fields += _other_fields({k: v for k, v in metrics.items() if k not in _PLACED})
    return f"{timestamp or utc_timestamp()} train {SEPARATOR.join(fields)}"


def valid_line(step: int, total_steps: int, metrics: dict[str, Any], *, timestamp: str | None = None) -> str:
    """The console line of a validation pass: `<time> valid step 100/200 | loss 5.9 | l2e L1[above_ref ...]`."""
    plain = {k.removeprefix("valid/"): v for k, v in metrics.items()}
    loss = [f"loss {plain.pop('loss'):.4f}"] if isinstance(plain.get("loss"), float) else []
    fields = [f"step {step}/{total_steps}", *loss, *_other_fields(plain)]
    return f"{timestamp or utc_timestamp()} valid {SEPARATOR.join(fields)}"


def _other_fields(metrics: dict[str, Any]) -> list[str]:
    """`name value` for plain keys; per-layer L2E figures grouped as `l2e L1[thr 5.2 sel 0.02] L2[...]`."""
    plain, layers = [], {}
    for key, value in metrics.items():
        match = _LAYER_KEY.match(key)
        name = match["name"] if match else key.rpartition("/")[2]
        if name in _ZERO_IS_NOISE and isinstance(value, (int, float)) and value == 0:
            continue
        if match is None:
            plain.append(f"{key.removeprefix('train/')} {short(value)}")
        else:
            layers.setdefault(f"L{match['layer']}", []).append(f"{_ABBREV.get(name, name)} {short(value)}")
    groups = [f"{tag}[{' '.join(items)}]" for tag, items in layers.items()]
    return plain + ([f"l2e {' '.join(groups)}"] if groups else [])
