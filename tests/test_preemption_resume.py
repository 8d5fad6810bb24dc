"""The real trainer on 2 local ranks, no Slurm: a SIGUSR1 to one rank stops every rank at the same step with a
checkpoint and exit code 75; running the same command again finishes with exactly the losses of an
uninterrupted run. A rank that dies or freezes makes the survivor exit non-zero within the watchdog bound,
naming the silent rank.

The ranks are started directly (RANK/WORLD_SIZE/MASTER_* in the environment, one process each) rather than by
torchrun: torchrun turns any non-zero worker exit into its own exit code 1 and SIGTERMs the other workers, which
would hide both the 75 and the watchdog's diagnosis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2e_dist.parallel.launch_env import free_port
from tests.conftest import ROOT, final_loss, logged_metrics
from tests.distributed import rank_env
from tests.preemptible_run import failure_bound_s, preemptible_overrides, pretrain_args

WORLD_SIZE = 2
STEPS = 30
WATCHDOG_S = 8
# From the failure: the watchdog's deadline, poll and grace, and the load margin (tests/preemptible_run.py).
WATCHDOG_BOUND_S = failure_bound_s(WATCHDOG_S)

pytestmark = pytest.mark.slow


def trainer_command(out: Path, data_cache: str, **extra: object) -> list[str]:
    """`python -m launcher.pretrain` on the tiny model with L2E on, a stop check every step."""
    overrides = preemptible_overrides(out, data_cache, STEPS, WATCHDOG_S, **extra)
    return [sys.executable, "-m", "launcher.pretrain", *pretrain_args(overrides)]


class Ranks:
    """One process per rank, each in a session of its own (a signal reaches exactly one rank)."""

    def __init__(self, command: list[str], log_dir: Path, name: str, world_size: int = WORLD_SIZE):
        self.logs = [log_dir / f"{name}-rank{rank}.log" for rank in range(world_size)]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
        port = free_port()
        self.procs = []
        for rank, log in enumerate(self.logs):
            env = {**base, **rank_env(rank, world_size, port), "PYTHONPATH": str(ROOT)}
            with open(log, "w") as handle:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def text(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait_for_step(self, step: int, timeout_s: float = 240) -> None:
        """Until rank 0 has logged `step` (fails if a rank exits first)."""
        end = time.monotonic() + timeout_s
        while not re.search(rf" train step {step}/\d+ \| ", self.text(0), flags=re.M):
            exited = [p.returncode for p in self.procs if p.poll() is not None]
            assert not exited and time.monotonic() < end, f"no step {step} (exits {exited}):\n{self.text(0)}"
            time.sleep(0.1)

    def wait(self, timeout_s: float = 300) -> list[int]:
        try:
            return [proc.wait(timeout=timeout_s) for proc in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # a frozen (SIGSTOPped) rank still dies of SIGKILL
                proc.wait()


@pytest.fixture
def launch():
    """Start a world of ranks; whatever is still running when the test ends is killed."""
    started: list[Ranks] = []

    def start(command: list[str], log_dir: Path, name: str, world_size: int = WORLD_SIZE) -> Ranks:
        started.append(Ranks(command, log_dir, name, world_size))
        return started[-1]

    yield start
    for ranks in started:
        ranks.kill()


def test_usr1_to_one_rank_checkpoints_exits_75_and_rerun_matches_uninterrupted(
    launch, tmp_path: Path, data_cache: str
) -> None:
    reference = launch(trainer_command(tmp_path / "reference", data_cache), tmp_path, "reference")
    command = trainer_command(tmp_path / "run", data_cache)
    first = launch(command, tmp_path, "first")
    first.wait_for_step(3)
    first.procs[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks must agree to stop
    codes = first.wait()
    assert codes == [75] * WORLD_SIZE, (codes, first.text(0), first.text(1))
    stopped = int(
        re.search(r" l2e-dist: stopped at step (\d+) on a peer signal; requeued=False$", first.text(0), re.M)[1]
    )
    assert "rank 1: received SIGUSR1" in first.text(1)
    assert 4 <= stopped < STEPS, first.text(0)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"global_step{stopped}"
    assert "final loss" not in first.text(0)

    second = launch(command, tmp_path, "second")
    assert second.wait() == [0] * WORLD_SIZE, second.text(0)
    assert f"resume_step={stopped}" in second.text(0)
    assert reference.wait() == [0] * WORLD_SIZE, reference.text(0)

    # Every step's loss, grad norm, learning rate and L2E statistic, bit for bit.
    resumed, uninterrupted = logged_metrics(tmp_path / "run"), logged_metrics(tmp_path / "reference")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert resumed == uninterrupted
    assert final_loss(second.text(0)) == final_loss(reference.text(0))


def test_signal_that_only_takes_effect_at_the_last_step_lets_the_run_finish(
    launch, tmp_path: Path, data_cache: str
) -> None:
    # The only stop check is at the last step: a signal arriving any time before it takes effect there.
    steps = 10
    command = trainer_command(
        tmp_path / "run", data_cache, **{"train.train_iters": steps, "train.preempt_check_every": steps}
    )
    ranks = launch(command, tmp_path, "run", world_size=1)
    ranks.wait_for_step(1)
    ranks.procs[0].send_signal(signal.SIGUSR1)
    assert ranks.wait() == [0], ranks.text(0)
    text = ranks.text(0)
    assert "rank 0: received SIGUSR1" in text and "stopped at step" not in text
    assert float(final_loss(text)) > 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"global_step{steps}"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_dead_or_frozen_rank_ends_the_survivor_within_the_watchdog_bound(
    launch, tmp_path: Path, data_cache: str, how: signal.Signals
) -> None:
    command = trainer_command(tmp_path / "run", data_cache, **{"train.train_iters": 100_000})
    ranks = launch(command, tmp_path, "run")
    ranks.wait_for_step(3)
    failed_at = time.monotonic()
    ranks.procs[1].send_signal(how)
    code = ranks.procs[0].wait(timeout=120)
    took = time.monotonic() - failed_at
    text = ranks.text(0)
    assert code != 0, text
    assert took < WATCHDOG_BOUND_S, (took, text)
    if how == signal.SIGSTOP:  # no error anywhere: only the watchdog ends the survivor, and it names the rank
        assert re.search(r"rank 0: watchdog: suspects: rank 1 (silent|never reported)", text), text
    else:  # the dead rank's sockets close: gloo fails the survivor's next collective at once
        assert re.search(r"Connection (reset|closed) by peer", text), text
