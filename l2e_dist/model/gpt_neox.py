"""GPT-NeoX / Pythia built from megatron-core tensor-parallel layers.

One file, read top to bottom: rotary embeddings -> attention -> MLP -> parallel-residual layer -> model.
Module and parameter names match Hugging Face's `GPTNeoXForCausalLM` (minus its `gpt_neox.` prefix) so that
checkpoint conversion is a rename plus TP merge. QKV rows are interleaved per head (q, k, v of head 0, then
head 1, ...), as in GPT-NeoX and HF; a column-parallel split therefore gives each TP rank whole heads.

The MLP exposes two `nn.Identity` probes (`pre_act_probe`, `post_act_probe`) at the neuron activation: the
L2E engine attaches forward hooks there, so this file knows nothing of L2E (nor of DeepSpeed).

At TP=1 the parameters stay in the megatron-core layers but linear layers run as one `F.linear` (profiled on
CPU against transformers' GPTNeoXForCausalLM: a fused addmm; megatron's path is matmul + separate bias add
through extra autograd functions); TP>1 uses megatron-core's layers as they are. The output projection and the
cross entropy run together in chunks of tokens (lm_head_loss.py: vocab-parallel, in-place softmax, gradients
in the forward for the training mean), so the fp32 logits of a whole micro-batch never exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from l2e_dist.model.attention_backend import causal_attention
from l2e_dist.model.config import ModelConfig
from l2e_dist.model.fused_cross_entropy import lm_head_loss_function


def _linear(layer: nn.Module, x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Output of a megatron-core Column/RowParallelLinear (skip_bias_add=False); at TP=1 through F.linear on
    the same parameters, which is what megatron computes there (its TP regions are identities)."""
    if tp_size == 1:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)[0]


def _normal_init(std: float):
    def init(tensor: torch.Tensor) -> None:
        nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def init_methods(cfg: ModelConfig) -> tuple:
    """GPT-NeoX init (model.init_method / output_layer_init_method): the first for the embedding, QKV, h_to_4h and
    the output layer, the second for the residual-branch outputs (attention.dense, 4h_to_h); biases zero."""
    std_in, std_out = cfg.init_stds()
    return _normal_init(std_in), _normal_init(std_out)


def megatron_config(cfg: ModelConfig) -> TransformerConfig:
    """The megatron-core config the TP layers need. CPU initialisation makes the full weights identical for
    every TP size (each rank draws the whole matrix from the same seed and keeps its slice)."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the first `rotary_dims` dims of each head (GPT-NeoX "rotate_half" layout)."""

    def __init__(self, rotary_dims: int, base: int):
        super().__init__()
        self.rotary_dims, self.base = rotary_dims, base
        self.register_buffer("inv_freq", self._inverse_frequencies(), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def _inverse_frequencies(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dims, 2, dtype=torch.int64, device=device).float() / self.rotary_dims
        return 1.0 / (self.base ** exponents)

    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) tables after a model built on the meta device was materialised."""
        self.inv_freq = self._inverse_frequencies(self.inv_freq.device)
        self._cache = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (seq_len, device, emb.cos(), emb.sin())
        return self._cache[2][:seq_len], self._cache[3][:seq_len]


class _SplitQKVRotary(torch.autograd.Function):
    """qkv [b, s, heads, 3*head_dim] (per-head q|k|v) -> contiguous q, k, v [b, heads, s, head_dim], with rotary
    applied to q and k.

    One output buffer written once: with c, s the cos/sin of the first half of the rotary dims (the second half
    repeats them), rotate_half gives out1 = x1*c - x2*s and out2 = x2*c + x1*s. The backward is the inverse
    rotation written straight into one [b, s, heads, 3*head_dim] gradient, instead of the split/chunk/cat
    chain's temporaries and zero-filled slice gradients (the profile: docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int):
        b, s, heads, width = qkv.shape
        hd = width // 3
        src = qkv.view(b, s, heads, 3, hd).permute(3, 0, 2, 1, 4)  # [3, b, heads, s, hd] view
        out = torch.empty((3, b, heads, s, hd), dtype=qkv.dtype, device=qkv.device)
        half = rotary_dims // 2
        if half == 0:
            out.copy_(src)
        else:
            c, sn = cos[:, :half].to(qkv.dtype), sin[:, :half].to(qkv.dtype)
            _rotate_into(out[:2], src[:2], c, sn, half, inverse=False)
            out[2].copy_(src[2])
        ctx.save_for_backward(c if half else cos, sn if half else sin)
        ctx.shape, ctx.half = (b, s, heads, width), half
        return out[0], out[1], out[2]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        c, sn = ctx.saved_tensors
        b, s, heads, width = ctx.shape
        hd = width // 3
        grad = torch.empty((b, s, heads, width), dtype=grad_q.dtype, device=grad_q.device)
        dst = grad.view(b, s, heads, 3, hd).permute(3, 0, 2, 1, 4)
        dst[2].copy_(grad_v)
        if ctx.half == 0:
            dst[0].copy_(grad_q)
            dst[1].copy_(grad_k)
        else:
            _rotate_into(dst[0], grad_q, c, sn, ctx.half, inverse=True)
            _rotate_into(dst[1], grad_k, c, sn, ctx.half, inverse=True)
        return grad, None, None, None


