"""Global batches moved to the training device one step ahead.

On CUDA each micro-batch tensor of the NEXT global batch is copied into pinned (page-locked) host memory and
sent with a non-blocking copy while the current step's kernels are still queued, so the host never waits on a
blocking host-to-device copy at the start of a micro-batch. The copies are issued on the current stream, so
they are ordered before the kernels that read them (no cross-stream synchronisation needed); the pinned
host tensors are kept alive with the batch until it has been used. On the CPU the batches pass through.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MicroBatch = dict[str, torch.Tensor]


def _to_device(micro_batches: list[MicroBatch], device: torch.device) -> tuple[list[MicroBatch], list]:
    moved, pinned = [], []
    for micro in micro_batches:
        out = {}
        for key, tensor in micro.items():
            if isinstance(tensor, torch.Tensor):
                host = tensor.pin_memory()
                pinned.append(host)
                out[key] = host.to(device, non_blocking=True)
            else:
                out[key] = tensor
        moved.append(out)
    return moved, pinned


def prefetch_to_device(batches: Iterator[list[MicroBatch]], device: torch.device) -> Iterator[list[MicroBatch]]:
    """Yields the global batches of `batches` (lists of micro-batch dicts) with their tensors on `device`."""
    if device.type != "cuda":
        yield from batches
        return
    upcoming = next(batches, None)
    staged = _to_device(upcoming, device) if upcoming is not None else None
    while staged is not None:
        current, _keep_alive = staged
        upcoming = next(batches, None)
        staged = _to_device(upcoming, device) if upcoming is not None else None
        yield current
