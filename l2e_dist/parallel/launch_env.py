"""Find out who we are in a distributed job, whatever started us, and export it for `env://` init.

Launchers and the variables they leave behind, in the order they are trusted:

1. torchrun / the DeepSpeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
2. `srun` (one task per GPU, no ssh): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS; the master is the
   first host of the step's nodelist and the port is derived from the job id (same on every task without
   any communication; different for concurrent jobs sharing a node).
3. An MPI launcher (`mpirun -n N l2e-pretrain ...`): ranks from mpi4py, master host broadcast from rank 0,
   as DeepSpeed's own MPI discovery does. It wins over Slurm's variables when both are present but describe
   different worlds: `mpirun` inside an allocation starts one daemon per node through srun, so there
   SLURM_PROCID is a node index, not a rank.
4. Nothing: a single process.

A Slurm batch shell (no srun) with more than one task is an error, not a silent single-process run.

    python -m l2e_dist.parallel.launch_env master     # "ADDR PORT" for this Slurm job (batch scripts)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from l2e_dist.errors import UserError
from l2e_dist.parallel.hostlist import expand_hostlist, expand_tasks_per_node

# Ports derived from job ids stay below the Linux ephemeral range (32768+), above well-known services,
# and clear of torch's default 29500.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 10000

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_LOCAL_VARS = (
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
)


class LaunchError(UserError, RuntimeError):
    """The launch environment is inconsistent; the message says what to change."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "env" (torchrun/deepspeed), "slurm", "mpi" or "single"

    def describe(self) -> str:
        """One log line; rank 0 prints it so a job log shows the world it ran in."""
        return (
            f"rank {self.rank}/{self.world_size} local {self.local_rank}/{self.local_world_size} "
            f"host {socket.gethostname()} master {self.master_addr}:{self.master_port} via {self.source}"
        )

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Set the variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
        target = os.environ if environ is None else environ
        target.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer; fix or unset it") from None


def slurm_master_port(job_id: int) -> int:
    """A rendezvous port every task of a job derives alike; consecutive job ids never collide."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def free_port() -> int:
    """A currently free TCP port (bind to port 0); only for single-host rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def slurm_master(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for the current Slurm job or step; MASTER_ADDR/PORT in env win."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist or "SLURM_JOB_ID" not in env:
        raise LaunchError("not inside a Slurm job (SLURM_JOB_ID / SLURM_JOB_NODELIST unset)")
    addr = env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0]
    port = (
        _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else slurm_master_port(_int(env, "SLURM_JOB_ID"))
    )
    return addr, port


def _from_launcher_env(env: Mapping[str, str]) -> DistEnv:
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if "LOCAL_RANK" not in env:
        raise LaunchError(
            "RANK and WORLD_SIZE are set but LOCAL_RANK is not; set it (torchrun and deepspeed do)"
        )
    if world_size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise LaunchError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; set both")
    local_size_var = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env), None)
    return DistEnv(
        rank=rank,
        local_rank=_int(env, "LOCAL_RANK"),
        world_size=world_size,
        local_world_size=_int(env, local_size_var) if local_size_var else world_size,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT") if env.get("MASTER_PORT") else free_port(),
        source="env",
    )


def _from_slurm_step(env: Mapping[str, str]) -> DistEnv:
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    counts = expand_tasks_per_node(tasks_per_node) if tasks_per_node else [_int(env, "SLURM_STEP_NUM_TASKS")]
    addr, port = slurm_master(env)
    return DistEnv(
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID"),
        world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
        local_world_size=counts[node_id] if node_id < len(counts) else counts[-1],
        master_addr=addr,
        master_port=port,
        source="slurm",
    )


def _from_mpi(env: Mapping[str, str]) -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise LaunchError(
            f"started by an MPI launcher but mpi4py is unusable ({error}); install mpi4py and an MPI library"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    local = next(((r, s) for r, s in _MPI_LOCAL_VARS if r in env and s in env), None)
    if local:
        local_rank, local_world_size = _int(env, local[0]), _int(env, local[1])
    else:
        hosts = comm.allgather(socket.gethostname())
        local_rank = hosts[:rank].count(hosts[rank])
        local_world_size = hosts.count(hosts[rank])
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    else:
        proposal = None
        if rank == 0:
            port = (
                _int(env, "MASTER_PORT")
                if env.get("MASTER_PORT")
                else (slurm_master_port(_int(env, "SLURM_JOB_ID")) if "SLURM_JOB_ID" in env else free_port())
            )
            proposal = (env.get("MASTER_ADDR") or socket.gethostname(), port)
        addr, port = comm.bcast(proposal, root=0)
    return DistEnv(rank, local_rank, world_size, local_world_size, addr, port, source="mpi")


def _mpi_launcher_size(env: Mapping[str, str]) -> int | None:
    return next((_int(env, name) for name in _MPI_SIZE_VARS if name in env), None)


def discover_distributed_env(environ: MutableMapping[str, str] | None = None, export: bool = True) -> DistEnv:
    """Rank/world/master for this process (see module docstring for the order) and export them."""
    env = os.environ if environ is None else environ
    mpi_size = _mpi_launcher_size(env)
    in_slurm_step = "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env
    if "RANK" in env and "WORLD_SIZE" in env:
        found = _from_launcher_env(env)
    elif in_slurm_step and (mpi_size is None or mpi_size == _int(env, "SLURM_STEP_NUM_TASKS")):
        found = _from_slurm_step(env)
    elif mpi_size is not None or "PMIX_RANK" in env:
        found = _from_mpi(env)
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        raise LaunchError(
            f"this Slurm job has SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun; "
            "launch one task per GPU with `srun python -m ...` (see slurm/pretrain.sbatch)"
        )
    else:
        found = DistEnv(
            rank=0,
            local_rank=0,
            world_size=1,
            local_world_size=1,
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT") if env.get("MASTER_PORT") else free_port(),
            source="single",
        )
    if not 0 <= found.rank < found.world_size or not 0 <= found.local_rank < found.local_world_size:
        raise LaunchError(f"inconsistent launch environment: {found}")
    if export:
        found.export(env)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Launch-environment helpers for batch scripts.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("master", help="print 'MASTER_ADDR MASTER_PORT' for the current Slurm job")
    parser.parse_args(argv)
    try:
        addr, port = slurm_master()
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(addr, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
