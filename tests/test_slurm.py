"""The slurm/ scripts on a real Slurm: two emulated nodes started by scripts/local_slurm.sh.

The jobs run tests/dist_probe.py (a gloo data-parallel MLP using the same launch/preemption/watchdog pieces
as the trainer) through the scripts' L2E_MODULE knob; with the trainer they run launcher.pretrain unchanged.
Skipped only when this machine cannot host Slurm at all (not root, packages not installable).
"""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

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
STEPS = 12
WATCHDOG_S = 6
PROBE = ["--check-every", "2", "--steps", str(STEPS)]

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


def sbatch_args(script: str, log: Path, nodes: int, tasks_per_node: int) -> list[str]:
    return [
        "sbatch",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={log}",
        f"--chdir={REPO}",
        f"--export=ALL,L2E_MODULE=tests.dist_probe,OMP_NUM_THREADS=1,PYTHONPATH={REPO}",
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


def wait_job(job_id: str, timeout_s: float) -> dict[str, str]:
    """Poll scontrol (faster than sbatch --wait's back-off) until the job is finished for good."""
    end = time.time() + timeout_s
    while time.time() < end:
        fields = job_fields(job_id)
        if fields["JobState"] in TERMINAL:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} not finished after {timeout_s} s: {job_fields(job_id)}")


def wait_for_line(log: Path, pattern: str, timeout_s: float) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        if log.exists() and re.search(pattern, log.read_text()):
            return
        time.sleep(0.2)
    pytest.fail(f"{pattern!r} never appeared in {log}:\n{log.read_text() if log.exists() else ''}")


def final_loss(text: str) -> str:
    losses = re.findall(r"^final loss (\S+)$", text, flags=re.M)
    assert len(losses) == 1, text
    return losses[0]


def ranks_seen(text: str) -> set[tuple[str, ...]]:
    return set(
        re.findall(r"probe: rank (\d+)/(\d+) local (\d+)/(\d+) host (\S+) master (\S+) via (\w+)", text)
    )


