"""Thin command-line entry points; the work is in l2e_dist."""

from __future__ import annotations

import warnings


def quiet_known_warnings() -> None:
    """megatron-core warns on every import that TE/Apex are absent (expected on CPU) and about a config default."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
