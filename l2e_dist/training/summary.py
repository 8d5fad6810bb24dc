"""The end of a run on the console: what was trained, how it ended, where its outputs are, what to run next.

A log file's last lines are what a user reads first; they name every output directory of the run and the
commands that take it further (export to Hugging Face, evaluate), ready to copy.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from l2e_dist.checkpoint.snapshots import SNAPSHOT_DIR
from l2e_dist.console import log_event
from l2e_dist.training.metrics import WANDB_ID_FILE
from l2e_dist.training.progress import duration, human_count

EXAMPLE_TASKS = "lambada_openai,piqa,arc_easy"  # Pythia's zero-shot suite, in part


@dataclass(frozen=True)
class RunSummary:
    output_dir: Path
    start_step: int  # where this job started (a resumed one: its checkpoint's step)
    final_step: int
    tokens_per_step: int
    train_loss: float | None  # the last logged interval's mean
    valid_loss: float | None
    valid_step: int | None
    tensorboard: bool


def process_wall_s() -> float:
    """Wall seconds since this process started (start-up, data, compile and checkpoint writes included)."""
    import psutil  # a DeepSpeed dependency

    return max(time.time() - psutil.Process().create_time(), 0.0)


def summary_lines(summary: RunSummary, wall_s: float) -> list[str]:
    out, steps = summary.output_dir, summary.final_step - summary.start_step
    lines = [
        f"finished at step {summary.final_step} in {duration(wall_s)} wall: {steps} steps, "
        f"{human_count(steps * summary.tokens_per_step)} tokens in this job "
        f"({human_count(summary.final_step * summary.tokens_per_step)} since step 0)",
        "last train loss " + (f"{summary.train_loss:.4f} (step {summary.final_step})"
                              if summary.train_loss is not None else "n/a (no step logged)")
        + ", valid loss " + (f"{summary.valid_loss:.4f} (step {summary.valid_step})"
                             if summary.valid_loss is not None else "n/a (train.eval_interval=0)"),
    ]
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.is_file():
        lines.append(f"checkpoints: {ckpt_dir} (latest {latest.read_text().strip()})")
    snapshots = sorted((p for p in (out / SNAPSHOT_DIR).glob("step*") if p.name[4:].isdigit()),
                       key=lambda p: int(p.name[4:]))
    if snapshots:
        lines.append(f"snapshots: {out / SNAPSHOT_DIR} ({len(snapshots)}: {snapshots[0].name} .. {snapshots[-1].name})")
    lines.append(f"metrics: {out / 'metrics.jsonl'}")
    if summary.tensorboard and (out / "tensorboard").is_dir():
        lines.append(f"tensorboard: {out / 'tensorboard'} (view: tensorboard --logdir {shlex.quote(str(out))})")
    if (out / WANDB_ID_FILE).is_file():
        lines.append(f"wandb: run id {(out / WANDB_ID_FILE).read_text().strip()} (files under {out / 'wandb'})")
    run, hf = shlex.quote(str(out)), shlex.quote(str(out / "hf"))
    if latest.is_file():
        lines.append(f"next: l2e-convert to-hf {run} {hf}")
        lines.append(f"next: l2e-eval {run} --tasks {EXAMPLE_TASKS} --out {shlex.quote(str(out / 'eval'))}"
                     "   # every snapshot, or the latest checkpoint (docs/evaluation.md)")
    if snapshots:
        lines.append(f"next: l2e-convert to-hf {run} {shlex.quote(str(out / 'hf-repo'))} --all --git --dtype float16"
                     "   # a stepN branch per snapshot, as Pythia publishes (docs/publishing.md)")
    return lines


def log_summary(summary: RunSummary) -> None:
    """Rank 0's closing lines (`<time> l2e-dist: ...`)."""
    for line in summary_lines(summary, process_wall_s()):
        log_event(line)
