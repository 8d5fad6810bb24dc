"""The README's main job: 2 processes through the `deepspeed` launcher on the tiny config, on CPU.
Loss falls, a verified checkpoint and TensorBoard events are written. (Its wall time is a benchmark's business,
not a test's: the 600 s timeout only stops a hang.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from l2e_dist.checkpoint.manifest import find_resume_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the README's 200-step 2-rank run


def test_readme_default_run(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", "--set", f"train.output_dir={out}", "--set", f"data.cache_dir={data_cache}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world=2" in proc.stdout and "l2e=l2e" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0, train_losses
    assert any(k.startswith("l2e/layer") for r in records for k in r)
    assert find_resume_checkpoint(out / "checkpoints") is not None
    assert list(Path(out / "tensorboard").glob("events.out.tfevents.*"))
