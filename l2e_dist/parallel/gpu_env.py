"""The environment a GPU job must have before CUDA and NCCL start, for the job scripts to export.

Two kinds of variable are read once, by the CUDA driver or by ProcessGroupNCCL, so setting them from Python after
that point does nothing:

- `CUDA_DEVICE_MAX_CONNECTIONS=1`, read when the CUDA context is created. megatron-core's tensor-parallel layers
  start their asynchronous all-reduce of the input gradient and rely on one hardware queue to have it scheduled
  before the weight-gradient GEMM (megatron/core/tensor_parallel/layers.py). It helps only at TP > 1; at TP = 1
  there is no TP communication and a single queue would only serialise DeepSpeed's gradient reduction with
  compute, so it is left unset.
- NCCL error handling and the flight recorder: a failed or hung collective tears the process down
  (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, the documented default, stated so a site profile cannot turn it off), and
  the last collectives of every rank are recorded and dumped on a timeout (TORCH_FR_BUFFER_SIZE /
  TORCH_NCCL_DUMP_ON_TIMEOUT; torch 2.11 still reads the older TORCH_NCCL_TRACE_BUFFER_SIZE and
  TORCH_NCCL_DEBUG_INFO_TEMP_FILE names too, so both are set).

The job scripts export them through `launcher/gpu_env.py` (which reads the run's TP size from its config);
init_process_groups applies the same values as defaults for a process started without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

# Flight-recorder entries per rank: enough for several steps' collectives (a few hundred per step at TP x DP).
TRACE_BUFFER_SIZE = 2000


def cuda_launch_environment(tensor_parallel: int) -> dict[str, str]:
    """What CUDA must see before its context exists, for a run at this TP size."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if tensor_parallel > 1 else {}


def nccl_environment(trace_prefix: str | None = None) -> dict[str, str]:
    """NCCL error handling on and the flight recorder recording, dumped on a timeout to `trace_prefix<rank>`
    (default: torch's, /tmp/nccl_trace_rank_)."""
    values = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_FR_BUFFER_SIZE": str(TRACE_BUFFER_SIZE),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(TRACE_BUFFER_SIZE),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }
    if trace_prefix:
        values["TORCH_FR_DUMP_TEMP_FILE"] = trace_prefix
        values["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = trace_prefix
    return values


def missing_from(environ: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
    """The entries of `values` the environment does not set yet (a user's or site's own value wins)."""
    return {name: value for name, value in values.items() if name not in environ}


def apply_defaults(values: Mapping[str, str], environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Sets the missing entries of `values` in `environ` (default os.environ); returns what it set."""
    environ = os.environ if environ is None else environ
    added = missing_from(environ, values)
    environ.update(added)
    return added


def prepare_trace_dir(environ: Mapping[str, str] | None = None) -> None:
    """Creates the folder the flight recorder dumps into (it writes `<prefix><rank>` and does not create it)."""
    environ = os.environ if environ is None else environ
    prefix = environ.get("TORCH_FR_DUMP_TEMP_FILE") or environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    if prefix and os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
