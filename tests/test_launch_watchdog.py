"""Fail fast: a dead or frozen rank makes the others exit non-zero within a bounded time, naming it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from l2e_dist.parallel.launch_env import free_port
from tests.distributed import rank_env
from tests.preemptible_run import failure_bound_s

REPO = Path(__file__).resolve().parents[1]
WATCHDOG_S = 4.0
DIST_TIMEOUT_S = 300  # what a survivor without the watchdog would wait for a frozen peer
# From the failure: the watchdog's deadline, poll and grace, and the load margin (tests/preemptible_run.py).
BOUND_S = failure_bound_s(WATCHDOG_S)


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_snippet(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.slow
def test_heartbeats_and_allowances_keep_the_process_alive() -> None:
    done = run_snippet(
        """
        import time
        from l2e_dist.training.preemption import start_watchdog
        watchdog = start_watchdog(1.0)
        for step in range(15):
            time.sleep(0.2)
            watchdog.heartbeat(step)
        watchdog.heartbeat(15, phase="checkpoint", allow_s=4.0)
        time.sleep(2.0)  # longer than the timeout, inside the allowance
        watchdog.stop()
        print("survived")
        """
    )
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr


def test_missing_heartbeat_exits_nonzero_naming_rank_step_and_phase() -> None:
    done = run_snippet(
        """
        import time
        from l2e_dist.training.preemption import start_watchdog
        watchdog = start_watchdog(1.0)
        watchdog.heartbeat(7, phase="forward")
        time.sleep(30)
        """
    )
    assert done.returncode == 1
    assert "rank 0: watchdog: no heartbeat for 1 s (step 7, phase 'forward')" in done.stderr


def launch_probe_world(tmp_path: Path, world_size: int, how: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**base_env(), **rank_env(rank, world_size, port)}
        cmd = [
            sys.executable,
            "-m",
            "tests.dist_probe",
            "--steps",
            "200",
            "--step-sleep",
            "0.05",
            "--output-dir",
            str(tmp_path),
            "--watchdog-s",
            str(WATCHDOG_S),
            "--dist-timeout-s",
            str(DIST_TIMEOUT_S),
            "--fail-rank",
            str(world_size - 1),
            "--fail-step",
            "4",
            "--fail-how",
            how,
        ]
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def wait_for_survivors(procs: list[subprocess.Popen], deadline_s: float) -> list[float]:
    """Exit times of all but the failing (last) rank."""
    exits: dict[int, float] = {}
    end = time.time() + deadline_s
    while len(exits) < len(procs) - 1 and time.time() < end:
        for rank, proc in enumerate(procs[:-1]):
            if rank not in exits and proc.poll() is not None:
                exits[rank] = time.time()
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # a frozen (SIGSTOP) rank still needs SIGKILL
        proc.wait()
    assert len(exits) == len(procs) - 1, "surviving ranks did not exit"
    return [exits[rank] for rank in range(len(procs) - 1)]


# A frozen rank only: a killed one (its sockets close, gloo fails the survivor at once) is covered with the real
# trainer by tests/test_preemption_resume.py and under Slurm by tests/test_slurm.py.
@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop"])
def test_failed_rank_makes_the_others_exit_nonzero_within_bound(tmp_path: Path, how: str) -> None:
    procs = launch_probe_world(tmp_path, world_size=2, how=how)
    (exit_time,) = wait_for_survivors(procs, deadline_s=180)
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    failed_at = float(re.search(r"rank 1 failing \(\w+\) at step 4 time ([\d.]+)", logs[1]).group(1))
    assert procs[0].returncode != 0, logs[0]
    assert exit_time - failed_at < BOUND_S, (exit_time - failed_at, logs[0])
    if how == "stop":
        # A frozen rank raises no error anywhere: only the watchdog ends the others, and says who it was.
        assert "rank 0: watchdog: no heartbeat" in logs[0]
        assert re.search(r"suspects: rank 1 (silent|never reported)", logs[0]), logs[0]
