"""The reference pass (l2e_dist/l2e/reference.py) against the method's formulas written out here in plain torch, and
every backend (dense, CPU eager, CPU kernel) against the reference: output, gradient, selected pairs, sums. Also
the per-micro-batch contract (`L2EInhibitor.micro_batch`)."""

from __future__ import annotations

import math

import pytest
import torch

from l2e_dist.config_utils import build
from l2e_dist.l2e import L2EConfig, L2EInhibitor, cpu_scan
from l2e_dist.l2e.cpu_backend import Scratch, cpu_pass
from l2e_dist.l2e.reference import MethodSettings, Phase, StepConstants, dense_pass

TOKENS, WIDTH, EPS, DELTA, P = 96, 37, 0.01, 1e-6, 0.05


def _layer(dtype: torch.dtype, seed: int = 0):
    """Activations z [tokens, width] and a layer state (fp64 mean, var) as the engine keeps it."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.gelu(torch.randn(TOKENS, WIDTH, generator=gen, dtype=torch.float64) * 1.5).to(dtype)
    mean = torch.randn(WIDTH, generator=gen, dtype=torch.float64) * 0.1
    var = torch.rand(WIDTH, generator=gen, dtype=torch.float64) + 0.2
    return z, mean, var


def _expected(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, tau: float, ratio: float, method: str,
              topk: int | None, upstream: torch.Tensor, strength: float = 1.0) -> dict:
    """The method doc's formulas, in fp64, by autograd (no engine code)."""
    z64 = z.double().clone().requires_grad_()
    inv_denom = 1.0 / (var + EPS * var.mean())
    dev = z64 - mean
    phi = dev.detach() ** 2 * inv_denom
    if topk is None:
        selected = phi >= tau
        counts = (int((phi >= tau / ratio).sum()), int((phi >= tau * ratio).sum()))
    else:
        kth = phi.topk(topk, dim=1).values[:, -1:]
        selected, counts = phi >= kth, None
    if method == "l2e":
        reg = torch.where(selected, torch.log(dev ** 2 + DELTA), torch.zeros((), dtype=torch.float64)).sum()
        output = z64
        (reg + (output * upstream.double()).sum()).backward()
    else:
        output = torch.where(selected, mean.expand_as(z64), z64)
        reg = None
        z64.grad = torch.where(selected, -strength * upstream.double(), upstream.double())
    return {"selected": selected, "counts": counts, "reg": reg, "output": output.detach(), "grad": z64.grad,
            "sum_dev": dev.detach().sum(0), "sum_sq_dev": (dev.detach() ** 2).sum(0),
            "score_sum": phi.sum(), "phi": phi}


def _tau_in_a_gap(phi: torch.Tensor) -> float:
    """A threshold near the (1 - P) quantile, halfway (in log) between two scores at least 0.1% apart: no score
    sits within rounding of it, so fp32 and fp64 select the same pairs."""
    values = phi.reshape(-1).sort().values
    start = int((1 - P) * values.numel())
    for i in range(start, values.numel() - 1):
        if values[i + 1] > values[i] * 1.001:
            return math.sqrt(float(values[i]) * float(values[i + 1]))
    raise AssertionError("no gap")


# (backend, method, top-k or None for threshold retrieval); the kernel does threshold and top-1 retrieval only
CASES = [(backend, method, topk) for backend in ("dense", "cpu_eager", "cpu_kernel")
         for method, topk in (("l2e", None), ("l2e", 2), ("memel", 1), ("memel", 3))
         if backend != "cpu_kernel" or topk in (None, 1)]


@pytest.mark.parametrize("backend,method,topk", CASES)
def test_every_backend_computes_the_method_formulas(monkeypatch, backend, method, topk):
    dtype = torch.float32 if backend == "cpu_kernel" else torch.float64
    if backend == "cpu_kernel":
        assert cpu_scan.available(), "the fused CPU scan did not build: g++ and ninja are needed (scripts/setup.sh)"
    monkeypatch.setattr(cpu_scan, "usable", lambda flat, mu: backend == "cpu_kernel")
    z, mean, var = _layer(dtype)
    inv_denom = 1.0 / (var + EPS * var.mean())
    tau = _tau_in_a_gap((z.double() - mean) ** 2 * inv_denom)
    half_width = 0.3
    ratio = math.exp(half_width)
    upstream = torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(1), dtype=dtype)
    want = _expected(z, mean, var, tau, ratio, method, topk, upstream, strength=0.7)

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    constants = StepConstants.of(mean, inv_denom, tau / inv_denom, tau, half_width, compute)
    settings = MethodSettings(method, topk is None, topk or 1, DELTA, 0.7)
    zg = z.clone().requires_grad_()
    if backend == "dense":
        result = dense_pass(zg, zg, constants, settings, Phase.SELECTING, want_scores=True)
    else:
        result = cpu_pass(zg, zg, constants, settings, Phase.SELECTING, want_scores=backend == "cpu_eager",
                          scratch=Scratch())
    loss = (result.output * upstream).sum() + (result.reg_term if result.reg_term is not None else 0.0)
    loss.backward()

    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.equal(result.selected_mask(z.shape), want["selected"])  # the same pairs
    assert int(result.sums.n_selected) == int(want["selected"].sum()) > 0
    torch.testing.assert_close(result.output.double(), want["output"], rtol=rtol, atol=rtol)
    torch.testing.assert_close(zg.grad.double(), want["grad"], rtol=rtol, atol=rtol)
    torch.testing.assert_close(result.sums.sum_dev.double(), want["sum_dev"], rtol=rtol, atol=10 * rtol)
    torch.testing.assert_close(result.sums.sum_sq_dev.double(), want["sum_sq_dev"], rtol=rtol, atol=rtol)
    torch.testing.assert_close(result.sums.score_sum.double(), want["score_sum"], rtol=rtol, atol=0.0)
    assert result.sums.tokens == TOKENS
    if want["counts"] is not None:
        assert (int(result.sums.n_above_low), int(result.sums.n_above_high)) == want["counts"]
    if method == "l2e":
        torch.testing.assert_close(result.sums.reg_sum.double(), want["reg"].detach(), rtol=rtol, atol=0.0)
    else:
        assert result.reg_term is None and result.sums.reg_sum is None
    if result.scores is not None:
        torch.testing.assert_close(result.scores.double(), want["phi"], rtol=rtol, atol=0.0)


