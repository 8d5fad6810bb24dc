"""Model hyperparameters of a GPT-NeoX / Pythia model (YAML section `model:`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from l2e_dist.config_utils import ConfigError


@dataclass
class ModelConfig:
    num_layers: int = 6  # transformer layers
    hidden_size: int = 512  # model width
    num_attention_heads: int = 8  # must divide hidden_size (and be divisible by the TP size)
    intermediate_size: int | None = None  # None -> 4 x hidden_size (Pythia)
    vocab_size: int | None = None  # None -> taken from the tokenizer of the data
    max_position_embeddings: int = 2048  # longest sequence (train.seq_length <= this)
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings
    rotary_base: int = 10000  # RoPE base frequency
    layernorm_eps: float = 1e-5  # epsilon of every LayerNorm
    gelu_approximate: Literal["tanh", "none"] = "tanh"  # Pythia trained with the tanh approximation
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x))
    make_vocab_size_divisible_by: int = 128  # times the TP size, as in Megatron/GPT-NeoX
    # GPT-NeoX's init-method / output-layer-init-method (neox_args names). init_method: embedding, QKV, h_to_4h
    # and the output layer; output_layer_init_method: attention.dense and 4h_to_h (the residual-branch outputs).
    # Pythia 70m..2.8b: small_init sqrt(2 / (5 h)) + wang_init 2 / (L sqrt(h)); 6.9b and 12b set none, so
    # gpt-neox's defaults applied: normal (init_std) + scaled_normal (init_std / sqrt(2 L)).
    init_method: Literal["small_init", "normal"] = "small_init"
    output_layer_init_method: Literal["wang_init", "scaled_normal", "normal"] = "wang_init"  # see init_method
    init_std: float = 0.02  # gpt-neox init_method_std: used by "normal" and "scaled_normal"
    # Compute only (not an architecture parameter): tokens per chunk of the output projection + cross entropy;
    # the fp32 logits held at once are loss_chunk_tokens x vocab/TP (4096 x 50304 x 4 B = 0.8 GB).
    loss_chunk_tokens: int = 4096
    # Compute only: "chunked" upcasts each chunk's logits to fp32 and walks them in place; "fused" reads them in
    # the weights' dtype in two passes (statistics, then the gradient), compiled into one kernel each on CUDA
    # (model/fused_cross_entropy.py). Same values and gradients.
    cross_entropy: Literal["chunked", "fused"] = "chunked"
    # Compute only: the scaled-dot-product-attention kernel. auto: PyTorch's choice; math / flash / efficient /
    # cudnn: that one (efficient and cudnn exist only on CUDA; a backend without a kernel for the run's device,
    # dtype and head size is a config error at start-up, model/attention_backend.py).
    attention_backend: Literal["auto", "math", "flash", "efficient", "cudnn"] = "auto"

    def validate(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "num_attention_heads",
                f"must divide hidden_size ({self.hidden_size} % {self.num_attention_heads} != 0)",
            )
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError("intermediate_size", "must be >= 1 (or null for 4 x hidden_size)")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError("vocab_size", "must be >= 2 (or null to take it from the tokenizer)")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError("rotary_pct", f"must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ConfigError("rotary_pct", f"rotary dims per head ({self.rotary_dims}) must be even")
        if self.layernorm_eps <= 0:
            raise ConfigError("layernorm_eps", "must be > 0")
        if self.loss_chunk_tokens < 1:
            raise ConfigError("loss_chunk_tokens", f"must be >= 1, got {self.loss_chunk_tokens}")
        if self.init_std <= 0:
            raise ConfigError("init_std", f"must be > 0, got {self.init_std}")
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError("make_vocab_size_divisible_by", "must be >= 1")

    def init_stds(self) -> tuple[float, float]:
        """(std of init_method, std of output_layer_init_method), as gpt-neox's init_functions.py computes them."""
        h, n = self.hidden_size, self.num_layers
        std_in = math.sqrt(2.0 / (5.0 * h)) if self.init_method == "small_init" else self.init_std
        std_out = {
            "wang_init": 2.0 / (n * math.sqrt(h)),
            "scaled_normal": self.init_std / math.sqrt(2.0 * n),
            "normal": self.init_std,
        }[self.output_layer_init_method]
        return std_in, std_out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Vocab rounded up to a multiple of `make_vocab_size_divisible_by * TP` (Megatron convention)."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size", "unknown: set model.vocab_size or use data with a tokenizer")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, padded_vocab: int) -> int:
        """Parameter count (embeddings included), used for logging and the MFU estimate."""
        h, f, n = self.hidden_size, self.ffn_size, self.num_layers
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return n * per_layer + 2 * padded_vocab * h + 2 * h

    def flops_per_token(self, seq_length: int, padded_vocab: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), Megatron/PaLM accounting."""
        h, f, n = self.hidden_size, self.ffn_size, self.num_layers
        matmul_params = n * (4 * h * h + 2 * h * f) + padded_vocab * h
        attention = n * 2 * seq_length * h  # QK^T and AV per token
        return 3 * 2 * (matmul_params + attention)
