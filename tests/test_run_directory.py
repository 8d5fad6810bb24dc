"""One writer per run directory (docs/launching.md).

Ranks end with their launcher: under torchrun, the DeepSpeed launcher and mpirun, a SIGKILL of the launcher
process alone ends both training ranks within a bound, and `latest` names an intact checkpoint. The run lock:
a second run on a busy output_dir is refused in one line (exit 2 on every rank) without touching a byte of the
first's directory, `--dry-run` ignores the lock, and after the whole first job is SIGKILLed its stale lock is
taken over and the resume matches an uninterrupted run exactly. Unit tests of the lock: live, stale, dead,
requeued and unreadable holders, racing takers, a lost lock, the launcher detection and the death signal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from l2e_dist.checkpoint.ds_files import safe_load
from l2e_dist.checkpoint.manifest import list_checkpoints, verify_checkpoint
from l2e_dist.config import load_config
from l2e_dist.errors import UserError
from l2e_dist.parallel.launch_env import free_port
from l2e_dist.parallel.launcher_watch import POLL_S, detect_launcher
from l2e_dist.training import run_lock
from l2e_dist.training.run_lock import (
    LOCK_NAME,
    STALE_AFTER_BEATS,
    RunDirectoryBusy,
    acquire,
    hold_run_directory,
    read_lock,
    this_process,
)
from tests.checkpoint_runs import (
    STEPS,
    read_losses,
    reference_run,
    run_overrides,
    torchrun_command,
    tree_digest,
)
from tests.conftest import ROOT, small_run_overrides
from tests.distributed import rank_env

# The launcher watch polls every POLL_S (the death signal acts at once); the margin is for a loaded 2-core
# machine tearing down two ranks (and, for the DeepSpeed launcher, its per-node launch.py after them).
GONE_BOUND_S = 2 * POLL_S + 20.0
TINY = str(ROOT / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------------------------ process helpers
def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()  # state, ppid, ...


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan's zombie waits for an init that may not reap)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def is_rank(pid: int) -> bool:
    try:
        return b"launcher.pretrain" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the test itself may run under one)."""
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_", "TORCHELASTIC_", "CROSS_",
               "LOCAL_SIZE", "SLURM_", "OMPI_", "PMI", "PMIX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def reaper():
    """Collects process ids; whatever still runs at the end of the test is SIGKILLed."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start(command: list[str], log: Path, env: dict[str, str], reaper: set[int]) -> subprocess.Popen:
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    reaper.add(proc.pid)
    return proc


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < end, f"no {what} after {timeout_s} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.02)


def rank_pids(launcher: subprocess.Popen, reaper: set[int], count: int = 2) -> list[int]:
    """The training ranks below `launcher` (waits until all `count` exist)."""
    end = time.monotonic() + 60
    while len(ranks := [p for p in descendants(launcher.pid) if is_rank(p)]) < count:
        assert time.monotonic() < end, f"found ranks {ranks}"
        time.sleep(0.1)
    reaper.update(descendants(launcher.pid))
    return ranks


# ----------------------------------------------------------------------- (a) ranks end with their launcher
def launcher_command(launcher: str, overrides: list[str]) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    program = ["-m", "launcher.pretrain", "--config", "configs/tiny.yaml", *sets]
    if launcher == "torchrun":
        return torchrun_command(overrides)
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", *program[1:]]
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, *program]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_ranks_end_with_their_launcher(launcher, tmp_path, data_cache, reaper):
    out = tmp_path / "run"
    overrides = small_run_overrides(out, data_cache, **{
        "train.train_iters": 100000, "train.save_interval": 1, "train.keep_last_n": 2})
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    log = tmp_path / f"{launcher}.log"
    proc = start(launcher_command(launcher, overrides), log, env, reaper)
    wait_for(lambda: (out / "checkpoints" / "latest").is_file(), "a first checkpoint", proc, log)
    ranks = rank_pids(proc, reaper)
    below = descendants(proc.pid)  # the ranks, and the DeepSpeed launcher's per-node launch.py
    os.kill(proc.pid, signal.SIGKILL)  # the launcher process only: not its group, not the ranks
    killed = time.monotonic()
    proc.wait()
    while any(running(pid) for pid in below) and time.monotonic() - killed < GONE_BOUND_S:
        time.sleep(0.05)
    took = time.monotonic() - killed
    assert not any(running(pid) for pid in below), (
        f"ranks {ranks} still running {took:.1f} s after the {launcher} launcher was killed:\n{log.read_text()[-3000:]}")
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    assert verify_checkpoint(latest, deep=True) is None
    for _, published in list_checkpoints(ckpt_dir):  # nothing half-written was renamed into place
        assert verify_checkpoint(published, deep=True) is None, published
    print(f"{launcher}: ranks gone {took:.2f} s after the launcher's SIGKILL; latest = {latest.name}")


# ------------------------------------------------------------- (b) a busy directory, (c) a killed run's lock
def exit_codes(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300.0) -> list[int]:
    """Their exit codes; a process still running after `timeout` is made to print every thread's stack
    (PYTHONFAULTHANDLER, SIGABRT) and the test fails with each log's end, so a hang says where it hangs."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    if None in codes:
        for proc, code in zip(procs, codes):
            if code is None:
                os.kill(proc.pid, signal.SIGABRT)
                proc.wait()
        tails = "\n".join(f"--- {log.name} (exit {code}):\n{log.read_text()[-4000:]}" for log, code in zip(logs, codes))
        pytest.fail(f"still running after {timeout:.0f} s (exit codes {codes}):\n{tails}")
    return codes


