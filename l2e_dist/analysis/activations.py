"""Load a GPT-NeoX model as transformers' `GPTNeoXForCausalLM` and record MLP activations of chosen layers.

The model runs in one process (no torch.distributed): an HF directory (our export or a published Pythia
checkpoint) through `from_pretrained`, or one of our training checkpoints through
`l2e_dist.checkpoint.convert.load_as_hf_state_dict` (any TP layout, merged to HF names).
The neuron of the L2E method is one channel of `gpt_neox.layers[i].mlp.act`: its output is the post-GELU
activation ("post_act", the default), its input the pre-GELU one ("pre_act").
Activations are written as float32 `.npy` memory maps (one [tokens, intermediate_size] file per layer), so the
sample may be larger than RAM; the analysis then reads them layer by layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from l2e_dist.errors import UserError


class ModelLoadError(UserError, ValueError):
    """A model path that is neither an HF GPTNeoX directory nor a readable training checkpoint."""


def _hf_model_from_state(state: dict[str, torch.Tensor], config: dict) -> torch.nn.Module:
    """`GPTNeoXForCausalLM` holding `state` (HF names as in Pythia's files: transformers 5 calls the output
    layer `lm_head`, Pythia `embed_out`)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(config))
    renamed = {("lm_head." + k[len("embed_out."):] if k.startswith("embed_out.") else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match GPTNeoXForCausalLM: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    return model


def load_gptneox(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """`GPTNeoXForCausalLM` in eval mode from an HF directory or one of our training checkpoints."""
    path = Path(path)
    if (path / "config.json").is_file():
        from transformers import GPTNeoXForCausalLM

        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "gpt_neox":
            raise ModelLoadError(f"{path} holds a {model_type!r} model, not GPT-NeoX (Pythia)")
        try:
            model = GPTNeoXForCausalLM.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load HF model {path}: {exc}") from None
    elif path.exists():
        from l2e_dist.checkpoint.convert import load_as_hf_state_dict
        from l2e_dist.checkpoint.manifest import CheckpointError

        try:
            state, config = load_as_hf_state_dict(path)
        except CheckpointError as exc:
            raise ModelLoadError(f"{path} has no config.json and is not a readable training checkpoint: {exc}") \
                from None
        model = _hf_model_from_state(state, config).to(dtype)
    else:
        raise ModelLoadError(f"model not found: {path} (give an HF GPTNeoX directory or a training checkpoint)")
    return model.to(device).eval()


def record_activations(
    model: torch.nn.Module,
    tokens: np.ndarray,
    layers: list[int],
    out_dir: str | Path,
    *,
    where: Literal["post_act", "pre_act"] = "post_act",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """Run `tokens[rows, seq]` through the model; {layer: float32 memmap [rows * seq, intermediate_size]}."""
    if where not in ("post_act", "pre_act"):
        raise ValueError(f"activation must be post_act or pre_act, got {where!r}")
    blocks = model.gpt_neox.layers
    width = model.config.intermediate_size
    num_rows, seq_length = tokens.shape
    os.makedirs(out_dir, exist_ok=True)
    stores = {lid: np.lib.format.open_memmap(os.path.join(out_dir, f"layer{lid}.npy"), mode="w+",
                                             dtype=np.float32, shape=(num_rows * seq_length, width))
              for lid in layers}
    device = next(model.parameters()).device
    cursor = {"rows": slice(0, 0)}

    def keep(lid: int, module, inputs, output) -> None:
        value = inputs[0] if where == "pre_act" else output
        stores[lid][cursor["rows"]] = value.reshape(-1, width).float().cpu().numpy()

    handles = [blocks[lid].mlp.act.register_forward_hook(lambda m, i, o, lid=lid: keep(lid, m, i, o))
               for lid in layers]
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, num_rows, batch_size), desc="activations", unit="batch", disable=not progress,
                              dynamic_ncols=True):
                batch = torch.from_numpy(tokens[start:start + batch_size]).to(device)
                cursor["rows"] = slice(start * seq_length, (start + batch.shape[0]) * seq_length)
                model.gpt_neox(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for store in stores.values():
        store.flush()
    return stores
