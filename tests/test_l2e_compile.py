"""The dense L2E pass (l2e_dist/l2e/reference.py, what accelerators run) under torch.compile: one graph per phase and
method, no graph break (fullgraph), no recompile when the state changes from step to step, and the compiled pass
equal to the eager one (output, gradient, sums)."""

from __future__ import annotations

import pytest
import torch

from l2e_dist.l2e.reference import MethodSettings, Phase, StepConstants, dense_pass

WIDTH, TOKENS = 48, 40
SETTINGS = {
    "l2e_threshold": MethodSettings("l2e", True, 1, 1e-6, 1.0),
    "l2e_top2": MethodSettings("l2e", False, 2, 1e-6, 1.0),
    "memel_top1": MethodSettings("memel", False, 1, 1e-6, 1.0),
}


def _constants(step: int, gen: torch.Generator) -> StepConstants:
    """A different state every step: mean, variance, tau and the threshold counts' ratio all move."""
    mean = torch.randn(WIDTH, generator=gen, dtype=torch.float64) * 0.1
    var = torch.rand(WIDTH, generator=gen, dtype=torch.float64) + 0.5
    inv_denom = 1.0 / (var + 0.01 * var.mean())
    tau = 2.0 + 0.3 * step
    return StepConstants.of(mean, inv_denom, tau / inv_denom, tau, 0.25 + 0.01 * step, torch.float32)


def _run(pass_fn, z: torch.Tensor, constants: StepConstants, phase: Phase, upstream: torch.Tensor):
    z = z.clone().requires_grad_()
    output, reg_term, sums = pass_fn(z, constants, phase)
    loss = (output * upstream).sum() + (reg_term if reg_term is not None else 0.0)
    loss.backward()
    return output.detach(), z.grad, sums


@pytest.mark.slow
@pytest.mark.parametrize("name", SETTINGS)
def test_dense_pass_compiles_once_per_phase_without_graph_breaks_or_recompiles(name):
    from torch._dynamo.testing import CompileCounter

    settings = SETTINGS[name]

    def layer_pass(z, constants, phase):
        result = dense_pass(z, z, constants, settings, phase, want_scores=False)
        return result.output, result.reg_term, result.sums

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(layer_pass, backend=counter, fullgraph=True, dynamic=False)  # a graph break raises
    gen = torch.Generator().manual_seed(0)
    phases = [Phase.COLLECTING, Phase.COLLECTING, Phase.CALIBRATING] + [Phase.SELECTING] * 5
    if not settings.uses_threshold:  # top-k retrieval needs no calibration step
        phases.remove(Phase.CALIBRATING)
    for step, phase in enumerate(phases):
        constants = _constants(step, gen)
        z = torch.nn.functional.gelu(torch.randn(TOKENS, WIDTH, generator=gen) * 1.5)
        upstream = torch.randn(TOKENS, WIDTH, generator=gen)
        want = _run(layer_pass, z, constants, phase, upstream)
        got = _run(compiled, z, constants, phase, upstream)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        for a, b in zip(got[2], want[2], strict=True):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b)
            else:
                assert a == b
    # one graph per phase met, whatever the state did from step to step
    assert counter.frame_count == len(set(phases))