class ReferenceRun:
    """`timeout ... sbatch --wait slurm/pretrain.sbatch ...` exactly as a user runs it, in the background so
    the requeue test's job runs meanwhile; `log()` waits for it. Its final loss is the uninterrupted one."""

    def __init__(self, out: Path):
        self.log_path = out / "job.log"
        cmd = sbatch_args("pretrain.sbatch", self.log_path, nodes=2, tasks_per_node=2)
        self.proc = subprocess.Popen(
            ["timeout", "300", cmd[0], "--wait", *cmd[1:], *PROBE, "--output-dir", str(out / "run")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def log(self) -> str:
        if self.proc.returncode is None:
            self.output, _ = self.proc.communicate()
        text = self.log_path.read_text() if self.log_path.exists() else ""
        assert self.proc.returncode == 0, self.output + text
        return text


@pytest.fixture(scope="module")
def reference_run(slurm, tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    return ReferenceRun(tmp_path_factory.mktemp("srun"))


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(
    reference_run: ReferenceRun, tmp_path: Path
) -> None:
    log, run = tmp_path / "job.log", tmp_path / "run"
    cmd = sbatch_args("pretrain.sbatch", log, nodes=2, tasks_per_node=2)
    job = submit([*cmd, *PROBE, "--step-sleep", "0.5", "--output-dir", str(run)])
    wait_for_line(log, r"probe: step 4 loss", timeout_s=180)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    fields = wait_job(job, timeout_s=240)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    stopped = int(re.search(r"probe: stopped at step (\d+) on SIGUSR1; requeued=True", text).group(1))
    assert 4 <= stopped < STEPS and stopped % 2 == 0
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{stopped}").iterdir()) == [
        f"rank_{r}.pt" for r in range(4)
    ]
    assert text.count(f"resumed from step_{stopped}") == 4 and "restart 1" in text
    assert final_loss(text) == final_loss(reference_run.log())


def test_srun_script_trains_across_two_nodes(reference_run: ReferenceRun) -> None:
    text = reference_run.log()
    master = re.search(r"master (n1:\d+)", text).group(1)
    assert ranks_seen(text) == {
        ("0", "4", "0", "2", "n1", master, "slurm"),
        ("1", "4", "1", "2", "n1", master, "slurm"),
        ("2", "4", "0", "2", "n2", master, "slurm"),
        ("3", "4", "1", "2", "n2", master, "slurm"),
    }
    assert "probe: world_size 4 allreduce sum 6" in text
    assert float(final_loss(text)) > 0


@pytest.fixture(scope="module")
def launcher_jobs(slurm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """The DeepSpeed-launcher and mpirun jobs, submitted together so they run side by side."""
    ds, ds_usr1, mpi = (tmp_path_factory.mktemp(name) for name in ("deepspeed", "deepspeed-usr1", "mpirun"))
    ds_job = submit(
        [
            *sbatch_args("pretrain_deepspeed.sbatch", ds / "job.log", nodes=2, tasks_per_node=1),
            "--steps",
            "3",
            "--output-dir",
            str(ds / "run"),
        ]
    )
    # Submitted without --requeue: the preempted run must checkpoint, say so, and fail (rank 0 exits 75).
    cmd = sbatch_args("pretrain_deepspeed.sbatch", ds_usr1 / "job.log", nodes=2, tasks_per_node=1)
    ds_usr1_job = submit(
        [
            cmd[0],
            "--no-requeue",
            *cmd[1:],
            "--steps",
            "30",
            "--step-sleep",
            "0.5",
            *PROBE[:2],
            "--output-dir",
            str(ds_usr1 / "run"),
        ]
    )
    # mpirun starts its daemons with srun (one per node), so SLURM_PROCID there is a node index: rank
    # discovery must take mpi4py's ranks instead.
    probe = f"python -m tests.dist_probe --steps 3 --output-dir {mpi / 'run'}"
    mpi_job = submit(
        [
            "sbatch",
            "--nodes=2",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={mpi / 'job.log'}",
            f"--chdir={REPO}",
            f"--export=ALL,OMP_NUM_THREADS=1,PYTHONPATH={REPO}",
            f"--wrap=mpirun --allow-run-as-root {probe}",
        ]
    )
    return {
        "deepspeed": (ds_job, ds / "job.log"),
        "deepspeed-usr1": (ds_usr1_job, ds_usr1 / "job.log"),
        "mpirun": (mpi_job, mpi / "job.log"),
    }


def test_usr1_reaches_ranks_through_the_deepspeed_launcher(
    launcher_jobs: dict[str, tuple[str, Path]],
) -> None:
    job, log = launcher_jobs["deepspeed-usr1"]
    wait_for_line(log, r"probe: step 2 loss", timeout_s=180)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    fields = wait_job(job, timeout_s=180)
    text = log.read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "0") and fields["ExitCode"] != "0:0", text
    stopped = int(re.search(r"probe: stopped at step (\d+) on SIGUSR1; requeued=False", text).group(1))
    assert "is not requeueable (submit with --requeue)" in text
    assert "User defined signal" not in text  # the launchers survived the signal
    run = log.parent / "run" / "checkpoints"
    assert sorted(p.name for p in (run / f"step_{stopped}").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert (run / "latest").read_text() == f"step_{stopped}"


def test_deepspeed_launcher_script_runs_without_ssh(launcher_jobs: dict[str, tuple[str, Path]]) -> None:
    job, log = launcher_jobs["deepspeed"]
    fields = wait_job(job, timeout_s=240)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "l2e: hostfile: n1 slots=1" in text and "l2e: hostfile: n2 slots=1" in text
    assert {(r[0], r[1], r[4], r[6]) for r in ranks_seen(text)} == {
        ("0", "2", "n1", "env"),
        ("1", "2", "n2", "env"),
    }
    final_loss(text)


def test_mpirun_inside_an_allocation(launcher_jobs: dict[str, tuple[str, Path]]) -> None:
    job, log = launcher_jobs["mpirun"]
    fields = wait_job(job, timeout_s=240)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    seen = {(r[0], r[1], r[2], r[4], r[6]) for r in ranks_seen(text)}
    assert seen == {
        ("0", "4", "0", "n1", "mpi"),
        ("1", "4", "1", "n1", "mpi"),
        ("2", "4", "0", "n2", "mpi"),
        ("3", "4", "1", "n2", "mpi"),
    }
    final_loss(text)


@pytest.fixture(scope="module")
def failure_jobs(slurm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """One job per failure mode, submitted together: rank 1 is SIGKILLed, or frozen with SIGSTOP."""
    jobs = {}
    for how in ("kill", "stop"):
        out = tmp_path_factory.mktemp(f"fail-{how}")
        jobs[how] = (
            submit(
                [
                    *sbatch_args("pretrain.sbatch", out / "job.log", nodes=2, tasks_per_node=1),
                    "--steps",
                    "200",
                    "--step-sleep",
                    "0.05",
                    "--watchdog-s",
                    str(WATCHDOG_S),
                    "--fail-rank",
                    "1",
                    "--fail-step",
                    "3",
                    "--fail-how",
                    how,
                    "--output-dir",
                    str(out / "run"),
                ]
            ),
            out / "job.log",
        )
    return jobs


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_failed_rank_ends_the_job_nonzero_within_bound(
    failure_jobs: dict[str, tuple[str, Path]], how: str
) -> None:
    job, log = failure_jobs[how]
    fields = wait_job(job, timeout_s=240)
    text = log.read_text()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", text
    failed_at = float(re.search(r"rank 1 failing \(\w+\) at step 3 time ([\d.]+)", text).group(1))
    ended = datetime.fromisoformat(fields["EndTime"]).timestamp()  # whole seconds, local time
    # kill: srun --kill-on-bad-exit ends the step at once; stop (frozen rank, no error anywhere): the
    # watchdog deadline + one poll + rank 0's 3 s grace, then srun takes the frozen rank down.
    assert ended - failed_at < WATCHDOG_S + 10, (ended - failed_at, text)
    if how == "kill":
        assert re.search(r"srun: error: n2: task 1: Killed", text), text
    else:
        assert re.search(r"rank 0: watchdog: suspects: rank 1 (silent|never reported)", text), text
