"""The slurm/ scripts on a real Slurm: two emulated nodes started by scripts/local_slurm.sh.

The jobs run tests/dist_probe.py (a gloo data-parallel MLP using the same launch/preemption/watchdog pieces
as the trainer) through the scripts' L2E_MODULE knob; with the trainer they run launcher.pretrain unchanged.
Skipped only when this machine cannot host Slurm at all (not root, packages not installable).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
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
        "sbatch", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
        "--time=10", f"--output={log}", f"--chdir={REPO}",
        f"--export=ALL,L2E_MODULE=tests.dist_probe,OMP_NUM_THREADS=1,PYTHONPATH={REPO}",
        str(REPO / "slurm" / script),
    ]


def submit(cmd: list[str]) -> str:
    out = subprocess.run(cmd[:1] + ["--parsable"] + cmd[1:], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
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
    return set(re.findall(r"probe: rank (\d+)/(\d+) local (\d+)/(\d+) host (\S+) master (\S+) via (\w+)", text))


@pytest.fixture(scope="module")
def reference_run(slurm, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`sbatch --wait slurm/pretrain.sbatch` exactly as a user runs it; its log is the uninterrupted reference."""
    out = tmp_path_factory.mktemp("srun")
    cmd = sbatch_args("pretrain.sbatch", out / "job.log", nodes=2, tasks_per_node=2)
    done = subprocess.run(
        ["timeout", "240", cmd[0], "--wait", *cmd[1:], *PROBE, "--output-dir", str(out / "run")],
        capture_output=True, text=True,
    )
    log = (out / "job.log").read_text()
    assert done.returncode == 0, done.stderr + log
    return log


def test_srun_script_trains_across_two_nodes(reference_run: str) -> None:
    master = re.search(r"master (n1:\d+)", reference_run).group(1)
    assert ranks_seen(reference_run) == {
        ("0", "4", "0", "2", "n1", master, "slurm"),
        ("1", "4", "1", "2", "n1", master, "slurm"),
        ("2", "4", "0", "2", "n2", master, "slurm"),
        ("3", "4", "1", "2", "n2", master, "slurm"),
    }
    assert "probe: world_size 4 allreduce sum 6" in reference_run
    assert float(final_loss(reference_run)) > 0


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(reference_run: str, tmp_path: Path) -> None:
    log, run = tmp_path / "job.log", tmp_path / "run"
    cmd = sbatch_args("pretrain.sbatch", log, nodes=2, tasks_per_node=2)
    job = submit([*cmd, *PROBE, "--step-sleep", "0.5", "--output-dir", str(run)])
    wait_for_line(log, r"probe: step 4 loss", timeout_s=120)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    fields = wait_job(job, timeout_s=180)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    stopped = int(re.search(r"probe: stopped at step (\d+) on SIGUSR1; requeued=True", text).group(1))
    assert 4 <= stopped < STEPS and stopped % 2 == 0
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{stopped}").iterdir()) == [
        f"rank_{r}.pt" for r in range(4)
    ]
    assert text.count(f"resumed from step_{stopped}") == 4 and "restart 1" in text
    assert final_loss(text) == final_loss(reference_run)


def test_deepspeed_launcher_script_runs_without_ssh(slurm, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    job = submit([*sbatch_args("pretrain_deepspeed.sbatch", log, nodes=2, tasks_per_node=1),
                  "--steps", "3", "--output-dir", str(tmp_path / "run")])
    fields = wait_job(job, timeout_s=240)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "l2e: hostfile: n1 slots=1" in text and "l2e: hostfile: n2 slots=1" in text
    assert {(r[0], r[1], r[4], r[6]) for r in ranks_seen(text)} == {("0", "2", "n1", "env"), ("1", "2", "n2", "env")}
    final_loss(text)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (openmpi-bin) not installed")
def test_mpirun_inside_an_allocation(slurm, tmp_path: Path) -> None:
    # mpirun starts its daemons with srun (one per node), so SLURM_PROCID there is a node index: rank
    # discovery must take mpi4py's ranks instead.
    log = tmp_path / "job.log"
    probe = f"python -m tests.dist_probe --steps 3 --output-dir {tmp_path / 'run'}"
    job = submit([
        "sbatch", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
        f"--chdir={REPO}", f"--export=ALL,OMP_NUM_THREADS=1,PYTHONPATH={REPO}",
        f"--wrap=mpirun --allow-run-as-root {probe}",
    ])
    fields = wait_job(job, timeout_s=180)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    seen = {(r[0], r[1], r[2], r[4], r[6]) for r in ranks_seen(text)}
    assert seen == {("0", "4", "0", "n1", "mpi"), ("1", "4", "1", "n1", "mpi"),
                    ("2", "4", "0", "n2", "mpi"), ("3", "4", "1", "n2", "mpi")}
    final_loss(text)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_failed_rank_ends_the_job_nonzero_within_bound(slurm, tmp_path: Path, how: str) -> None:
    log = tmp_path / "job.log"
    job = submit([
        *sbatch_args("pretrain.sbatch", log, nodes=2, tasks_per_node=1), "--steps", "200", "--step-sleep", "0.05",
        "--watchdog-s", str(WATCHDOG_S), "--fail-rank", "1", "--fail-step", "3", "--fail-how", how,
        "--output-dir", str(tmp_path / "run"),
    ])
    fields = wait_job(job, timeout_s=180)
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