def _rotate_into(out: torch.Tensor, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, half: int, inverse: bool):
    """out[..., :2h] = x rotated by +angle (or -angle for the backward); out[..., 2h:] = x[..., 2h:]."""
    x1, x2 = x[..., :half], x[..., half:2 * half]
    o1, o2 = out[..., :half], out[..., half:2 * half]
    sign = 1.0 if inverse else -1.0
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=sign)  # forward: x1*c - x2*s; inverse: x1*c + x2*s
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s, value=-sign)  # forward: x2*c + x1*s; inverse: x2*c - x1*s
    out[..., 2 * half:].copy_(x[..., 2 * half:])


def split_qkv_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int):
    """q, k, v [b, heads, s, head_dim] from qkv [b, s, heads, 3*head_dim]; equal to view/transpose/split then
    GPT-NeoX's rotate_half rotary on q and k (tests/test_model_tp.py checks values and gradients against it).
    Inside torch.compile that plain form runs instead: Dynamo cannot trace the `out=` writes into views of the
    hand-written function (a graph break), and Inductor fuses the plain ops itself."""
    if torch.compiler.is_compiling():
        q, k, v = qkv.transpose(1, 2).split(qkv.shape[-1] // 3, dim=-1)
        return _rotary(q, cos, sin, rotary_dims), _rotary(k, cos, sin, rotary_dims), v
    return _SplitQKVRotary.apply(qkv, cos, sin, rotary_dims)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """GPT-NeoX's rotary on the first `rotary_dims` dims of x [b, heads, s, head_dim] (rotate_half layout)."""
    if rotary_dims == 0:
        return x
    rotated, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    first, second = rotated.chunk(2, dim=-1)
    return torch.cat((rotated * cos + torch.cat((-second, first), dim=-1) * sin, rest), dim=-1)


class ParallelAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig, init_in, init_out):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_size = tp
        self.heads_local = cfg.num_attention_heads // tp
        self.head_dim = cfg.head_dim
        self.rotary_dims = cfg.rotary_dims
        self.attention_backend = cfg.attention_backend
        h = cfg.hidden_size
        self.query_key_value = ColumnParallelLinear(
            h, 3 * h, config=mcfg, init_method=init_in, bias=True, gather_output=False
        )
        self.dense = RowParallelLinear(
            h, h, config=mcfg, init_method=init_out, bias=True, input_is_parallel=True, skip_bias_add=False
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """reduce=False (TP>1): this rank's partial sum of the output projection, without bias."""
        b, s, _ = x.shape
        qkv = _linear(self.query_key_value, x, self.tp_size)
        q, k, v = split_qkv_rotary(qkv.view(b, s, self.heads_local, 3 * self.head_dim), cos, sin, self.rotary_dims)
        ctx = causal_attention(q, k, v, self.attention_backend)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.heads_local * self.head_dim)
        return _linear(self.dense, ctx, self.tp_size) if reduce else F.linear(ctx, self.dense.weight)


class ParallelMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig, init_in, init_out):
        super().__init__()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_size, config=mcfg, init_method=init_in, bias=True, gather_output=False
        )
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_size,
            cfg.hidden_size,
            config=mcfg,
            init_method=init_out,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.gelu_approximate = cfg.gelu_approximate
        # Neuron activation probes (identity): L2E hooks attach here; each TP rank sees its slice of neurons.
        self.pre_act_probe = nn.Identity()
        self.post_act_probe = nn.Identity()

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """reduce=False (TP>1): this rank's partial sum of the output projection, without bias."""
        return self.project_down(self.activation(self.project_up(x)), reduce)

    def project_up(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.dense_h_to_4h, x, self.tp_size)

    def activation(self, hidden: torch.Tensor) -> torch.Tensor:
        """The neuron activation between its two probes. A compiled layer runs this part eagerly, so that the
        probes' (L2E) hooks stay outside its graphs (ParallelResidualLayer.compile_around_activation)."""
        hidden = self.pre_act_probe(hidden)
        hidden = F.gelu(hidden, approximate=self.gelu_approximate)
        return self.post_act_probe(hidden)

    def project_down(self, hidden: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if not reduce:
            return F.linear(hidden, self.dense_4h_to_h.weight)
        return _linear(self.dense_4h_to_h, hidden, self.tp_size)


class ParallelResidualLayer(nn.Module):
    """GPT-NeoX layer: x + attn(ln1(x)) + mlp(ln2(x)) (or sequential when use_parallel_residual is false).

    megatron-core has no parallel-residual layer; this is it. At TP>1 with the parallel residual, the two
    row-parallel partial sums are added first and all-reduced once (one collective per layer instead of two, as
    in GPT-NeoX), then the two full (replicated) biases are added; otherwise each branch is reduced by its
    RowParallelLinear.
    """

    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig, init_in, init_out):
        super().__init__()
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attention = ParallelAttention(cfg, mcfg, init_in, init_out)
        self.mlp = ParallelMLP(cfg, mcfg, init_in, init_out)
        # TP>1 with the parallel residual: both branches' partial sums are added, then all-reduced once
        self._reduces_once = self.use_parallel_residual and self.attention.tp_size > 1

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        branch, pre_activation = self.before_activation(x, cos, sin)
        return self.after_activation(x, branch, self.mlp.activation(pre_activation))

    def before_activation(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to the MLP neuron activation: the attention branch (x + attention, or at TP>1 with the parallel
        residual this rank's partial sum) and the MLP's pre-activation."""
        if self._reduces_once:
            branch = self.attention(self.input_layernorm(x), cos, sin, reduce=False)
            mlp_input = self.post_attention_layernorm(x)
        else:
            branch = x + self.attention(self.input_layernorm(x), cos, sin)
            mlp_input = self.post_attention_layernorm(x if self.use_parallel_residual else branch)
        return branch, self.mlp.project_up(mlp_input)

    def after_activation(self, x: torch.Tensor, branch: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """From the MLP neuron activation on: the output projection and the residual sum."""
        if self._reduces_once:
            partial = branch + self.mlp.project_down(activation, reduce=False)
            out = reduce_from_tensor_model_parallel_region(partial)  # backward: identity, as megatron's row layers
            return x + out + (self.attention.dense.bias + self.mlp.dense_4h_to_h.bias)
        return branch + self.mlp.project_down(activation)

    def compile_around_activation(self, backend: str | Callable = "inductor") -> None:
        """torch.compile the two halves of the layer and leave the MLP activation with its probes eager between
        them. The L2E hooks on the probes read and update the engine's per-step state; inside a graph Dynamo
        guards on it and compiles new graphs step after step. Only instance attributes change, so state-dict
        names stay those of the eager layer. fullgraph (a graph break is an error) at TP=1; megatron-core's TP>1
        layers do not trace whole (a warnings.warn in its linear), so there the halves may break around them."""
        fullgraph = self.attention.tp_size == 1
        self.before_activation = torch.compile(self.before_activation, backend=backend, fullgraph=fullgraph)
        self.after_activation = torch.compile(self.after_activation, backend=backend, fullgraph=fullgraph)


class GPTNeoX(nn.Module):
    """Pythia-style decoder. `forward(tokens, labels)` returns per-token losses [b, s] (vocab-parallel
    cross entropy, so logits are never gathered); without labels, this TP rank's logits shard [b, s, V/tp]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_size = tp
        if cfg.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by TP={tp}")
        self.padded_vocab_size = cfg.padded_vocab_size(tp)
        mcfg = megatron_config(cfg)
        init_in, init_out = init_methods(cfg)
        self.activation_checkpointing = False
        self.embed_in = VocabParallelEmbedding(
            self.padded_vocab_size, cfg.hidden_size, init_method=init_in, config=mcfg
        )
        self.rotary = RotaryEmbedding(cfg.rotary_dims, cfg.rotary_base)
        self.layers = nn.ModuleList(
            ParallelResidualLayer(cfg, mcfg, init_in, init_out) for _ in range(cfg.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.embed_out = ColumnParallelLinear(
            cfg.hidden_size,
            self.padded_vocab_size,
            config=mcfg,
            init_method=init_in,
            bias=False,
            gather_output=False,
        )

    def materialize(self, device: torch.device) -> None:
        """A model built under `torch.device("meta")` gets uninitialised storage on `device` (every parameter
        must then be loaded, e.g. by checkpoint.convert.load_init_weights) and its computed buffers."""
        self.to_empty(device=device)
        self.rotary.reset_buffers()

    def compile_layers(self, backend: str | Callable = "inductor") -> None:
        """`train.compile`: torch.compile each transformer layer in place, up to and from its MLP activation;
        the activation probes (L2E hooks) run eagerly in between (ParallelResidualLayer.compile_around_activation).
        State-dict names are unchanged, so checkpoints and HF conversion are unaffected."""
        for layer in self.layers:
            layer.compile_around_activation(backend)

    def mlp_probes(self, activation: str = "post_act") -> dict[int, nn.Module]:
        """Layer index -> the identity module at the MLP neuron activation (for L2E hooks)."""
        name = {"post_act": "post_act_probe", "pre_act": "pre_act_probe"}[activation]
        return {i: getattr(layer.mlp, name) for i, layer in enumerate(self.layers)}

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "none"
    ) -> torch.Tensor:
        """Per-token losses [b, s] (reduction "none") or their mean (training), or without labels this rank's
        logits shard. The loss never materialises the micro-batch's full logits (lm_head_loss.py)."""
        x = self.embed_in(tokens)
        cos, sin = self.rotary(tokens.shape[1], x.device)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        hidden = self.final_layer_norm(x)
        if labels is None:
            return _linear(self.embed_out, hidden, self.tp_size)
        loss = lm_head_loss_function(self.cfg.cross_entropy)
        return loss(hidden, self.embed_out.weight, labels, self.cfg.loss_chunk_tokens, reduction)
