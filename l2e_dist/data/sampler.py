"""Deterministic global batches: the same sample sequence for fresh, resumed and re-sharded runs.

The sample order is a stream of epochs; epoch e is a permutation of range(len(dataset)) drawn from
(seed, e). Global batch s is stream positions [s*G, (s+1)*G) (epochs concatenated, so a batch may straddle an
epoch boundary). Each epoch's permutation is written once to `order_dir` (atomic, reused when present, as OLMo
does with its global indices) so a resumed run reads the exact order it started with. Within a global batch,
micro-step m takes positions [m*mb*dp, (m+1)*mb*dp) and rank r the slice [r*mb, (r+1)*mb) of those (Megatron's
pretraining sampler, and GPT-NeoX's DistributedBatchSampler over a SequentialSampler), so a global batch
never depends on the data-parallel size.

Datasets marked `in_file_order` (Pythia's pre-shuffled files) are not permuted: global batch s is samples
[s*G, (s+1)*G) exactly, as Pythia's utils/batch_viewer.py reads them, and there is no second epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from l2e_dist.fileio import atomic_save_npy
from l2e_dist.parallel.batching import accumulation_steps

ORDER_VERSION = 1


def epoch_order(num_samples: int, seed: int, epoch: int, order_dir: str) -> np.ndarray:
    """Permutation of the samples for one epoch, loaded from `order_dir` or created there atomically."""
    path = os.path.join(order_dir, f"order-v{ORDER_VERSION}-n{num_samples}-seed{seed}-epoch{epoch}.npy")
    if not os.path.isfile(path):
        os.makedirs(order_dir, exist_ok=True)
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
        dtype = np.uint32 if num_samples <= np.iinfo(np.uint32).max else np.int64
        atomic_save_npy(path, rng.permutation(num_samples).astype(dtype))
    order = np.load(path, mmap_mode="r")
    if order.shape != (num_samples,):
        raise ValueError(f"{path} holds {order.shape} entries, expected ({num_samples},): delete it")
    return order


def global_batch_indices(num_samples: int, global_batch_size: int, step: int, seed: int, order_dir: str | None,
                         in_file_order: bool = False) -> np.ndarray:
    """Dataset indices of global batch `step` (length global_batch_size, in stream order)."""
    begin, end = step * global_batch_size, (step + 1) * global_batch_size
    if in_file_order:
        if end > num_samples:
            raise ValueError(
                f"global batch {step} needs samples [{begin}, {end}) but the data holds {num_samples} in file order "
                f"({num_samples // global_batch_size} global batches of {global_batch_size}): there is no more data"
            )
        return np.arange(begin, end, dtype=np.int64)
    out = np.empty(global_batch_size, dtype=np.int64)
    pos = begin
    while pos < end:
        epoch, offset = divmod(pos, num_samples)
        take = min(end - pos, num_samples - offset)
        out[pos - begin : pos - begin + take] = epoch_order(num_samples, seed, epoch, order_dir)[offset : offset + take]
        pos += take
    return out


def global_batch_iterator(
    dataset: Dataset,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    start_step: int = 0,
    order_dir: str | None = None,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """For each optimizer step from `start_step` on, this DP rank's micro-batches: global batch = micro-batch x
    accumulation steps x DP.

    `order_dir` defaults to the dataset's `index_dir` (datasets from build_datasets have one). Datasets with
    `in_file_order = True` are read in file order (no permutation, no order files).
    """
    grad_accum_steps = accumulation_steps(global_batch_size, micro_batch_size, dp_size)
    per_micro_step = micro_batch_size * dp_size
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} out of range for dp_size={dp_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("the dataset has no samples: use more data or a shorter seq_length")
    in_file_order = bool(getattr(dataset, "in_file_order", False))
    if order_dir is None and not in_file_order:
        order_dir = getattr(dataset, "index_dir", None)
        if order_dir is None:
            raise ValueError("this dataset has no index_dir: pass order_dir= (where the sample order is stored)")
    step = start_step
    while True:
        indices = global_batch_indices(num_samples, global_batch_size, step, seed, order_dir, in_file_order)
        micro_batches = []
        for m in range(grad_accum_steps):
            first = m * per_micro_step + dp_rank * micro_batch_size
            samples = [dataset[int(i)] for i in indices[first : first + micro_batch_size]]
            micro_batches.append({key: torch.stack([s[key] for s in samples]) for key in samples[0]})
        yield micro_batches
        step += 1