@pytest.mark.slow
def test_busy_directory_is_refused_and_a_killed_runs_lock_is_taken_over(
    tmp_path, tmp_path_factory, data_cache, reaper
):
    reference = reference_run("tp2_zero1", tmp_path_factory.getbasetemp(), data_cache)
    out = tmp_path / "run"
    overrides = run_overrides(out, data_cache, "tp2_zero1", keep_last_n=0)
    first_log = tmp_path / "first.log"
    first = start(torchrun_command(overrides), first_log, clean_env(), reaper)
    wait_for(lambda: read_lock(out / LOCK_NAME)[0] is not None, "the run lock", first, first_log)
    holder = read_lock(out / LOCK_NAME)[0]
    ranks = rank_pids(first, reaper)
    assert holder["pid"] in ranks
    for pid in ranks:  # the first run, paused while it holds the directory: nothing of it may change
        os.kill(pid, signal.SIGSTOP)
    before = tree_digest(out)

    sets = [arg for item in overrides for arg in ("--set", item)]
    cli = [sys.executable, "-m", "launcher.pretrain", "--config", "configs/tiny.yaml", *sets]
    port = free_port()
    second_logs = [tmp_path / f"second-rank{rank}.log" for rank in range(2)]
    second = [start(cli, log, clean_env(PYTHONFAULTHANDLER="1", **rank_env(rank, 2, port)), reaper)
              for rank, log in enumerate(second_logs)]
    assert exit_codes(second, second_logs) == [2, 2]
    dry_log = tmp_path / "dry.log"  # after the second world: its own rendezvous port cannot meet that one's
    dry = start([*cli, "--set", "parallel.tensor_parallel=1", "--dry-run"], dry_log,
                clean_env(PYTHONFAULTHANDLER="1"), reaper)
    assert exit_codes([dry], [dry_log]) == [0], dry_log.read_text()[-3000:]
    assert "dry run OK" in dry_log.read_text()
    errors = [line for rank in range(2) for line in (tmp_path / f"second-rank{rank}.log").read_text().splitlines()
              if "error:" in line]
    assert len(errors) == 1, errors  # one line, from rank 0, for the whole world
    assert re.fullmatch(
        rf"l2e-pretrain: error: train.output_dir {re.escape(str(out))} is in use by another run \(host "
        rf"{re.escape(holder['host'])}, PID {holder['pid']}, last heartbeat \d+ s ago; lock .*\): wait for it to "
        rf"finish, stop it \(kill {holder['pid']} on .*\), or set another train.output_dir", errors[0]), errors[0]
    assert tree_digest(out) == before  # not a byte of the first run's directory changed, lock included

    for pid in ranks:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: (out / "checkpoints" / "latest").is_file(), "a checkpoint", first, first_log)
    for pid in [first.pid, *ranks]:  # the whole job at once, as a node failure does
        os.kill(pid, signal.SIGKILL)
    first.wait()
    while any(running(pid) for pid in ranks):
        time.sleep(0.05)
    assert read_lock(out / LOCK_NAME)[0]["token"] == holder["token"]  # the dead run's lock stays behind

    again = subprocess.run(torchrun_command(overrides), cwd=ROOT, env=clean_env(), capture_output=True,
                           text=True, timeout=600)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-4000:]
    assert re.search(rf"^l2e-dist: took over the run lock {re.escape(str(out / LOCK_NAME))} from host "
                     rf"{re.escape(holder['host'])}, PID {holder['pid']}, last heartbeat \d+ s ago: its PID "
                     rf"{holder['pid']} is gone from this host$", text, re.M), text[-4000:]
    resumed = int(re.search(r"resumed from \S+ \(step (\d+), same layout\)", text)[1])
    assert 1 <= resumed < STEPS
    assert read_losses(out / "metrics.jsonl") == read_losses(reference / "metrics.jsonl")  # bitwise
    for tp_rank in range(2):  # and the final weights
        name = f"checkpoints/global_step{STEPS}/mp_rank_{tp_rank:02d}_model_states.pt"
        ours, theirs = safe_load(out / name)["module"], safe_load(reference / name)["module"]
        tensors = [k for k, v in theirs.items() if isinstance(v, torch.Tensor)]
        assert ours.keys() == theirs.keys() and tensors, name
        assert all(torch.equal(ours[k], theirs[k]) for k in tensors), name
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


