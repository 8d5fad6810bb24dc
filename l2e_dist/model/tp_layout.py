"""Which parameters are split across tensor-parallel ranks, and along which dimension.

One table for the whole code base: checkpoint conversion (merge/split of TP shards) and the tests that
gather a TP model into a full one both read it. Names are our module names (= HF GPTNeoX minus `gpt_neox.`).
"""

from __future__ import annotations

import torch

# suffix -> partition dim (0: column-parallel / vocab-parallel rows, 1: row-parallel input columns)
_SPLIT_RULES: tuple[tuple[str, int], ...] = (
    ("attention.query_key_value.weight", 0),
    ("attention.query_key_value.bias", 0),
    ("mlp.dense_h_to_4h.weight", 0),
    ("mlp.dense_h_to_4h.bias", 0),
    ("attention.dense.weight", 1),
    ("mlp.dense_4h_to_h.weight", 1),
    ("embed_in.weight", 0),
    ("embed_out.weight", 0),
)


def partition_dim(name: str) -> int | None:
    """TP split dimension of parameter `name`, or None when it is replicated on every TP rank
    (LayerNorms and the row-parallel biases, which are added once after the all-reduce)."""
    for suffix, dim in _SPLIT_RULES:
        if name.endswith(suffix):
            return dim
    return None


def merge_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor from the per-TP-rank shards (replicated tensors must agree; the first is returned)."""
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    return torch.cat(shards, dim=dim)


def split_tensor(name: str, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's shard of a full tensor (the inverse of merge_shards)."""
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise ValueError(
            f"{name}: dim {dim} of size {full.shape[dim]} does not split into {tp_size} TP shards"
        )
    # A compact copy: a dim-0 chunk is already contiguous, so .contiguous() would return a view that keeps the
    # whole full tensor alive (moments held per rank, torch.save of a shard writing the full storage).
    return full.chunk(tp_size, dim=dim)[tp_rank].clone(memory_format=torch.contiguous_format)
