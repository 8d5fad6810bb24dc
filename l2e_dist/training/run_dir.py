"""The run's output directory at start-up: whose run it holds, whether it is finished, and its config.yaml.

`<output_dir>/config.yaml` is the resolved config of the run's latest launch (written atomically by rank 0;
`l2e-pretrain --config <output_dir>/config.yaml` repeats the run). A launch that resumes (train.resume, the
default) first compares its experiment keys (l2e_dist.checkpoint.identity) with config.yaml, or, for a run
directory written before config.yaml existed, with its newest checkpoint's config, and refuses another
experiment in one line. A run whose newest intact checkpoint is at train.train_iters (or later) is finished:
it is reported (`already complete at step N (<checkpoint>)`) and nothing is loaded, trained or written.
train.resume=false starts over in the directory and replaces config.yaml. config.yaml is the identity later
launches are held to: a deliberate change of an experiment key (the data moved: data.paths) is declared by
editing it there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
from l2e_dist.checkpoint.identity import RUN_CONFIG_FILE, check_same_experiment
from l2e_dist.checkpoint.manifest import TAG, CheckpointError, find_resume_checkpoint, from_rank0
from l2e_dist.config import config_to_dict
from l2e_dist.errors import UserError, environment_error_message
from l2e_dist.fileio import atomic_write_text
from l2e_dist.training.resolved import ResolvedRun

CONFIG_FILE = RUN_CONFIG_FILE
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class FinishedRun:
    step: int
    checkpoint: str


def open_run_dir(run: ResolvedRun, rank: int) -> FinishedRun | None:
    """Collective (every rank calls it; rank 0 reads and writes, the others take its answer). Raises the same
    UserError on every rank when output_dir holds another experiment; returns the finished run when there is
    nothing left to train; otherwise writes config.yaml and returns None."""
    answer: tuple[str, str | None, int | None] | None = None
    if rank == 0:
        try:
            finished = _inspect(run) if run.config.train.resume else None
            if finished is None:
                write_run_config(run)
            answer = ("ok", finished.checkpoint if finished else None, finished.step if finished else None)
        except UserError as exc:
            answer = ("error", str(exc), None)
        except OSError as exc:  # e.g. an unwritable output_dir: every rank must stop, not only rank 0
            answer = ("error", environment_error_message(exc) or f"{type(exc).__name__}: {exc}", None)
    status, text, step = from_rank0(answer)
    if status != "ok":
        error = CheckpointError(text)
        error.agreed = True
        raise error
    return FinishedRun(step, text) if text is not None and step is not None else None


def write_run_config(run: ResolvedRun) -> Path:
    out = Path(run.config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = "# The resolved config of this run's latest launch (l2e-pretrain --config <this file> repeats it).\n"
    body = yaml.safe_dump(config_to_dict(run.config), sort_keys=False, default_flow_style=None, width=120)
    return atomic_write_text(out / CONFIG_FILE, header + body)


def read_run_config(out_dir: Path) -> dict | None:
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a config written by l2e-pretrain: restore it, or delete it to "
                              "compare with the run's checkpoint instead")
    return saved


def _inspect(run: ResolvedRun) -> FinishedRun | None:
    """Rank 0: refuse another experiment; the finished run, if the newest intact checkpoint ends the run."""
    cfg = run.config
    out = Path(cfg.train.output_dir)
    saved = read_run_config(out)
    if saved is not None:
        check_same_experiment(saved, cfg, str(out / CONFIG_FILE))
    ckpt_dir = out / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return None
    with warnings.catch_warnings():  # a fallback is reported once, by the resume that follows
        warnings.simplefilter("ignore")
        ckpt = find_resume_checkpoint(ckpt_dir)  # sizes only: resume deep-verifies the files each rank reads
    if ckpt is None:
        return None
    if saved is None:  # a run directory from before config.yaml
        check_same_experiment(DeepSpeedCheckpoint(ckpt).client_state.get("config") or {}, cfg, str(ckpt))
    step = int(TAG.match(ckpt.name).group(1))
    return FinishedRun(step, str(ckpt)) if step >= cfg.train.train_iters else None
