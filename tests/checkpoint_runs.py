"""Real 2-process training runs (torchrun subprocesses) for the checkpoint tests, and their reference runs.

The uninterrupted reference run of each layout saves every step and keeps every checkpoint; it is made once
per pytest session (memoised on disk under the session's base temp dir) and shared by
tests/test_checkpoint_resume.py (exact resume, layout changes) and tests/test_convert_hf.py (HF export).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from l2e_dist.parallel.launch_env import free_port
from tests.conftest import ROOT, small_run_overrides

STEPS = 8
LAYOUTS = {  # both on 2 processes
    "tp2_zero1": {"parallel.tensor_parallel": 2, "deepspeed.zero_stage": 1},
    "dp2_zero3": {"parallel.tensor_parallel": 1, "deepspeed.zero_stage": 3},
}


def run_overrides(out: Path, data_cache: str, layout: str, keep_last_n: int) -> list[str]:
    """The tiny model of small_run_overrides, STEPS steps, a checkpoint every step."""
    return small_run_overrides(
        out,
        data_cache,
        **LAYOUTS[layout],
        **{"train.train_iters": STEPS, "train.save_interval": 1, "train.keep_last_n": keep_last_n},
    )


def torchrun_command(overrides: list[str]) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "launcher.pretrain", "--config", "configs/tiny.yaml", *sets,
    ]  # fmt: skip


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def run_training(overrides: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        torchrun_command(overrides), cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_losses(metrics: Path, offset: int = 0) -> dict[int, float]:
    """step -> train/loss logged in metrics.jsonl from byte `offset` on (a later entry of a step wins)."""
    with open(metrics, "rb") as f:
        f.seek(offset)
        records = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def reference_run(layout: str, base: Path, data_cache: str) -> Path:
    """Output dir of the uninterrupted run of `layout` (made on first use in this session)."""
    out = base / f"checkpoint-reference-{layout}"
    done = out / "reference-complete"
    if not done.is_file():
        run_training(run_overrides(out, data_cache, layout, keep_last_n=0))
        assert sorted(read_losses(out / "metrics.jsonl")) == list(range(1, STEPS + 1))
        done.write_text("ok\n")
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (directories by their listing)."""
    digests = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        digests[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digests
