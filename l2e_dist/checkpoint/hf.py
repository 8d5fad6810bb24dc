"""Mapping between our GPT-NeoX model and Hugging Face `GPTNeoXForCausalLM` (names and config).

Our parameter names are HF's without the `gpt_neox.` prefix (the output layer `embed_out` sits at the top
level in both), and the QKV layout is the same per-head interleave, so a full (TP-merged) state dict maps
1:1 with no reordering.
"""

from __future__ import annotations

import torch

from l2e_dist.model.config import ModelConfig

_HF_PREFIX = "gpt_neox."
_TOP_LEVEL = ("embed_out.",)
# The activation label (docs/pythia.md). Export writes what transformers computes as the run trained:
# tanh -> "gelu_pytorch_tanh", none -> "gelu" (exact erf). Import reads labels literally, except one: Pythia's
# published config.json says "gelu" though every Pythia model trained with tanh (gpt-neox bias-gelu-fusion), so
# a gpt_neox "gelu" is also accepted as Pythia's label by a run config with gelu_approximate tanh
# (compat.architecture_mismatch(pythia_gelu_label=True)).
_GELU = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}
_GELU_FROM_HF = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}
PYTHIA_GELU_LABEL = "gelu"


def to_hf_name(name: str) -> str:
    return name if name.startswith(_TOP_LEVEL) else _HF_PREFIX + name


def from_hf_name(name: str) -> str:
    return name[len(_HF_PREFIX) :] if name.startswith(_HF_PREFIX) else name


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names as in Pythia's published checkpoints (`embed_out.weight`; transformers >= 5 renames it to
    `lm_head.weight` on load). megatron-core's `_extra_state` entries carry no weights and are dropped."""
    return {to_hf_name(k): v for k, v in state.items() if not k.endswith("_extra_state")}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors under our names; HF-only buffers (rotary inv_freq, causal masks) are dropped."""
    renamed = {
        ("embed_out." + k[len("lm_head.") :] if k.startswith("lm_head.") else k): v for k, v in state.items()
    }
    return {
        from_hf_name(k): v
        for k, v in renamed.items()
        if not k.endswith((".inv_freq", ".attention.bias", ".attention.masked_bias"))
    }


def hf_config(cfg: ModelConfig, padded_vocab_size: int, eos_token_id: int | None = None):
    """A `GPTNeoXConfig` equivalent to `cfg` (vocab = the padded size, as Pythia's published configs)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=padded_vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=_GELU[cfg.gelu_approximate],
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layernorm_eps,
        use_parallel_residual=cfg.use_parallel_residual,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_base,
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=eos_token_id if eos_token_id is not None else 0,
        eos_token_id=eos_token_id if eos_token_id is not None else 0,
        torch_dtype="float32",
    )


def hf_config_dict(cfg: ModelConfig, padded_vocab_size: int, eos_token_id: int | None = None) -> dict:
    """config.json content: transformers 5's fields plus the legacy rotary keys transformers 4 reads (it would
    silently fall back to rotary_pct=0.25 without them)."""
    config = hf_config(cfg, padded_vocab_size, eos_token_id).to_dict()
    config.update(
        architectures=["GPTNeoXForCausalLM"], rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base
    )
    return config


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """Our ModelConfig from a `GPTNeoXConfig` (vocab_size = HF's, which is already padded for Pythia)."""
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if hf_cfg.hidden_act not in _GELU_FROM_HF:
        raise ValueError(
            f"hidden_act {hf_cfg.hidden_act!r} is not a GELU GPT-NeoX/Pythia can train with (one of "
            f"{list(_GELU_FROM_HF)})"
        )
    if getattr(hf_cfg, "tie_word_embeddings", False):
        raise ValueError("tied input/output embeddings are not a GPT-NeoX/Pythia layout")
    return ModelConfig(
        num_layers=hf_cfg.num_hidden_layers,
        hidden_size=hf_cfg.hidden_size,
        num_attention_heads=hf_cfg.num_attention_heads,
        intermediate_size=hf_cfg.intermediate_size,
        vocab_size=hf_cfg.vocab_size,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        rotary_pct=float(rope.get("partial_rotary_factor", getattr(hf_cfg, "rotary_pct", 0.25))),
        rotary_base=int(rope.get("rope_theta", getattr(hf_cfg, "rotary_emb_base", 10000))),
        layernorm_eps=hf_cfg.layer_norm_eps,
        gelu_approximate=_GELU_FROM_HF[hf_cfg.hidden_act],
        use_parallel_residual=hf_cfg.use_parallel_residual,
        make_vocab_size_divisible_by=1,
    )