@pytest.mark.parametrize("backend", ["dense", "cpu_eager"])
def test_collecting_and_calibrating_passes_only_sum_and_score(monkeypatch, backend):
    monkeypatch.setattr(cpu_scan, "usable", lambda flat, mu: False)
    z, mean, var = _layer(torch.float64, seed=2)
    inv_denom = 1.0 / (var + EPS * var.mean())
    constants = StepConstants.of(mean, inv_denom, 1.0 / inv_denom, 1.0, 0.25, torch.float64)
    settings = MethodSettings("l2e", True, 1, DELTA, 1.0)
    for phase in (Phase.COLLECTING, Phase.CALIBRATING):
        if backend == "dense":
            result = dense_pass(z, z, constants, settings, phase, want_scores=False)
        else:
            result = cpu_pass(z, z, constants, settings, phase, want_scores=False, scratch=Scratch())
        assert result.output is z and result.reg_term is None and result.selected_mask(z.shape) is None
        torch.testing.assert_close(result.sums.sum_sq_dev, ((z - mean) ** 2).sum(0))
        if phase is Phase.COLLECTING:
            assert result.sums.score_sum is None and result.scores is None
        else:  # calibration hands out the scores for tau's histogram
            torch.testing.assert_close(result.scores, (z - mean) ** 2 * inv_denom)
            assert result.sums.n_selected is None


def _inhibitor(**overrides) -> L2EInhibitor:
    cfg = build(L2EConfig, {"method": "l2e", "forget_steps": 1, "late_start": 1, **overrides}, "l2e")
    return L2EInhibitor(cfg, [0, 1], 8)


def test_micro_batch_loss_before_the_forward_names_the_missing_layers():
    inh = _inhibitor()
    with pytest.raises(RuntimeError, match=r"layers \[1\] were not applied"):
        with inh.micro_batch() as l2e:
            inh.apply(0, torch.randn(4, 8, requires_grad=True))
            l2e.loss()
    # the failed micro-batch was discarded, not half-kept: a full one goes through
    with inh.micro_batch() as l2e:
        for lid in (0, 1):
            inh.apply(lid, torch.randn(4, 8, requires_grad=True))
        assert float(l2e.loss()) == 0.0  # nothing selects before late_start
    inh.end_step()
    assert inh.state_dict()["layers"][0]["n_merged"] == 1


def test_micro_batch_loss_is_the_scaled_regularizer_and_the_context_closes_the_micro_batch():
    inh = _inhibitor(reg_lambda=0.5, inhibit_ratio=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):  # statistics, calibration, then selecting steps
        with inh.micro_batch() as l2e:
            zs = [torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
            for lid, z in enumerate(zs):
                inh.apply(lid, z)
            loss = l2e.loss()
        inh.end_step()  # raises unless the context closed the micro-batch
    state = inh.state_dict()["layers"]
    assert state[0]["tau_ready"]
    # the last micro-batch's loss: lambda (sum reduction, dp 1, one micro-batch) x SUM_selected log(d^2 + delta),
    # selected with the state of before that step
    with inh.micro_batch() as l2e:
        zs = [torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        for lid, z in enumerate(zs):
            inh.apply(lid, z)
        loss = l2e.loss()
    want = 0.0
    for lid, z in enumerate(zs):
        s = state[lid]
        dev2 = (z.detach() - s["mean"]) ** 2
        phi = dev2 / (s["var"] + 0.01 * s["var"].mean())
        want += float(torch.log(dev2 + 1e-6)[phi >= float(s["tau"])].sum())
    assert want != 0.0 and float(loss) == pytest.approx(0.5 * want, rel=1e-12)
