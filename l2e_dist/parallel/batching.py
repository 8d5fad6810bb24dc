"""The batch arithmetic of data parallelism, in one place: global batch = micro batch x accumulation steps x DP.

A global batch (what the optimizer step sees, and what Pythia's schedule counts) is split into `dp_size` ranks'
shares, each fed as `accumulation_steps` micro-batches of `micro_batch_size` sequences. The same global batch
on any split is the same experiment (see the L2E step semantics in docs/l2e-method.md).
"""

from __future__ import annotations


class BatchSplitError(ValueError):
    """The global batch does not split into micro-batches on this many data-parallel ranks."""


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank; BatchSplitError when it does not divide."""
    if min(global_batch_size, micro_batch_size, dp_size) < 1:
        raise BatchSplitError(
            f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size} and data-parallel "
            f"size {dp_size} must be positive"
        )
    per_micro_step = micro_batch_size * dp_size
    if global_batch_size % per_micro_step:
        raise BatchSplitError(
            f"{global_batch_size} is not divisible by micro_batch_size x data-parallel size "
            f"({micro_batch_size} x {dp_size} = {per_micro_step})"
        )
    return global_batch_size // per_micro_step
