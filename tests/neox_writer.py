"""A miniature writer of EleutherAI's native GPT-NeoX checkpoints (gpt-neox d36f623 + DeeperSpeed 0.3.15,
PipelineModule, ZeRO-1 elastic state), written from the format as docs/neox-checkpoints.md describes it (read from
DeeperSpeed's engine.py, pipe/module.py, zero/stage1.py and gpt-neox's checkpointing.py) and independently of
l2e_dist's reader: its own TP split, its own ZeRO-1 partitioning
(best_max_elems_per_comm, C rank-interleaved intervals, padding cut), fp16 layer files, a pickled loss scaler of a
class the importer does not have, and `"{i}."` names. DeepSpeed 0.19.8 cannot write this layout.

Tensors are given full-width under the GPT-NeoX HF-style names of our model (embed_in.weight, layers.0...., ...);
vocabulary matrices already padded to the source's padded_vocab_size.
"""

from __future__ import annotations

import math
import random
import sys
import types
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

LAYER_KEYS = (  # module (registration) order of a gpt-neox ParallelTransformerLayer's parameters
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)  # fmt: skip
COLUMN_PARALLEL = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
                   "word_embeddings.weight", "final_linear.weight")
ROW_PARALLEL = ("attention.dense.weight", "dense_4h_to_h.weight")


class FakeDynamicLossScaler:
    """DeeperSpeed 0.3.15's DynamicLossScaler attributes; pickled as deepspeed.runtime.fp16.loss_scaler."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


FakeDynamicLossScaler.__module__ = "deepspeed.runtime.fp16.loss_scaler"
FakeDynamicLossScaler.__qualname__ = FakeDynamicLossScaler.__name__ = "DynamicLossScaler"


def pipeline_names(num_layers: int) -> list[tuple[str, str]]:
    """(gpt-neox pipeline name "{i}.{key}", our name) in module order."""
    names = [("0.word_embeddings.weight", "embed_in.weight")]
    for layer in range(num_layers):
        names += [(f"{layer + 2}.{key}", f"layers.{layer}.{key}") for key in LAYER_KEYS]
    names += [(f"{num_layers + 3}.norm.weight", "final_layer_norm.weight"),
              (f"{num_layers + 3}.norm.bias", "final_layer_norm.bias"),
              (f"{num_layers + 4}.final_linear.weight", "embed_out.weight")]
    return names


def tp_local(neox_name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Megatron's split: column-parallel (and vocab-parallel) rows, row-parallel input columns. QKV rows are per
    head [q|k|v], so rank t's rows are heads t*H/tp .. (t+1)*H/tp - 1: a contiguous block of rows."""
    if neox_name.endswith(COLUMN_PARALLEL):
        return full.chunk(tp, dim=0)[rank].clone()
    if neox_name.endswith(ROW_PARALLEL):
        return full.chunk(tp, dim=1)[rank].clone()
    return full.clone()


def weight_decay_group(neox_name: str) -> int:
    """gpt-neox get_params_for_weight_decay_optimization: LayerNorm params and biases -> group 1."""
    module_key = neox_name.split(".", 1)[1]
    return 1 if ("norm" in module_key.split(".")[0] or neox_name.endswith(".bias")) else 0


def best_max_elems_per_comm(num_elements: int, max_elements_per_comm: int, dp: int) -> int:
    """DeeperSpeed zero/stage1.py: the per-communication element budget with the least padding."""
    max_comm_intervals = math.ceil(num_elements / max_elements_per_comm)
    padding_for_max_comm = max_elements_per_comm * max_comm_intervals - num_elements
    min_comm_intervals = num_elements // max_elements_per_comm
    if min_comm_intervals == 0:
        return max_elements_per_comm
    padding_for_min_comm = math.ceil(num_elements / (dp * min_comm_intervals))
    if padding_for_max_comm > padding_for_min_comm:
        return padding_for_min_comm + max_elements_per_comm
    return max_elements_per_comm


def zero1_partition(flat: torch.Tensor, dp: int, bucket: int) -> tuple[list[list[torch.Tensor]], int, int]:
    """The elastic ZeRO-1 pieces of one flat group: pieces[d] = rank d's C sub-partitions (padding cut)."""
    numel = flat.numel()
    budget = best_max_elems_per_comm(numel, bucket, dp)
    per_rank = math.ceil(numel / dp)
    if per_rank <= budget // dp:
        intervals, size = 1, per_rank
    else:
        size = budget // dp
        intervals = math.ceil(per_rank / size)
    padded = torch.cat([flat, flat.new_zeros(intervals * size * dp - numel)])
    pieces: list[list[torch.Tensor]] = [[] for _ in range(dp)]
    for j in range(intervals * dp):
        lean = max(0, min(size, numel - j * size))  # padding cut, as _get_groups_without_padding
        pieces[j % dp].append(padded[j * size : j * size + lean].clone())
    return pieces, intervals, size


