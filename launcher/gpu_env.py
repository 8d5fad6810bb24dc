"""Print the environment a GPU training job must export before CUDA and NCCL start (l2e_dist.parallel.gpu_env)
for a launcher.pretrain command line: CUDA_DEVICE_MAX_CONNECTIONS=1 at TP > 1, NCCL error handling and the
flight recorder (dumped to <output_dir>/nccl_trace/rank_<N> on a collective timeout).

    eval "$(python3 -m launcher.gpu_env --config C.yaml --set k=v ...)"     # slurm/*.sbatch do this

A value already in the environment is kept; a config that does not load prints the TP-independent part (the
trainer then reports the config error in its own words).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from l2e_dist.parallel.gpu_env import cuda_launch_environment, missing_from, nccl_environment


def _config_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The --config files and --set overrides of a launcher.pretrain command line (other arguments ignored)."""
    configs, overrides = [], []
    args = list(argv)
    for i, arg in enumerate(args):
        for flag, into in (("--config", configs), ("--set", overrides)):
            if arg == flag and i + 1 < len(args):
                into.append(args[i + 1])
            elif arg.startswith(flag + "="):
                into.append(arg[len(flag) + 1:])
    return configs, overrides


def job_environment(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The exports for the launcher.pretrain command line `argv`: the CUDA variable for its TP size and the NCCL
    ones, the flight recorder dumping next to the run (<output_dir>/nccl_trace/rank_<N>)."""
    from l2e_dist.config import load_config  # deferred: the CLI's --help needs no torch
    from l2e_dist.errors import UserError

    configs, overrides = _config_arguments(argv)
    tensor_parallel, trace_prefix = 1, None
    if configs:
        try:
            cfg = load_config(configs, overrides)
        except (UserError, OSError):  # the trainer reports a bad config itself, in its own words
            cfg = None
        if cfg is not None:
            tensor_parallel = cfg.parallel.tensor_parallel
            if cfg.train.output_dir:
                trace_prefix = os.path.join(os.path.abspath(cfg.train.output_dir), "nccl_trace", "rank_")
    return missing_from(environ, {**cuda_launch_environment(tensor_parallel), **nccl_environment(trace_prefix)})


EXAMPLES = """examples:
  l2e-gpu-env --config configs/pythia-410m.yaml --set parallel.tensor_parallel=2
  eval "$(python3 -m launcher.gpu_env --config configs/pythia-160m.yaml)"   # in a job script, before srun
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="l2e-gpu-env", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Print `export NAME=value` lines for the CUDA/NCCL environment of the launcher.pretrain "
                    "command line given (every argument but --help is the pretrain command line's).")
    _, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for name, value in job_environment(rest, os.environ).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
