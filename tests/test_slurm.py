"""The slurm/ scripts with the real trainer on a real Slurm: two emulated nodes started by scripts/local_slurm.sh.

Every job runs `python -m launcher.pretrain --config configs/tiny.yaml --set ...` (a tiny model, L2E on, a stop
check every step) exactly as a user submits it. All jobs are submitted when the module starts so Slurm runs them
side by side; each test then waits for its own. Skipped only when this machine cannot host Slurm at all (not
root, packages not installable).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import final_loss, logged_metrics
from tests.preemptible_run import failure_bound_s, preemptible_overrides, pretrain_args

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
STEPS = 20
WATCHDOG_S = 8
KILL_WAIT_S = 10  # KillWait in scripts/local_slurm.sh: SIGTERM -> SIGKILL when srun ends a step
END_TIME_RESOLUTION_S = 1  # scontrol's EndTime is in whole seconds
# From the failure: srun's SIGTERM + KillWait (+ EndTime's rounding) and the load margin; for a frozen rank first
# the watchdog's deadline, poll and grace (tests/preemptible_run.py).
KILL_BOUND_S = failure_bound_s(None, KILL_WAIT_S + END_TIME_RESOLUTION_S)
FREEZE_BOUND_S = failure_bound_s(WATCHDOG_S, KILL_WAIT_S + END_TIME_RESOLUTION_S)
RANK_LINE = re.compile(
    r"^l2e-dist: rank (\d+)/(\d+) local (\d+)/(\d+) host (\S+) master (\S+) via (\w+)$", re.M
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    """Start the local cluster once for the module; stop it afterwards only if this fixture started it."""
    was_up = subprocess.run([LOCAL_SLURM, "status"], capture_output=True).returncode == 0
    started = subprocess.run([LOCAL_SLURM, "start"], capture_output=True, text=True, timeout=600)
    if started.returncode == 4:
        pytest.skip(f"no local Slurm possible here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not was_up:
        subprocess.run([LOCAL_SLURM, "stop"], capture_output=True, timeout=60)


def trainer_args(out: Path, data_cache: str, **extra: object) -> list[str]:
    """launcher.pretrain's arguments: the tiny model of the multi-process tests, L2E on, checks every step.
    The default corpus is built before any job starts (data_cache), so the jobs never race on it."""
    return pretrain_args(preemptible_overrides(out / "run", data_cache, STEPS, WATCHDOG_S, **extra))


def sbatch_args(script: str, out: Path, nodes: int, tasks_per_node: int, *options: str) -> list[str]:
    return [
        "sbatch",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--cpus-per-task=1",
        "--time=10",
        "--gpus-per-node=0",  # the scripts ask for GPUs (#SBATCH --gpus-per-node=8); this cluster has none
        f"--output={out / 'job.log'}",
        f"--chdir={REPO}",
        f"--export=ALL,OMP_NUM_THREADS=1,PYTHONPATH={REPO}",
        *options,
        str(REPO / "slurm" / script),
    ]


def submit(cmd: list[str]) -> str:
    out = subprocess.run(
        cmd[:1] + ["--parsable"] + cmd[1:], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    )
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def wait_job(job_id: str, timeout_s: float = 400) -> dict[str, str]:
    """Poll scontrol (faster than sbatch --wait's back-off) until the job is finished for good."""
    end = time.time() + timeout_s
    while time.time() < end:
        fields = job_fields(job_id)
        if fields["JobState"] in TERMINAL:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} not finished after {timeout_s} s: {job_fields(job_id)}")


def wait_for_line(log: Path, pattern: str, timeout_s: float = 400) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        if log.exists() and re.search(pattern, log.read_text(), flags=re.M):
            return
        time.sleep(0.2)
    pytest.fail(f"{pattern!r} never appeared in {log}:\n{log.read_text() if log.exists() else ''}")


def rank_pid(job_id: str, rank: int) -> int:
    """The pid of the training process of `rank` in a running srun job (all "nodes" are this machine)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            cmdline = (proc / "cmdline").read_bytes()
            comm = (proc / "comm").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
        if wanted <= environ and b"launcher.pretrain" in cmdline and comm.startswith("python"):
            return int(proc.name)
    pytest.fail(f"no training process of rank {rank} in job {job_id}")


def ranks_seen(text: str) -> set[tuple[str, ...]]:
    return set(RANK_LINE.findall(text))


class Job:
    """A submitted job. With `after_step`, a thread runs `action(job)` as soon as the job logs that step, whichever
    test the module is running meanwhile (a job that finished first could not be preempted any more)."""

    def __init__(self, job_id: str, out: Path, after_step: int | None = None, action=None):
        self.id, self.out, self.log = job_id, out, out / "job.log"
        self.acted_at: float | None = None
        self._error: BaseException | None = None
        self._thread = None
        if after_step is not None:
            self._thread = threading.Thread(target=self._act, args=(after_step, action), daemon=True)
            self._thread.start()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def _act(self, step: int, action) -> None:
        try:
            wait_for_line(self.log, rf" train step {step}/\d+ \| ")
            action(self)
            self.acted_at = time.time()
        except BaseException as error:  # re-raised in the test by wait_acted()
            self._error = error

    def wait_acted(self) -> float:
        """When the action ran (time.time())."""
        self._thread.join(timeout=450)
        if self._error is not None:
            raise self._error
        assert self.acted_at is not None, self.text()
        return self.acted_at


def preempt(job: Job) -> None:
    """SIGUSR1 to every rank, as Slurm's `--signal=USR1@<s>` does before the time limit."""
    subprocess.run(["scancel", "--signal=USR1", job.id], check=True, capture_output=True)


