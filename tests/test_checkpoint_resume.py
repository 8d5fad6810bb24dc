"""Resume: after a real SIGKILL of a 2-process torchrun job, the run continues with exactly the loss sequence
of an uninterrupted run (fp32, CPU), for ZeRO 1 (TP=2 x DP=1) and ZeRO 3 (TP=1 x DP=2); the resumed run falls
back over a corrupt `latest` pointer and over a truncated shard of the newest checkpoint. A checkpoint of one
layout resumes on the other (TP, DP and ZeRO stage all change) with the uninterrupted runs' losses (1e-5).

Each layout's uninterrupted reference run saves every step and keeps all checkpoints: they are the sources of
the layout-change resumes and of tests/test_checkpoint_export.py."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, small_run_overrides
from tests.distributed import free_port

STEPS = 8
LAYOUTS = {  # name -> overrides; both run on 2 processes
    "tp2_zero1": {"parallel.tensor_parallel": 2, "deepspeed.zero_stage": 1},
    "dp2_zero3": {"parallel.tensor_parallel": 1, "deepspeed.zero_stage": 3},
}
KILL_TIMEOUT_S = 240


def _overrides(out: Path, data_cache: str, layout: str, keep_last_n: int) -> list[str]:
    return small_run_overrides(
        out,
        data_cache,
        **LAYOUTS[layout],
        **{"train.train_iters": STEPS, "train.save_interval": 1, "train.keep_last_n": keep_last_n},
    )


def _command(overrides: list[str]) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "launcher.pretrain", "--config", "configs/tiny.yaml", *sets,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def run_training(overrides: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(overrides), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_losses(metrics: Path, offset: int = 0) -> dict[int, float]:
    """step -> train/loss logged in metrics.jsonl from byte `offset` on (the later entry wins)."""
    with open(metrics, "rb") as f:
        f.seek(offset)
        records = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def resumed_step(stdout: str) -> int:
    match = re.search(r"resumed from \S+ \(step (\d+), ", stdout)
    assert match, f"the run did not resume:\n{stdout[-2000:]}"
    return int(match.group(1))


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, data_cache) -> dict[str, Path]:
    """Uninterrupted runs of both layouts (every checkpoint kept)."""
    runs = {}
    for layout in LAYOUTS:
        out = tmp_path_factory.mktemp(f"ref-{layout}")
        run_training(_overrides(out, data_cache, layout, keep_last_n=0))
        runs[layout] = out
    return runs


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_at_checkpoint(overrides: list[str], ckpt_dir: Path, step: int) -> None:
    """Start the job and SIGKILL it, torchrun and every rank (torchrun starts each rank in a session of its
    own, so its process group alone is not enough), once the checkpoint of `step` is in place."""
    proc = subprocess.Popen(_command(overrides), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not (ckpt_dir / f"global_step{step}").is_dir():
            assert proc.poll() is None, f"the run exited (rc {proc.returncode}) before checkpoint {step}"
            assert time.monotonic() < deadline, f"no checkpoint {step} after {KILL_TIMEOUT_S} s"
            time.sleep(0.02)
    finally:
        tree = _process_tree(proc.pid)
        for pid in tree:
            try:
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(tree) >= 3, f"expected torchrun and 2 ranks, killed {tree}"
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("layout, damage", [("tp2_zero1", "latest"), ("dp2_zero3", "shard")])
def test_sigkill_then_resume_is_exact(layout, damage, reference_runs, tmp_path, data_cache):
    reference = read_losses(reference_runs[layout] / "metrics.jsonl")
    assert sorted(reference) == list(range(1, STEPS + 1))
    kill_step = random.Random().randint(2, STEPS - 3)
    overrides = _overrides(tmp_path, data_cache, layout, keep_last_n=2)
    ckpt_dir = tmp_path / "checkpoints"
    _kill_at_checkpoint(overrides, ckpt_dir, kill_step)
    newest = max(ckpt_dir.glob("global_step*/manifest.json"), key=lambda m: int(m.parent.name[11:])).parent.name
    if damage == "latest":  # a garbled pointer: the newest intact checkpoint is used
        (ckpt_dir / "latest").write_text("\x00garbage")
        expect_fallback = "latest is corrupt"
    else:  # a truncated shard in the newest checkpoint: the one before it is used
        shard = sorted((ckpt_dir / newest).glob("*optim_states.pt"))[-1]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        expect_fallback = f"skipping checkpoint {newest}"
    offset = (tmp_path / "metrics.jsonl").stat().st_size
    proc = run_training(overrides)
    assert expect_fallback in proc.stderr, proc.stderr[-3000:]
    start = resumed_step(proc.stdout)
    if damage == "shard":
        assert start < int(newest.removeprefix("global_step"))
    assert start >= kill_step - 1
    resumed = read_losses(tmp_path / "metrics.jsonl", offset)
    assert sorted(resumed) == list(range(start + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference[step], f"killed at {kill_step}, resumed at {start}: step {step} {loss} != {reference[step]}"


@pytest.mark.parametrize("source, target", [("tp2_zero1", "dp2_zero3"), ("dp2_zero3", "tp2_zero1")])
def test_resume_on_another_layout(source, target, reference_runs, tmp_path, data_cache):
    start = 4
    src = reference_runs[source] / "checkpoints" / f"global_step{start}"
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(src, tmp_path / "checkpoints" / src.name)
    (tmp_path / "checkpoints" / "latest").write_text(src.name)
    proc = run_training(_overrides(tmp_path, data_cache, target, keep_last_n=1))
    assert resumed_step(proc.stdout) == start
    assert "resharded from TP=" in proc.stdout
    resumed = read_losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == list(range(start + 1, STEPS + 1))
    for layout in (source, target):  # the uninterrupted runs of both layouts
        reference = read_losses(reference_runs[layout] / "metrics.jsonl")
        for step, loss in resumed.items():
            assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (layout, step, loss, reference[step])
