"""The preemptible trainer run that tests/test_preemption_resume.py (local ranks) and tests/test_slurm.py (Slurm
jobs) start as real processes, and the time bound within which a rank's failure must end the others.

A bound is the configured intervals on the way from the failure to the survivors' exit, plus one margin for
what load stretches (noticing, tearing down, exiting): small enough to show that the watchdog or the launcher
ended the job, far below the 300 s collective timeout a hung survivor would wait for.
"""

from __future__ import annotations

from pathlib import Path

from l2e_dist.training.preemption import _STORE_GRACE_S
from tests.conftest import small_run_overrides

# A loaded 2-core machine runs 3-5x slower than an idle one, where a failing world's reports, teardown and exit
# take about 3 s: the margin is the slow end of that.
LOAD_MARGIN_S = 5 * 3.0


def preemptible_overrides(out: Path, data_cache: str, steps: int, watchdog_s: float, **extra: object) -> list[str]:
    """The tiny model of small_run_overrides with L2E on, `steps` steps, a stop check every step and a
    `watchdog_s` watchdog; `extra` overrides win."""
    return small_run_overrides(
        out,
        data_cache,
        **{
            "l2e.method": "l2e",
            "l2e.forget_steps": 1,  # L2E scores (and inhibits) from the second step of these short runs
            "train.train_iters": steps,
            "train.preempt_check_every": 1,
            "parallel.watchdog_timeout_s": watchdog_s,
            **extra,
        },
    )


def pretrain_args(overrides: list[str]) -> list[str]:
    """`launcher.pretrain`'s arguments for configs/tiny.yaml (relative: run with cwd at the repository root)."""
    return ["--config", "configs/tiny.yaml", *[arg for item in overrides for arg in ("--set", item)]]


def watchdog_poll_s(watchdog_s: float) -> float:
    """The watchdog's default poll interval for a timeout (l2e_dist.training.preemption.Watchdog)."""
    return min(5.0, max(0.2, watchdog_s / 10))


def failure_bound_s(watchdog_s: float | None, after_s: float = 0.0) -> float:
    """Seconds from a rank's failure until the others have exited. With a `watchdog_s` watchdog (a frozen rank,
    which raises no error anywhere): its deadline, counted from the last heartbeat before the failure, one poll and
    rank 0's grace for its peers' reports; then `after_s` of launcher intervals (Slurm's KillWait), and the
    load margin."""
    detect = 0.0 if watchdog_s is None else watchdog_s + watchdog_poll_s(watchdog_s) + _STORE_GRACE_S
    return detect + after_s + LOAD_MARGIN_S
