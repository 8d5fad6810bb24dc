"""PreemptionHandler: signal -> flag, one agreed stop step across ranks, and the Slurm requeue call."""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from l2e_dist.parallel.launch_env import free_port
from l2e_dist.training.preemption import PreemptionHandler


@pytest.fixture
def restore_usr1():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_signal_sets_flag_without_stopping_the_process(restore_usr1) -> None:
    handler = PreemptionHandler(signals=("SIGUSR1",), check_every=5)
    handler.install()
    assert not handler.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.received == "SIGUSR1"
    assert handler.should_stop()
    assert not handler.should_stop(step=7)  # between checks: no decision, no collective
    assert handler.should_stop(step=10)


def test_check_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="check_every"):
        PreemptionHandler(check_every=0)


def _agreement_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    handler = PreemptionHandler(check_every=3)
    handler.install()
    decisions = []
    for step in range(1, 10):
        if rank == 1 and step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        decisions.append(handler.should_stop(step=step))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps([handler.received, decisions]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_rank_signalled_all_ranks_stop_at_the_same_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _agreement_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    results = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    expected = [step in (6, 9) for step in range(1, 10)]  # checks at 3, 6, 9; the signal came at step 4
    assert results == [[None, expected], ["SIGUSR1", expected]]


@pytest.fixture
def fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An `scontrol` on PATH that records its arguments and reports Requeue=$FAKE_REQUEUE."""
    log = tmp_path / "scontrol.log"
    script = tmp_path / "scontrol"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'if [ "$1" = show ]; then echo "JobId=$4 JobName=l2e Requeue=$FAKE_REQUEUE Restarts=0"; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("RANK", "0")
    return log


def test_requeue_calls_scontrol_on_rank_zero(fake_scontrol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_REQUEUE", "1")
    assert PreemptionHandler().requeue()
    assert fake_scontrol.read_text().splitlines() == ["show job -o 77", "requeue 77"]


def test_requeue_refused_when_job_not_requeueable(
    fake_scontrol: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_REQUEUE", "0")
    assert not PreemptionHandler().requeue()
    assert fake_scontrol.read_text().splitlines() == ["show job -o 77"]
    assert "--requeue" in capfd.readouterr().err


def test_requeue_is_a_noop_off_rank_zero_and_outside_slurm(
    fake_scontrol: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_REQUEUE", "1")
    monkeypatch.setenv("RANK", "1")
    assert not PreemptionHandler().requeue()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not PreemptionHandler().requeue()
    assert not fake_scontrol.exists()
