"""Process groups: torch.distributed + megatron-core parallel_state, and the adapter DeepSpeed's `mpu=` needs.

This is the only module that decides the device and backend (`parallel.device`: auto | cuda | cpu; CUDA+NCCL or
CPU+gloo) and sets the CUDA environment megatron-core needs, so the rest of the code base stays device-agnostic.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from l2e_dist.config_utils import ConfigError
from l2e_dist.errors import UserError

T = TypeVar("T")

DEVICE_SETTINGS = ("auto", "cuda", "cpu")
# Slurm variables that say the job (or step) was given GPUs (--gpus, --gpus-per-node, --gres=gpu:N, ...).
_SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS",
                        "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
_device_setting = "auto"  # parallel.device of the run that initialised the process groups


def slurm_requested_gpus(environ=None) -> str | None:
    """`NAME=value` of the first Slurm variable saying this job was given GPUs, else None."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ:
        return None
    for name in _SLURM_GPU_VARIABLES:
        value = environ.get(name, "").strip()
        if value and value not in ("0", "N/A", "(null)"):
            return f"{name}={value}"
    tres = environ.get("SLURM_TRES_PER_TASK", "")
    return f"SLURM_TRES_PER_TASK={tres}" if "gpu" in tres else None


def select_device(setting: str | None = None) -> torch.device:
    """This rank's device for `parallel.device` (default: the setting the process groups were built with).

    auto: the LOCAL_RANK-th visible GPU if there is one, else the CPU, except in a Slurm job that asked for
    GPUs and sees none (a broken node or container) which fails instead of training on CPU + gloo for days.
    cuda: a GPU or a one-line error. cpu: the CPU even where GPUs are visible."""
    setting = _device_setting if setting is None else setting
    if setting not in DEVICE_SETTINGS:
        raise ConfigError("parallel.device", f"must be one of {list(DEVICE_SETTINGS)}, got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    build = f"torch {torch.__version__} built with CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"torch {torch.__version__} is a CPU-only build")
    if setting == "cuda":
        raise ConfigError("parallel.device", f"is cuda but no CUDA GPU is visible ({build}; CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): run on a GPU node or set "
                          "parallel.device=cpu")
    requested = slurm_requested_gpus()
    if requested:
        raise ConfigError("parallel.device", f"is auto and this Slurm job asked for GPUs ({requested}) but none "
                          f"is visible ({build}): fix the node/container, or set parallel.device=cpu to run on CPU")
    return torch.device("cpu")


def default_device() -> torch.device:
    return select_device()


def default_backend() -> str:
    return "nccl" if default_device().type == "cuda" else "gloo"


def _set_cuda_environment(tensor_parallel: int) -> None:
    """The CUDA and NCCL environment (l2e_dist.parallel.gpu_env), for a process its job script did not export it
    to. CUDA_DEVICE_MAX_CONNECTIONS is read when the CUDA context is created: once CUDA is initialised setting it
    does nothing, so then it is only reported (export it in the job script: slurm/*.sbatch do). A value the user
    set is kept."""
    from l2e_dist.parallel.gpu_env import (
        apply_defaults,
        cuda_launch_environment,
        missing_from,
        nccl_environment,
        prepare_trace_dir,
    )

    apply_defaults(nccl_environment())  # read when the NCCL process group is created, which comes later
    prepare_trace_dir()
    missing = missing_from(os.environ, cuda_launch_environment(tensor_parallel))
    if missing and torch.cuda.is_initialized():
        import warnings

        warnings.warn(f"CUDA was initialised before the process groups: {', '.join(missing)} would come too late "
                      "for this process; export it in the job script (eval \"$(python3 -m "
                      "launcher.gpu_env ARGS...)\")", stacklevel=3)
        return
    os.environ.update(missing)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: world = tensor_parallel x data_parallel (no pipeline parallelism)."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int


def init_process_groups(tensor_parallel: int, timeout_s: float = 600.0, device: str = "auto") -> ParallelLayout:
    """Initialise torch.distributed from the environment (torchrun, deepspeed, srun or mpirun; see
    launch_env) and megatron-core's TP/DP groups on `device` (parallel.device). Safe to call for a single
    process (world of 1)."""
    global _device_setting
    select_device(device)  # a bad setting or a missing GPU fails here, before anything is started
    _device_setting = device
    if default_device().type == "cuda":
        _set_cuda_environment(tensor_parallel)
    else:  # DeepSpeed must not pick CUDA (cpu on purpose on a GPU machine), nor warn on every rank that it found none
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        from l2e_dist.parallel.launch_env import discover_distributed_env

        env = discover_distributed_env()
        # Every rank prints this into one job log: one write() per line (print's text and end are two under
        # `python -u`, and mpirun's forwarded ranks then interleave mid-line).
        sys.stdout.write(f"l2e-dist: {env.describe()}\n")
        sys.stdout.flush()
        device = default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        import deepspeed

        deepspeed.init_distributed(
            dist_backend=default_backend(),
            timeout=datetime.timedelta(seconds=timeout_s),
            auto_mpi_discovery=False,
            rank=env.rank,
            world_size=env.world_size,
        )
    world = dist.get_world_size()
    if world % tensor_parallel:
        raise ConfigError(
            "parallel.tensor_parallel",
            f"TP={tensor_parallel} does not divide the world size {world}: launch a multiple of "
            f"{tensor_parallel} processes or lower parallel.tensor_parallel",
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
            create_gloo_process_groups=False,
        )
    return current_layout()


def rank0_first(build: Callable[[], T]) -> T:
    """Collective: rank 0 runs `build` (e.g. writing caches), then the other ranks do. A user error on rank 0 is
    raised on every rank (one report, no rank left waiting in a barrier for a peer that has exited)."""
    problem = None
    if dist.get_rank() == 0:
        try:
            result = build()
        except UserError as exc:
            exc.agreed, problem = True, exc
    box = [None if problem is None else str(problem)]
    dist.broadcast_object_list(box, src=0)
    if problem is not None:
        raise problem
    if box[0] is not None:
        error = UserError(box[0])
        error.agreed = True
        raise error
    if dist.get_rank() != 0:
        result = build()
    return result


def set_collective_timeout(seconds: float) -> None:
    """Timeout of every later collective on every process group of this rank (gloo and NCCL)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    for group in list(_world.pg_map):
        _set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def current_layout() -> ParallelLayout:
    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def tensor_and_data_parallel_group():
    """The group spanning TP x DP (all ranks holding one pipeline stage): L2E reduces its statistics here."""
    return parallel_state.get_tensor_and_data_parallel_group()


def destroy_process_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMpu:
    """DeepSpeed's `mpu=` expects the old Megatron names; megatron-core renamed them. This maps them."""

    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipe_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipe_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipe_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