# ------------------------------------------------------------------------------- (d) the lock, unit by unit
def write_holder(out: Path, **fields) -> dict:
    record = {**this_process(30.0), **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(record))
    return record


@pytest.fixture
def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_free_directory_is_locked_and_released(tmp_path):
    lock = acquire(tmp_path / "run", heartbeat_s=30.0, log=pytest.fail)
    record, _ = read_lock(tmp_path / "run" / LOCK_NAME)
    assert (record["pid"], record["token"]) == (os.getpid(), lock.token)
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert sorted(os.listdir(tmp_path / "run")) == []  # no temporary files left behind


@pytest.mark.slow
def test_live_holder_is_refused_and_untouched(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_holder(tmp_path, pid=sleeper.pid, pid_start_ticks=run_lock._process_start_ticks(sleeper.pid))
        before = (tmp_path / LOCK_NAME).read_bytes()
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(host \S+, PID {sleeper.pid}, last "
                           r"heartbeat 0 s ago; lock .*\): wait for it to finish, stop it \(kill .*\), or set "
                           "another train.output_dir"):
            acquire(tmp_path, 30.0, log=pytest.fail)
        assert (tmp_path / LOCK_NAME).read_bytes() == before
    finally:
        sleeper.kill()
        sleeper.wait()


def test_holder_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path):
    write_holder(tmp_path, host="elsewhere", pid=1, job_id="77", heartbeat=time.time() - 100)
    with pytest.raises(RunDirectoryBusy, match=r"host elsewhere, PID 1, Slurm job 77, last heartbeat 100 s ago.*"
                       r"stop it \(scancel 77\)"):
        acquire(tmp_path, 30.0, log=pytest.fail)
    write_holder(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 4 * 30.0 - 5)
    said: list[str] = []
    lock = acquire(tmp_path, 30.0, log=said.append)
    assert len(said) == 1 and "from host elsewhere, PID 1" in said[0]
    assert re.search(rf"its heartbeat is 12\d s old \(stale after {STALE_AFTER_BEATS * 30} s\)", said[0]), said
    assert read_lock(tmp_path / LOCK_NAME)[0]["token"] == lock.token
    lock.release()


