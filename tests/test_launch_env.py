"""Rank discovery: which launcher wins, what is exported, and real mpirun through mpi4py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l2e_dist.parallel import launch_env
from l2e_dist.parallel.launch_env import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    DistEnv,
    LaunchError,
    discover_distributed_env,
    slurm_master_port,
)

REPO = Path(__file__).resolve().parents[1]
EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def srun_task_env(**overrides: str) -> dict[str, str]:
    """What srun sets for task 3 of `sbatch -N 4 --ntasks-per-node=2(x3),1`-like allocation (n1..n4)."""
    env = {
        "SLURM_JOB_ID": "4711",
        "SLURM_JOB_NODELIST": "gpu-[01-04]",
        "SLURM_STEP_NODELIST": "gpu-[01-04]",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
        "SLURM_TASKS_PER_NODE": "2(x3),1",
        "SLURM_NTASKS": "7",
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "3",
    }
    env.update(overrides)
    return env


def test_torchrun_variables_win_and_are_kept() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "host-a",
        "MASTER_PORT": "29501",
        **srun_task_env(),  # an srun'd deepspeed launcher also leaves Slurm's variables behind
    }
    found = discover_distributed_env(env)
    assert found == DistEnv(3, 1, 4, 2, "host-a", 29501, "env")
    assert env["MASTER_PORT"] == "29501" and env["RANK"] == "3"


def test_deepspeed_launcher_local_size_name() -> None:
    env = {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "15000",
    }
    assert discover_distributed_env(env).local_world_size == 2


def test_torchrun_without_local_rank_is_a_clear_error() -> None:
    with pytest.raises(LaunchError, match="LOCAL_RANK"):
        discover_distributed_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_srun_task_maps_slurm_variables_and_exports_them() -> None:
    env = srun_task_env()
    found = discover_distributed_env(env)
    port = SLURM_PORT_BASE + 4711 % SLURM_PORT_SPAN
    assert found == DistEnv(6, 0, 7, 1, "gpu-01", port, "slurm")
    assert [env[name] for name in EXPORTED] == ["6", "0", "7", "1", "gpu-01", str(port)]


def test_srun_task_respects_explicit_master_port_and_addr() -> None:
    found = discover_distributed_env(srun_task_env(MASTER_PORT="23456", MASTER_ADDR="10.0.0.9"), export=False)
    assert (found.master_addr, found.master_port) == ("10.0.0.9", 23456)


def test_slurm_ports_are_safe_and_distinct_for_neighbouring_jobs() -> None:
    ports = [slurm_master_port(job) for job in range(123_456, 123_456 + SLURM_PORT_SPAN)]
    assert len(set(ports)) == SLURM_PORT_SPAN
    assert min(ports) >= 1024 and max(ports) < 32768 and 29500 not in ports  # below the ephemeral range


def test_batch_shell_with_several_tasks_refuses_to_run_single() -> None:
    env = srun_task_env()
    for step_var in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE"):
        del env[step_var]
    with pytest.raises(LaunchError, match="srun"):
        discover_distributed_env(env)


def test_mpirun_inside_an_allocation_beats_slurm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # mpirun starts one orted per node through srun: SLURM_PROCID is a node index there, not a rank.
    monkeypatch.setattr(launch_env, "_from_mpi", lambda env: DistEnv(5, 1, 8, 4, "n1", 15000, "mpi"))
    env = srun_task_env(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", OMPI_COMM_WORLD_SIZE="8")
    assert discover_distributed_env(env, export=False).source == "mpi"
    # srun --mpi=pmix: MPI variables describe the same world as Slurm's, so Slurm's are used directly.
    env = srun_task_env(PMI_SIZE="7")
    assert discover_distributed_env(env, export=False).source == "slurm"


def test_single_process_fallback() -> None:
    env: dict[str, str] = {}
    found = discover_distributed_env(env)
    assert (found.rank, found.world_size, found.source) == (0, 1, "single")
    assert env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0


def test_master_cli_for_batch_scripts() -> None:
    env = {**srun_task_env(), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "l2e_dist.parallel.launch_env", "master"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    assert out == ["gpu-01", str(slurm_master_port(4711))]


MPI_SCRIPT = textwrap.dedent(
    """
    import dataclasses
    import os
    from l2e_dist.parallel.launch_env import discover_distributed_env
    # Without Open MPI's local-rank variables the local rank comes from a hostname split over MPI.
    plain = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_COMM_WORLD_LOCAL")}
    split = discover_distributed_env(plain, export=False)
    found = discover_distributed_env()
    assert split == dataclasses.replace(found, master_port=split.master_port), (split, found)
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([float(found.rank + 1)])
    dist.all_reduce(total)
    # One file per rank: mpirun forwards the ranks' stdout in chunks that can interleave mid-line.
    line = f"mpi-probe {found.rank} {found.world_size} {found.local_rank} {found.source} {int(total.item())}"
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank{found.rank}.txt"), "w") as f:
        f.write(line)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (openmpi-bin) not installed")
def test_mpirun_ranks_come_from_mpi4py(tmp_path: Path) -> None:
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))
        },
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PROBE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        ["mpirun", "-n", "2", "--oversubscribe", sys.executable, "-c", MPI_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt")))
    found = sorted(re.findall(r"mpi-probe (\d+) (\d+) (\d+) (\w+) (\d+)", text))
    assert found == [("0", "2", "0", "mpi", "3"), ("1", "2", "1", "mpi", "3")], done.stdout + done.stderr
