"""The slurm/ scripts with the real trainer on a real Slurm: two emulated nodes started by scripts/local_slurm.sh.

Every job runs `python -m launcher.pretrain --config configs/tiny.yaml --set ...` (a tiny model, L2E on, a stop
check every step) exactly as a user submits it. All jobs are submitted when the module starts so Slurm runs them
side by side; each test then waits for its own. Skipped only when this machine cannot host Slurm at all (not
root, packages not installable).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import small_run_overrides

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
TIMING_KEYS = {
    "train/tokens_per_s",
    "train/step_time_s",
    "train/max_rss_gib",
    "train/max_mem_gib",
    "train/mfu",
}
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
    overrides = small_run_overrides(
        out / "run",
        data_cache,
        **{
            "l2e.method": "l2e",
            "train.train_iters": STEPS,
            "train.preempt_check_every": 1,
            "parallel.watchdog_timeout_s": WATCHDOG_S,
            **extra,
        },
    )
    return ["--config", "configs/tiny.yaml", *[arg for item in overrides for arg in ("--set", item)]]


def sbatch_args(script: str, out: Path, nodes: int, tasks_per_node: int, *options: str) -> list[str]:
    return [
        "sbatch",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--cpus-per-task=1",
        "--time=10",
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


def final_loss(text: str) -> str:
    losses = re.findall(r"^final loss (\S+)$", text, flags=re.M)
    assert len(losses) == 1, text
    return losses[0]


def ranks_seen(text: str) -> set[tuple[str, ...]]:
    return set(RANK_LINE.findall(text))


def logged_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> its deterministic training metrics in metrics.jsonl (a later record of a step wins)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


class Job:
    """A submitted job; with `preempt_after_step`, a thread sends SIGUSR1 to its ranks (as Slurm's --signal does
    before the time limit) as soon as that step is logged, whichever test the module is running meanwhile."""

    def __init__(self, job_id: str, out: Path, preempt_after_step: int | None = None):
        self.id, self.out, self.log = job_id, out, out / "job.log"
        self.signalled: subprocess.CompletedProcess | None = None
        self._preempter = None
        if preempt_after_step is not None:
            self._preempter = threading.Thread(target=self._preempt, args=(preempt_after_step,), daemon=True)
            self._preempter.start()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def _preempt(self, step: int) -> None:
        end = time.time() + 400
        while time.time() < end and not re.search(rf"^step {step}: loss", self.text(), flags=re.M):
            time.sleep(0.1)
        self.signalled = subprocess.run(["scancel", "--signal=USR1", self.id], capture_output=True, text=True)

    def wait_preempted(self) -> None:
        self._preempter.join(timeout=450)
        assert self.signalled is not None and self.signalled.returncode == 0, (self.signalled, self.text())


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
    started["usr1"] = Job(submit([*script, *trainer_args(out["usr1"], data_cache)]), out["usr1"], 1)
    started["ref"] = ReferenceRun(out["ref"], data_cache)
    # Without --requeue: the preempted run must checkpoint, say so and fail with 75 (resubmitted below).
    script = sbatch_args("pretrain_deepspeed.sbatch", out["ds"], 2, 1, "--no-requeue")
    started["ds"] = Job(submit([*script, *trainer_args(out["ds"], data_cache)]), out["ds"], 1)
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
    """Endless runs, one rank of which each test makes fail; submitted only when the first of those tests
    starts (both together), so they do not train for nothing while the other tests run."""
    started = {}
    for how in ("kill", "freeze"):
        out = tmp_path_factory.mktemp(how)
        script = sbatch_args("pretrain.sbatch", out, nodes=2, tasks_per_node=1)
        started[how] = Job(
            submit([*script, *trainer_args(out, data_cache, **{"train.train_iters": 10**6})]), out
        )
    yield started
    for job in started.values():
        subprocess.run(["scancel", job.id], capture_output=True)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(jobs: dict) -> None:
    job, reference = jobs["usr1"], jobs["ref"]
    job.wait_preempted()
    fields = wait_job(job.id)
    text = job.text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    stopped = int(re.search(r"^stopped at step (\d+) on SIGUSR1; requeued=True$", text, re.M)[1])
    assert 2 <= stopped < STEPS, text
    assert "rank 0: requeued Slurm job" in text
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
    job.wait_preempted()
    fields = wait_job(job.id)
    text = job.text()
    # Not requeueable: the ranks checkpoint, rank 0 says so, and the job fails with 75 (resubmit to resume).
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "75:0", "0"), text
    stopped = int(re.search(r"^stopped at step (\d+) on SIGUSR1; requeued=False$", text, re.M)[1])
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
    assert {(r[0], r[1], r[2], r[4], r[6]) for r in ranks_seen(text)} == {
        ("0", "4", "0", "n1", "mpi"),
        ("1", "4", "1", "n1", "mpi"),
        ("2", "4", "0", "n2", "mpi"),
        ("3", "4", "1", "n2", "mpi"),
    }
    assert "l2e-dist: world=4 tp=1 dp=4" in text
    final_loss(text)


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_failed_rank_ends_the_job_nonzero_within_bound(failure_jobs: dict[str, Job], how: str) -> None:
    job = failure_jobs[how]
    wait_for_line(job.log, r"^step 3: loss")
    failed_at = time.time()
    subprocess.run(["kill", "-KILL" if how == "kill" else "-STOP", str(rank_pid(job.id, 1))], check=True)
    fields = wait_job(job.id)
    text = job.text()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", text
    ended = datetime.fromisoformat(fields["EndTime"]).timestamp()  # whole seconds, local time
    if how == "kill":  # srun --kill-on-bad-exit ends the step at once
        assert ended - failed_at < 10, (ended - failed_at, text)
        assert re.search(r"srun: error: n2: task 1: Killed", text), text
    else:  # a frozen rank raises no error anywhere: rank 0's watchdog (+ poll + 3 s grace), then srun
        assert ended - failed_at < WATCHDOG_S + 12, (ended - failed_at, text)
        assert re.search(r"rank 0: watchdog: suspects: rank 1 (silent|never reported)", text), text