def test_dead_or_reused_pid_on_this_host_is_taken_over(tmp_path, exited_pid):
    for pid, ticks in ((exited_pid, None), (os.getpid(), 1)):  # gone; this PID but another process (reused)
        write_holder(tmp_path, pid=pid, pid_start_ticks=ticks)
        said: list[str] = []
        lock = acquire(tmp_path, 30.0, log=said.append)
        assert said and f"its PID {pid} is gone from this host" in said[0], said
        lock.release()


def test_pid_of_another_pid_namespace_is_not_looked_up(tmp_path, exited_pid):
    # A container sharing the host's name but not its PIDs: its holder's PID means nothing here.
    write_holder(tmp_path, pid=exited_pid, pid_start_ticks=None, pid_namespace="pid:[1]")
    with pytest.raises(RunDirectoryBusy, match=f"PID {exited_pid}, last heartbeat 0 s ago"):
        acquire(tmp_path, 30.0, log=pytest.fail)


def test_requeued_slurm_job_takes_over_its_earlier_incarnation(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_holder(tmp_path, host="n2", pid=1, job_id="4242", restart_count=1)  # the same incarnation: alive
    with pytest.raises(RunDirectoryBusy, match="Slurm job 4242"):
        acquire(tmp_path, 30.0, log=pytest.fail)
    write_holder(tmp_path, host="n2", pid=1, job_id="4242", restart_count=0)  # before the requeue
    said: list[str] = []
    acquire(tmp_path, 30.0, log=said.append).release()
    assert "earlier incarnation of this Slurm job 4242 (requeued)" in said[0]


def test_unreadable_lock_counts_as_fresh_until_old(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(RunDirectoryBusy, match=r"has a lock file .* that is not a run lock \(modified 0 s ago\); "
                       r"if no run uses this directory delete it \(it counts as stale after 120 s\)"):
        acquire(tmp_path, 30.0, log=pytest.fail)
    old = time.time() - 200
    os.utime(tmp_path / LOCK_NAME, (old, old))
    said: list[str] = []
    acquire(tmp_path, 30.0, log=said.append).release()
    assert "from an unreadable lock file: it is unreadable and 200 s old" in said[0]


def race_for_lock(out: Path, takers: int) -> tuple[list, list]:
    """`takers` threads call acquire() at the same moment: (locks won, refusals)."""
    won: list = []
    refused: list = []
    barrier = threading.Barrier(takers)

    def take():
        barrier.wait()
        try:
            won.append(acquire(out, 30.0, log=lambda _line: None))
        except RunDirectoryBusy as exc:
            refused.append(exc)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def test_racing_takers_leave_exactly_one_holder(tmp_path, exited_pid):
    # a free directory, then a dead run's lock, many times: a takeover that moved the live lock aside for a
    # moment once let a third taker in (two holders): the old code failed this every run
    for dead_lock in (False, *[True] * 25):
        if dead_lock:
            write_holder(tmp_path, pid=exited_pid, pid_start_ticks=None)
        won, refused = race_for_lock(tmp_path, 8)
        assert len(won) == 1 and len(refused) == 7, (won, refused)
        assert read_lock(tmp_path / LOCK_NAME)[0]["token"] == won[0].token
        won[0].release()
        assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_heartbeat_refreshes_and_a_lost_lock_ends_the_holder(tmp_path):
    script = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from l2e_dist.training.run_lock import acquire
        lock = acquire({str(tmp_path)!r}, heartbeat_s=0.2).start_heartbeat()
        first = lock.record["heartbeat"]
        time.sleep(1.0)
        assert json.loads(Path(lock.path).read_text())["heartbeat"] > first + 0.5
        print("refreshed", flush=True)
        Path(lock.path).write_text(json.dumps({{**lock.record, "token": "another-run", "host": "h2"}}))
        time.sleep(5)
        print("still running")
    """)
    done = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == run_lock.LOST_LOCK_EXIT and "refreshed" in done.stdout, done.stdout + done.stderr
    assert "still running" not in done.stdout
    assert "is now held by host h2" in done.stderr


def test_refusal_reaches_every_rank_as_one_agreed_error(tmp_path):
    write_holder(tmp_path, host="elsewhere", pid=1)
    shared: list = []
    with pytest.raises(RunDirectoryBusy) as caught:
        with hold_run_directory(tmp_path, 30.0, rank=0, share=lambda v: shared.append(v) or v):
            pytest.fail("entered a busy directory")
    assert caught.value.agreed and shared == [str(caught.value)]
    with pytest.raises(RunDirectoryBusy) as other_rank:  # a rank != 0 only hears rank 0's decision
        with hold_run_directory(tmp_path / "unused", 30.0, rank=1, share=lambda _v: shared[0]):
            pass
    assert other_rank.value.agreed and str(other_rank.value) == shared[0]
    assert not (tmp_path / "unused").exists()


def test_lock_heartbeat_must_be_positive():
    with pytest.raises(UserError, match="lock_heartbeat_s"):
        load_config([TINY], ["train.lock_heartbeat_s=0"])


# --------------------------------------------------------------------------------------- the launcher watch
@pytest.mark.parametrize(("env", "expected"), [
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, "torchrun"),
    ({"RANK": "1", "CROSS_RANK": "0", "LOCAL_SIZE": "2"}, "deepspeed"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, "mpirun"),
    ({"PMI_RANK": "0"}, "mpirun"),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, "srun"),
    ({"SLURM_JOB_ID": "5"}, None),  # a batch script's shell: no launcher
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, None),  # started by hand (tests do): not armed
    ({}, None),
])
def test_detect_launcher(env, expected):
    assert detect_launcher(env) == expected


RANK_SCRIPT = """
import os, sys, time
from l2e_dist.parallel import launcher_watch
if sys.argv[1] == "poll-only":
    launcher_watch._arm_death_signal = lambda: False
watch = launcher_watch.watch_launcher(poll_s=0.2)
print(f"armed {watch.death_signal_armed} {os.getpid()}", flush=True)
time.sleep(60)
"""
LAUNCHER_SCRIPT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=open(sys.argv[3], "w"),
                 stderr=subprocess.STDOUT)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["death-signal", "poll-only"])
def test_a_rank_dies_with_its_launcher(tmp_path, how, reaper):
    log = tmp_path / "rank.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER_SCRIPT, RANK_SCRIPT, how, str(log)], cwd=ROOT,
                                env=clean_env(TORCHELASTIC_RUN_ID="test"))
    reaper.add(launcher.pid)
    end = time.monotonic() + 60
    while not (log.is_file() and "armed" in log.read_text()):
        assert time.monotonic() < end and launcher.poll() is None, log.read_text() if log.is_file() else ""
        time.sleep(0.05)
    armed, pid = log.read_text().split()[1:3]
    assert armed == ("True" if how == "death-signal" else "False")
    reaper.add(int(pid))
    launcher.kill()
    launcher.wait()
    killed = time.monotonic()
    while running(int(pid)) and time.monotonic() - killed < GONE_BOUND_S:
        time.sleep(0.02)
    assert not running(int(pid))
    if how == "poll-only":
        assert re.search(rf"rank \?: its parent process {launcher.pid} \(torchrun\) is gone; exiting without "
                         "writing anything more", log.read_text()), log.read_text()
