"""`model.attention_backend`: which scaled-dot-product-attention kernel the layers use.

"auto" leaves the choice to PyTorch (today's path: no context manager at all). The others pin one backend through
`torch.nn.attention.sdpa_kernel` (PyTorch >= 2.3, so every supported torch 2.11-2.13), entered around the
attention call itself: inside a `train.compile`d layer (Dynamo traces the context manager) and inside the
recomputation of activation checkpointing, so the backward recomputes with the same kernel.

A backend that has no kernel for the run (efficient / cudnn on a CPU, flash for a head size or dtype it lacks)
would fail at the first forward, after data, model and engine were set up; `check_attention_backend` runs one
tiny attention forward and backward with the run's device, dtype and head size at start-up and turns that failure
into a one-line config error naming the key and the fix.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from l2e_dist.config_utils import ConfigError

ATTENTION_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def attention_context(choice: str):
    """The context the attention call runs in: nothing for "auto", else sdpa_kernel(that backend)."""
    backend = ATTENTION_BACKENDS[choice]
    return contextlib.nullcontext() if backend is None else sdpa_kernel(backend)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, choice: str) -> torch.Tensor:
    """Causal SDPA of q, k, v [b, heads, s, head_dim] with the chosen backend."""
    with attention_context(choice):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def check_attention_backend(choice: str, device: torch.device, dtype: torch.dtype, heads: int,
                            head_dim: int) -> None:
    """Start-up check: one tiny causal attention forward + backward with the run's device, dtype and head shape
    under the chosen backend; a backend without a kernel for them is a ConfigError naming the key."""
    if ATTENTION_BACKENDS[choice] is None:
        return
    shape = (1, heads, 16, head_dim)
    q, k, v = (torch.randn(shape, device=device).to(dtype).requires_grad_() for _ in range(3))
    try:
        causal_attention(q, k, v, choice).sum().backward()
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
        raise ConfigError(
            "model.attention_backend",
            f"{choice} has no attention kernel for this run ({device.type}, {str(dtype).removeprefix('torch.')}, "
            f"head_dim {head_dim}): {reason}; set model.attention_backend=auto (PyTorch picks one that works)",
        ) from None
