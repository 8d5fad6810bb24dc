"""Per-rank memory estimate of a run (what `l2e-pretrain --dry-run` prints): parameters, gradients and
optimizer state for the chosen precision, ZeRO stage and TP/DP sizes, and activations at the micro-batch.

Model states follow DeepSpeed's accounting (deepspeed.runtime.zero: estimate_zero2/3_model_states_mem_needs),
with P the parameters one TP rank holds and N the data-parallel size, w the bytes of the working precision
(2 for bf16/fp16, 4 for fp32) and AdamW:
    parameters   w*P (ZeRO 0-2); ZeRO-3: its w*P/N partition + 4*L for the gathered largest layer (L params)
    gradients    w*P (+ 4*P/N fp32 partition at ZeRO-1, + 4*P fp32 at stage 0 in mixed precision);
                 ZeRO-2/3: (w + 4)*P/N (reduce-scattered)
    optimizer    fp32 master copy + 2 moments: 12*P/N at ZeRO >= 1; stage 0: 8*P (+ 4*P master in mixed)
For mixed precision at ZeRO-2 the sum is DeepSpeed's 2*P + 18*P/N; at ZeRO-3 it is DeepSpeed's 4*L + 18*P/N
plus the 2*P/N 16-bit parameter partition that each rank holds and DeepSpeed's formula leaves out.
Activations: Korthikanti et al. 2022 (Megatron) per layer s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes at 16 bits
(twice at fp32), only each layer's input (2*s*b*h) with activation checkpointing, plus the fp32 logits and
their gradient (8*s*b*V/t). An estimate: allocator fragmentation and communication buffers are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from l2e_dist.model.config import ModelConfig

GIB = 2**30


def params_per_tp_rank(model: ModelConfig, tp: int, padded_vocab: int) -> tuple[int, int]:
    """(parameters one TP rank holds, parameters of the largest single module) for a GPT-NeoX layout:
    QKV/fc1 column-parallel (bias split), dense/fc2 row-parallel (bias replicated), layer norms replicated,
    embedding and output head vocab-parallel."""
    h, f, n = model.hidden_size, model.ffn_size, model.num_layers
    per_layer = 4 * h + (3 * h * h + 3 * h) // tp + (h * h) // tp + h + (h * f + f) // tp + (f * h) // tp + h
    embedding = padded_vocab // tp * h
    largest = max(embedding, (3 * h * h + 3 * h) // tp, (h * f + f) // tp)
    return n * per_layer + 2 * embedding + 2 * h, largest


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    def describe(self) -> str:
        parts = [("params", self.parameters), ("grads", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("total", self.total)]
        return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts)


def model_state_bytes(params: int, largest_layer: int, dp: int, zero_stage: int, precision: str) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes on one rank; see the module docstring."""
    mixed = precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed else 4  # per parameter or gradient in the training precision
    if zero_stage >= 3:
        parameters = weight_bytes * params // dp + 4 * largest_layer
    else:
        parameters = weight_bytes * params
    if zero_stage >= 2:
        gradients = (weight_bytes + 4) * params // dp
    elif zero_stage == 1:
        gradients = weight_bytes * params + 4 * params // dp
    else:
        gradients = weight_bytes * params + (4 * params if mixed else 0)
    optimizer = 12 * params // dp if zero_stage >= 1 else (12 if mixed else 8) * params
    return parameters, gradients, optimizer


def activation_bytes(model: ModelConfig, micro_batch: int, seq_length: int, tp: int, padded_vocab: int,
                     precision: str, checkpointing: bool) -> int:
    s, b, h, a = seq_length, micro_batch, model.hidden_size, model.num_attention_heads
    scale = 1 if precision in ("bf16", "fp16") else 2
    full_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp)) * scale
    if checkpointing:
        layers = model.num_layers * 2 * s * b * h * scale + full_layer
    else:
        layers = model.num_layers * full_layer
    logits = 8 * s * b * padded_vocab // tp
    return int(layers + logits)


def estimate_memory(model: ModelConfig, tp: int, dp: int, zero_stage: int, precision: str, micro_batch: int,
                    seq_length: int, checkpointing: bool) -> MemoryEstimate:
    padded_vocab = model.padded_vocab_size(tp)
    params, largest = params_per_tp_rank(model, tp, padded_vocab)
    parameters, gradients, optimizer = model_state_bytes(params, largest, dp, zero_stage, precision)
    activations = activation_bytes(model, micro_batch, seq_length, tp, padded_vocab, precision, checkpointing)
    return MemoryEstimate(parameters, gradients, optimizer, activations)
