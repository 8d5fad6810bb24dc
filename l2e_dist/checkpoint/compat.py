"""Whether saved weights fit a model config: the architecture fields that must match, the vocabulary rows that may
be cut or padded, and the format tag of imported (HF -> ours) checkpoints. Used by resume, resharding and
conversion alike."""

from __future__ import annotations

from typing import Any

import torch

from l2e_dist.checkpoint.manifest import CheckpointError
from l2e_dist.model.config import ModelConfig

VOCAB_ROW_TENSORS = ("embed_in.weight", "embed_out.weight")
IMPORT_FORMAT = "l2e-dist-import/1"


def resize_vocab_rows(name: str, tensor: torch.Tensor, rows: int, real_vocab: int) -> torch.Tensor:
    """Cut or zero-pad the padding rows of an embedding/output matrix to `rows` (never real-token rows)."""
    if name not in VOCAB_ROW_TENSORS or tensor.shape[0] == rows:
        return tensor
    if rows < real_vocab:
        raise CheckpointError(f"{name}: cannot shrink to {rows} rows, the vocabulary has {real_vocab} tokens")
    if rows < tensor.shape[0]:
        return tensor[:rows].clone()
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that define the weights and the function (resolved: intermediate_size None = 4h)."""
    return {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.ffn_size, "rotary_pct": cfg.rotary_pct, "rotary_base": cfg.rotary_base,
        "layernorm_eps": cfg.layernorm_eps, "gelu_approximate": cfg.gelu_approximate,
        "use_parallel_residual": cfg.use_parallel_residual,
    }  # fmt: skip


def architecture_mismatch(saved: ModelConfig, current: ModelConfig, pythia_gelu_label: bool = False) -> str:
    """'' when both configs describe the same architecture, else which fields differ. `pythia_gelu_label`: the
    saved config comes from a gpt_neox HF config.json saying "gelu", which Pythia's published revisions say
    of their tanh-trained models, so a tanh run config is no mismatch (see pythia_gelu_note)."""
    before, now = architecture(saved), architecture(current)
    if pythia_gelu_label and (before["gelu_approximate"], now["gelu_approximate"]) == ("none", "tanh"):
        before["gelu_approximate"] = "tanh"
    return ", ".join(f"model.{k}: checkpoint {before[k]!r}, config {now[k]!r}" for k in before if before[k] != now[k])


def pythia_gelu_note(saved: ModelConfig, current: ModelConfig, pythia_gelu_label: bool, path: object) -> str:
    """The one-line note printed when a "gelu" label was read as Pythia's tanh, '' when it was not."""
    if not pythia_gelu_label or (saved.gelu_approximate, current.gelu_approximate) != ("none", "tanh"):
        return ""
    return (f"l2e-dist: {path} says hidden_act 'gelu', Pythia's label for its tanh-trained GELU: training with "
            "model.gelu_approximate=tanh as the config says (set it to none for an exact-erf GELU model)")
