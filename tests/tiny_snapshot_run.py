"""A one-process tiny training run with weights-only snapshots at chosen steps (the evaluation and publishing
tests' input), and our own model's forward on a snapshot's weights (the reference transformers is checked
against)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, small_run_overrides

SNAPSHOT_STEPS = (0, 4, 8)


def train_snapshot_run(out: Path, data_cache: str, seed: int = 1234) -> Path:
    """configs/tiny.yaml at the small test size, 8 steps, snapshots at SNAPSHOT_STEPS, through the real CLI."""
    overrides = small_run_overrides(out, data_cache, **{
        "train.train_iters": SNAPSHOT_STEPS[-1], "train.extra_save_steps": list(SNAPSHOT_STEPS),
        "train.seed": seed, "train.log_interval": 4})  # fmt: skip
    sets = [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "launcher.pretrain", "--config", "configs/tiny.yaml", *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == sorted(f"step{s}" for s in SNAPSHOT_STEPS)
    return out


def our_logits(snapshot: str, tokens: torch.Tensor, weight_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Our GPTNeoX (TP=1, fp32) forward with the snapshot's weights, loaded as train.init_from loads them; with
    `weight_dtype` each weight is first rounded to it (what an export in that dtype stores). A world of one:
    it runs in the calling process."""
    from l2e_dist.checkpoint.convert import WeightSource, load_init_weights
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)
    try:
        model = GPTNeoX(WeightSource(snapshot).model_config).eval()
        load_init_weights(model, snapshot, 0, 1)
        with torch.no_grad():
            if weight_dtype is not None:
                for param in model.parameters():
                    param.copy_(param.to(weight_dtype).float())
            return model(tokens)
    finally:
        destroy_process_groups()
