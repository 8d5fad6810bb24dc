"""Resume: after a real SIGKILL of a 2-process torchrun job, the run continues with exactly the loss sequence
of an uninterrupted run (fp32, CPU), for ZeRO 1 (TP=2 x DP=1) and ZeRO 3 (TP=1 x DP=2); on the way, the resumed
run falls back over a corrupt `latest` pointer and over a truncated shard of the newest checkpoint, and keeps
only the last N checkpoints. A checkpoint of one layout resumes on the other (TP, DP and ZeRO stage all change)
with the losses of the uninterrupted runs of both layouts (1e-5)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from tests.checkpoint_runs import (
    LAYOUTS,
    STEPS,
    read_losses,
    reference_run,
    run_env,
    run_overrides,
    run_training,
    torchrun_command,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # torchrun runs of 2 ranks (the fast tier's resume: tests/test_l2e_training.py)

KILL_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, data_cache) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    return {layout: reference_run(layout, base, data_cache) for layout in LAYOUTS}


def resumed_step(stdout: str) -> int:
    match = re.search(r"resumed from \S+ \(step (\d+), ", stdout)
    assert match, f"the run did not resume:\n{stdout[-2000:]}"
    return int(match.group(1))


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
    proc = subprocess.Popen(torchrun_command(overrides), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
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


def _newest_complete(ckpt_dir: Path) -> str:
    return max(ckpt_dir.glob("global_step*/manifest.json"), key=lambda m: int(m.parent.name[11:])).parent.name


@pytest.mark.parametrize("layout, damage", [("tp2_zero1", "latest"), ("dp2_zero3", "shard")])
def test_sigkill_then_resume_is_exact(layout, damage, reference_runs, tmp_path, data_cache):
    reference = read_losses(reference_runs[layout] / "metrics.jsonl")
    # Seeded (reproducible), printed, and varied on purpose with L2E_TEST_SEED=<int>.
    seed = int(os.environ.get("L2E_TEST_SEED", "0")) + zlib.crc32(layout.encode())
    kill_step = random.Random(seed).randint(2, STEPS - 3)
    print(f"kill step {kill_step} (seed {seed}; set L2E_TEST_SEED to vary it)")
    overrides = run_overrides(tmp_path, data_cache, layout, keep_last_n=2)
    ckpt_dir = tmp_path / "checkpoints"
    _kill_at_checkpoint(overrides, ckpt_dir, kill_step)
    newest = _newest_complete(ckpt_dir)
    if damage == "latest":  # a garbled pointer: the newest intact checkpoint is used
        (ckpt_dir / "latest").write_text("\x00garbage")
        expect_event = "latest is corrupt"
    else:  # a truncated shard in the newest checkpoint: the one before it is used
        shard = sorted((ckpt_dir / newest).glob("*optim_states.pt"))[-1]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        expect_event = f"skipping checkpoint {newest}"
    offset = (tmp_path / "metrics.jsonl").stat().st_size
    proc = run_training(overrides)
    assert expect_event in proc.stdout, f"kill step {kill_step} (seed {seed}): " + proc.stdout[-3000:]
    start = resumed_step(proc.stdout)
    newest_step = int(newest.removeprefix("global_step"))
    assert start == (newest_step if damage == "latest" else newest_step - 1)
    assert kill_step - 1 <= start < STEPS
    resumed = read_losses(tmp_path / "metrics.jsonl", offset)
    assert sorted(resumed) == list(range(start + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference[step], f"killed at {kill_step}, resumed at {start}: step {step}: {loss} != {reference[step]}"
    kept = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())  # keep_last_n=2, no temporary leftovers
    assert kept == [f"global_step{STEPS - 1}", f"global_step{STEPS}"]


@pytest.mark.parametrize("source, target", [("tp2_zero1", "dp2_zero3"), ("dp2_zero3", "tp2_zero1")])
def test_resume_on_another_layout(source, target, reference_runs, tmp_path, data_cache):
    start = 4
    src = reference_runs[source] / "checkpoints" / f"global_step{start}"
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(src, tmp_path / "checkpoints" / src.name)
    (tmp_path / "checkpoints" / "latest").write_text(src.name)
    proc = run_training(run_overrides(tmp_path, data_cache, target, keep_last_n=1))
    assert resumed_step(proc.stdout) == start
    assert "resharded from TP=" in proc.stdout
    resumed = read_losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == list(range(start + 1, STEPS + 1))
    for layout in (source, target):  # the uninterrupted runs of both layouts
        reference = read_losses(reference_runs[layout] / "metrics.jsonl")
        for step, loss in resumed.items():
            assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (layout, step, loss, reference[step])
