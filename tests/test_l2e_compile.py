"""The dense L2E pass (l2e_dist/l2e/reference.py, what accelerators run) under torch.compile: one graph per phase and
method, no graph break (fullgraph), no recompile when the state changes from step to step, and the compiled pass
equal to the eager one (output, gradient, sums); and the engine's `compiled` backend equal to its `dense` one
step after step."""

from __future__ import annotations

import pytest
import torch

from l2e_dist.config_utils import build
from l2e_dist.l2e import compiled_backend, inhibitor
from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.inhibitor import L2EInhibitor
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


ENGINE_CASES = {
    "l2e_threshold_fkr": {"method": "l2e", "fkr": True, "num_features": 3, "reg_lambda": 0.05},
    "memel_top2": {"method": "memel", "retrieval": "topk", "topk": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name,compiler", [("l2e_threshold_fkr", "aot_eager"), ("memel_top2", "aot_eager"),
                                           ("l2e_threshold_fkr", "inductor")])
def test_the_compiled_backend_equals_the_dense_one_through_the_engine(monkeypatch, name, compiler):
    """Eight optimizer steps of two micro-batches over two layers (collecting, calibrating, selecting; FKR labels
    on every other micro-batch): the layer outputs, the activation gradients, the L2E loss and the engine's state
    after every step equal the eager dense backend's; one graph per (phase, scores kept) met, none per step.
    `compiler`: aot_eager (Dynamo + AOTAutograd, the backward too) or inductor (generated kernels, as in a run)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compiler)
    monkeypatch.setattr(inhibitor, "compiled_pass",
                        lambda settings: compiled_backend.compiled_pass(settings, backend=counter))
    width, tokens = 32, 48
    cfg = build(L2EConfig, {"forget_steps": 2, "late_start": 2, "inhibit_ratio": 0.05, **ENGINE_CASES[name]}, "l2e")
    engines = {backend: L2EInhibitor(cfg, [0, 1], width, backend=backend, micro_batches_per_step=2)
               for backend in ("dense", "compiled")}
    gen = torch.Generator().manual_seed(3)
    met = set()
    for step in range(8):
        for micro in range(2):
            zs = [torch.nn.functional.gelu(torch.randn(2, tokens // 2, width, generator=gen) * 1.5 + 0.1 * step)
                  for _ in range(2)]
            upstream = torch.randn(2, tokens // 2, width, generator=gen)
            features = torch.randint(-1, 3, (2, tokens // 2), generator=gen) if micro == 0 else None
            got = {}
            for backend, engine in engines.items():
                if backend == "compiled":
                    phases = {engine._phase(engine._layers[layer]) for layer in (0, 1)}
                    labelled = features is not None and cfg.fkr  # the scores are kept for FKR
                    met.update((phase, labelled and phase.scoring) for phase in phases)
                leaves = [z.clone().requires_grad_() for z in zs]
                with engine.micro_batch(features) as l2e:
                    outputs = [engine.apply(layer, z) for layer, z in enumerate(leaves)]
                    l2e_loss = l2e.loss()
                    loss = sum((out * upstream).sum() for out in outputs) + l2e_loss
                    loss.backward()
                got[backend] = ([out.detach() for out in outputs], [z.grad for z in leaves], float(l2e_loss.detach() if isinstance(l2e_loss, torch.Tensor) else l2e_loss))
            for want, have in zip(got["dense"][:2], got["compiled"][:2], strict=True):
                for a, b in zip(want, have, strict=True):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            assert got["compiled"][2] == pytest.approx(got["dense"][2], rel=1e-5, abs=1e-9)
        for engine in engines.values():
            engine.end_step(True)
        want_state, have_state = (engines[b].state_dict()["layers"] for b in ("dense", "compiled"))
        for layer in want_state:
            for key, value in want_state[layer].items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(have_state[layer][key], value, rtol=1e-5, atol=1e-6, msg=key)
                else:
                    assert have_state[layer][key] == pytest.approx(value, rel=1e-5), key
    phases = {phase for phase, _ in met}
    assert Phase.SELECTING in phases and (Phase.CALIBRATING in phases) == cfg.uses_threshold
    metrics = {backend: engine.metrics() for backend, engine in engines.items()}
    assert metrics["compiled"] == pytest.approx(metrics["dense"], rel=1e-5, abs=1e-9)
    selected = [value for key, value in metrics["compiled"].items() if key.endswith("selected_frac")]
    assert len(selected) == 2 and all(0 < value < 0.2 for value in selected), metrics["compiled"]  # it selected
    # Both layers share one graph per (phase, scores kept); a new state each step compiled nothing new.
    assert counter.frame_count == len(met), (counter.frame_count, sorted(met, key=str))