def write_neox_checkpoint(
    out_dir: str | Path,
    masters: dict[str, torch.Tensor],
    exp_avg: dict[str, torch.Tensor],
    exp_avg_sq: dict[str, torch.Tensor],
    *,
    num_layers: int,
    num_heads: int,
    tp: int,
    dp: int,
    bucket: int,
    iteration: int,
    skipped_steps: int,
    loss_scaler: dict,
    max_position_embeddings: int = 2048,
    weights_dtype: torch.dtype = torch.float16,
    lr: float = 1e-3,
    batch_size: int = 1024,
) -> dict:
    """Write global_step{iteration}'s files into `out_dir`; returns what was written ({intervals, sub_sizes})."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = pipeline_names(num_layers)
    hidden = masters["embed_in.weight"].shape[1]
    padded_vocab = masters["embed_in.weight"].shape[0]
    for t in range(tp):
        for layer in sorted({int(n.split(".")[0]) for n, _ in names}):
            state = OrderedDict(
                (n.split(".", 1)[1], tp_local(n, masters[ours], tp, t).to(weights_dtype))
                for n, ours in names if int(n.split(".")[0]) == layer
            )
            if 2 <= layer < num_layers + 2:  # the rotary buffer sits in the layer's state_dict too
                head_dim = hidden // num_heads
                rotary = int(head_dim * 0.25)
                state["attention.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
            torch.save(state, out / f"layer_{layer:02d}-model_{t:02d}-model_states.pt")
    global_steps = iteration
    num_iters = iteration - skipped_steps
    args = {"num_layers": num_layers, "hidden_size": hidden, "num_attention_heads": num_heads,
            "max_position_embeddings": max_position_embeddings, "make_vocab_size_divisible_by": 128,
            "padded_vocab_size": padded_vocab, "tokenizer_type": "HFTokenizer", "model_parallel_size": tp}
    for t in range(tp):
        torch.save({
            "module": None,
            "optimizer": None,
            "lr_scheduler": {"start_lr": lr, "warmup_iter": 1430, "num_iters": num_iters, "decay_style": "cosine",
                             "end_iter": 143000, "min_lr": lr / 10},
            "csr_tensor_module_names": set(),
            "skipped_steps": skipped_steps,
            "global_steps": global_steps,
            "global_samples": global_steps * batch_size,
            "dp_world_size": dp,
            "mp_world_size": tp,
            "iteration": iteration,
            "args": args,
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
        }, out / f"mp_rank_{t:02d}_model_states.pt")

    layout = {"intervals": [], "sub_sizes": []}
    scaler = FakeDynamicLossScaler(**loss_scaler)
    fake_modules = {name: types.ModuleType(name) for name in
                    ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler")}
    fake_modules["deepspeed.runtime.fp16.loss_scaler"].DynamicLossScaler = FakeDynamicLossScaler
    for t in range(tp):
        shapes = OrderedDict((n, tp_local(n, masters[ours], tp, t).shape) for n, ours in names)
        per_rank: list[dict] = [{"fp32": [], "exp_avg": [], "exp_avg_sq": []} for _ in range(dp)]
        intervals, sizes = [], []
        for group in (0, 1):
            members = [(n, ours) for n, ours in names if weight_decay_group(n) == group]
            for kind, source in (("fp32", masters), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                flat = torch.cat([tp_local(n, source[ours], tp, t).flatten().float() for n, ours in members])
                pieces, count, size = zero1_partition(flat, dp, bucket)
                for d in range(dp):
                    per_rank[d][kind].append(pieces[d])
            intervals.append(count)
            sizes.append(size)
        layout["intervals"].append(intervals)
        layout["sub_sizes"].append(sizes)
        for d in range(dp):
            state = {
                "loss_scaler": scaler,
                "dynamic_loss_scale": True,
                "overflow": False,
                "base_optimizer_state": [
                    [{"exp_avg": a, "exp_avg_sq": b} for a, b in zip(per_rank[d]["exp_avg"][g], per_rank[d]["exp_avg_sq"][g])]
                    for g in (0, 1)
                ],
                "zero_stage": 1,
                "partition_count": dp,
                "num_comm_intervals_per_group": intervals,
                "local_sub_partitions_of_fp32_groups": per_rank[d]["fp32"],
            }
            with mock.patch.dict(sys.modules, fake_modules):
                torch.save({"optimizer_state_dict": state, "param_shapes": shapes},
                           out / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")
    return layout


def random_state(num_layers: int, hidden: int, padded_vocab: int, seed: int, positive: bool = False,
                 scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Full-width tensors of every parameter (our names) drawn from `seed` (|x| when `positive`)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"embed_in.weight": (padded_vocab, hidden), "final_layer_norm.weight": (hidden,),
              "final_layer_norm.bias": (hidden,), "embed_out.weight": (padded_vocab, hidden)}
    for layer in range(num_layers):
        p = f"layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "input_layernorm.bias": (hidden,),
                       p + "attention.query_key_value.weight": (3 * hidden, hidden),
                       p + "attention.query_key_value.bias": (3 * hidden,),
                       p + "attention.dense.weight": (hidden, hidden), p + "attention.dense.bias": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,), p + "post_attention_layernorm.bias": (hidden,),
                       p + "mlp.dense_h_to_4h.weight": (4 * hidden, hidden), p + "mlp.dense_h_to_4h.bias": (4 * hidden,),
                       p + "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden), p + "mlp.dense_4h_to_h.bias": (hidden,)})
    out = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator) * scale
        if name.endswith("layernorm.weight") or name == "final_layer_norm.weight":
            values = 1.0 + 0.1 * values  # a LayerNorm gain near 1, as trained models have
        out[name] = values.abs() if positive else values
    return out