def kill_rank_1(job: Job) -> None:
    os.kill(rank_pid(job.id, 1), signal.SIGKILL)


def freeze_rank_1(job: Job) -> None:
    os.kill(rank_pid(job.id, 1), signal.SIGSTOP)


class ReferenceRun:
    """`timeout ... sbatch --wait slurm/pretrain.sbatch ...` exactly as a user runs it, in the background so the
    other jobs run meanwhile; `text()` waits for it. Its losses are the uninterrupted ones."""

    def __init__(self, out: Path, data_cache: str):
        self.out, self.log = out, out / "job.log"
        cmd = sbatch_args("pretrain.sbatch", out, nodes=2, tasks_per_node=2)
        self.proc = subprocess.Popen(
            ["timeout", "400", cmd[0], "--wait", *cmd[1:], *trainer_args(out, data_cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def text(self) -> str:
        if self.proc.returncode is None:
            self.output, _ = self.proc.communicate()
        text = self.log.read_text() if self.log.exists() else ""
        assert self.proc.returncode == 0, self.output + text
        return text


@pytest.fixture(scope="module")
def jobs(slurm, data_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job | ReferenceRun]:
    """Every job of the module, submitted at once; Slurm queues what does not fit on n1/n2."""
    out = {name: tmp_path_factory.mktemp(name) for name in ("usr1", "ref", "ds", "mpi")}
    started: dict[str, Job | ReferenceRun] = {}
    # First, so it runs at once: preempted mid-run, it checkpoints, requeues itself and resumes.
    script = sbatch_args("pretrain.sbatch", out["usr1"], nodes=2, tasks_per_node=2)
    started["usr1"] = Job(submit([*script, *trainer_args(out["usr1"], data_cache)]), out["usr1"], 1, preempt)
    started["ref"] = ReferenceRun(out["ref"], data_cache)
    # Without --requeue: the preempted run must checkpoint, say so and fail with 75 (resubmitted below).
    script = sbatch_args("pretrain_deepspeed.sbatch", out["ds"], 2, 1, "--no-requeue")
    started["ds"] = Job(submit([*script, *trainer_args(out["ds"], data_cache)]), out["ds"], 1, preempt)
    # mpirun starts its daemons with srun (one per node), so SLURM_PROCID there is a node index: rank discovery
    # must take mpi4py's ranks instead.
    train = " ".join(trainer_args(out["mpi"], data_cache, **{"train.train_iters": 3}))
    wrap = f"--wrap=mpirun --allow-run-as-root python -u -m launcher.pretrain {train}"
    started["mpi"] = Job(submit([*sbatch_args("pretrain.sbatch", out["mpi"], 2, 2)[:-1], wrap]), out["mpi"])
    yield started
    for job in started.values():
        if isinstance(job, Job):
            subprocess.run(["scancel", job.id], capture_output=True)
        elif job.proc.poll() is None:
            job.proc.kill()


@pytest.fixture(scope="module")
def failure_jobs(slurm, data_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """Endless runs whose rank 1 is SIGKILLed or frozen (SIGSTOP) after step 3. Submitted together when the first
    test that needs them starts, not with the other jobs: until its rank fails, each trains for nothing."""
    started = {}
    for how, action in (("kill", kill_rank_1), ("freeze", freeze_rank_1)):
        out = tmp_path_factory.mktemp(how)
        script = sbatch_args("pretrain.sbatch", out, nodes=2, tasks_per_node=1)
        args = trainer_args(out, data_cache, **{"train.train_iters": 10**6})
        started[how] = Job(submit([*script, *args]), out, 3, action)
    yield started
    for job in started.values():
        subprocess.run(["scancel", job.id], capture_output=True)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(jobs: dict) -> None:
    job, reference = jobs["usr1"], jobs["ref"]
    job.wait_acted()
    fields = wait_job(job.id)
    text = job.text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    stopped = int(re.search(r" l2e-dist: stopped at step (\d+) on SIGUSR1; requeued=True$", text, re.M)[1])
    assert 2 <= stopped < STEPS, text
    assert "rank 0: requeued Slurm job" in text
    assert "exit code 75" not in text  # every rank knows the job was requeued: none reports a stopped run
    assert f"resume_step={stopped}" in text and "l2e: job" in text and "restart 1" in text
    assert text.count("l2e-dist: rank ") == 2 * 4  # every rank of both runs
    # Every step's loss, grad norm, learning rate and L2E statistic equal the uninterrupted run's, bit for bit.
    resumed, uninterrupted = logged_metrics(job.out / "run"), logged_metrics(reference.out / "run")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert resumed == uninterrupted
    assert final_loss(text) == final_loss(reference.text())


def test_srun_script_trains_across_two_nodes(jobs: dict) -> None:
    text = jobs["ref"].text()
    master = re.search(r"master (n1:\d+)", text)[1]
    assert ranks_seen(text) == {
        ("0", "4", "0", "2", "n1", master, "slurm"),
        ("1", "4", "1", "2", "n1", master, "slurm"),
        ("2", "4", "0", "2", "n2", master, "slurm"),
        ("3", "4", "1", "2", "n2", master, "slurm"),
    }
    assert "l2e-dist: world=4 tp=1 dp=4" in text and "resume_step=0" in text
    assert float(final_loss(text)) > 0
    assert (jobs["ref"].out / "run" / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"


def test_deepspeed_launcher_script_stops_on_usr1_and_a_resubmit_resumes(jobs: dict, data_cache: str) -> None:
    job = jobs["ds"]
    job.wait_acted()
    fields = wait_job(job.id)
    text = job.text()
    # Not requeueable: the ranks checkpoint, rank 0 says so, and the job fails with 75 (resubmit to resume): the
    # first launcher to leave exits 75; srun then terminates the other (the job's code is that launcher's).
    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "0") and fields["ExitCode"] != "0:0", text
    assert re.search(r"^srun: error: n[12]: task [01]: Exited with exit code 75$", text, re.M), text
    stopped = int(re.search(r" l2e-dist: stopped at step (\d+) on SIGUSR1; requeued=False$", text, re.M)[1])
    assert "is not requeueable (submit with --requeue)" in text
    assert "User defined signal" not in text  # the launchers survived the signal
    assert "l2e: hostfile: n1 slots=1" in text and "l2e: hostfile: n2 slots=1" in text
    assert {(r[0], r[1], r[4], r[6]) for r in ranks_seen(text)} == {
        ("0", "2", "n1", "env"),
        ("1", "2", "n2", "env"),
    }
    checkpoints = job.out / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"global_step{stopped}"

    # The same command again, as the message says: it resumes and completes.
    script = sbatch_args("pretrain_deepspeed.sbatch", job.out, 2, 1, "--no-requeue")
    again = submit([*script, *trainer_args(job.out, data_cache)])
    fields = wait_job(again)
    text = job.text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert f"resume_step={stopped}" in text
    final_loss(text)
    assert (checkpoints / "latest").read_text().strip() == f"global_step{STEPS}"


def test_mpirun_inside_an_allocation(jobs: dict) -> None:
    job = jobs["mpi"]
    fields = wait_job(job.id)
    text = job.text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    # Each rank writes its line in one write(): under mpirun's output forwarding none may be split or lost.
    assert {(r[0], r[1], r[2], r[4], r[6]) for r in ranks_seen(text)} == {
        ("0", "4", "0", "n1", "mpi"),
        ("1", "4", "1", "n1", "mpi"),
        ("2", "4", "0", "n2", "mpi"),
        ("3", "4", "1", "n2", "mpi"),
    }, text
    assert "l2e-dist: world=4 tp=1 dp=4" in text
    final_loss(text)


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_failed_rank_ends_the_job_nonzero_within_bound(failure_jobs: dict[str, Job], how: str) -> None:
    job = failure_jobs[how]
    failed_at = job.wait_acted()
    fields = wait_job(job.id)
    text = job.text()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", text
    took = datetime.fromisoformat(fields["EndTime"]).timestamp() - failed_at  # EndTime: whole seconds
    if how == "kill":
        # srun --kill-on-bad-exit SIGTERMs the survivor at once; it is gone within Slurm's KillWait.
        assert re.search(r"srun: error: n2: task 1: Killed", text), text
        assert took < KILL_BOUND_S, (took, text)
    else:
        # A frozen rank raises no error anywhere: rank 0's watchdog ends it, naming the silent rank; then srun
        # takes the frozen one down.
        assert re.search(r"rank 0: watchdog: suspects: rank 1 (silent|never reported)", text), text
        assert "srun: error: n1: task 0: Exited with exit code 1" in text
        assert took < FREEZE_BOUND_S, (took, text)
