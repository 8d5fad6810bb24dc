"""The compiled backend of one layer pass: reference.py's dense pass under `torch.compile`.

Eagerly the dense pass walks the activation about fourteen times per inhibited layer (a subtraction, squares,
compares, reductions, the regularizer's log and its backward), each a kernel launch and a full read of an
activation-sized tensor; Inductor fuses them into a few kernels. The pass is compiled whole (`fullgraph`) except
for top-k retrieval at TP > 1, whose all_gather over the TP group stays outside the graph. The step's state comes
in as tensors (StepConstants), so a new state is no recompile; what is compiled once per run is one graph per
phase met and per whether the scores are kept (FKR). Same results as the reference (tests/test_l2e_compile.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from l2e_dist.l2e.reference import LayerPass, MethodSettings, Phase, StepConstants, dense_pass


def _layer_pass(z: Tensor, constants: StepConstants, settings: MethodSettings, phase: Phase, want_scores: bool):
    """dense_pass with its result as a tuple (what a compiled region returns) and the [tokens, W] view taken
    inside, so that the graph gets one input, not two aliasing ones."""
    result = dense_pass(z, z.reshape(-1, z.shape[-1]), constants, settings, phase, want_scores)
    return result.output, result.sums, result.reg_term, result.selected, result.scores


CompiledPass = Callable[[Tensor, Tensor, StepConstants, MethodSettings, Phase, bool], LayerPass]


def compiled_pass(settings: MethodSettings, backend: str | Callable = "inductor") -> CompiledPass:
    """A pass with dense_pass's signature that runs it compiled (`backend`: Inductor, or a test's counter)."""
    fullgraph = settings.uses_threshold or settings.tp_size == 1
    compiled = torch.compile(_layer_pass, backend=backend, fullgraph=fullgraph)

    def run(z: Tensor, flat: Tensor, constants: StepConstants, settings: MethodSettings, phase: Phase,
            want_scores: bool) -> LayerPass:
        output, sums, reg_term, selected, scores = compiled(z, constants, settings, phase, want_scores)
        return LayerPass(output, sums, reg_term, selected=selected, scores=scores)

    return run
