"""L2E numerics: NaN/inf cannot poison the state, the threshold converges on any tail, the dense backend (GPUs)
equals the CPU one (eager and kernel) over whole runs, bf16 activations give fp32-close statistics, and old states
load or fail."""

from __future__ import annotations

import math

import pytest
import torch

from l2e_dist.config import load_config
from l2e_dist.config_utils import ConfigError, build
from l2e_dist.l2e import L2EConfig, L2EInhibitor, cpu_scan
from l2e_dist.l2e.state_io import L2EStateError
from l2e_dist.l2e.step_sums import NonFiniteActivations
from l2e_dist.l2e.threshold import (
    HIST_BIN_WIDTH,
    INITIAL_HALF_WIDTH,
    histogram_counts,
    histogram_quantile,
    update_threshold,
)
from tests.conftest import ROOT

F64 = torch.float64


def make(width: int = 16, layers=(0,), **overrides) -> L2EInhibitor:
    kwargs = {k: overrides.pop(k) for k in ("dp_size", "micro_batches_per_step", "backend") if k in overrides}
    cfg = build(L2EConfig, {"method": "l2e", "forget_steps": 2, "late_start": 2, **overrides}, "l2e")
    return L2EInhibitor(cfg, list(layers), width, **kwargs)


def train_step(inh: L2EInhibitor, *zs: torch.Tensor, layer: int = 0) -> list[torch.Tensor]:
    """One optimizer step of len(zs) micro-batches; returns the activations' gradients (regularizer only)."""
    grads = []
    for z in zs:
        z = z.clone().requires_grad_()
        out = inh.apply(layer, z)
        loss = inh.regularization_loss() + (out * 0).sum()
        loss.backward()
        inh.finish_micro_batch()
        grads.append(z.grad)
    inh.end_step()
    return grads


def all_finite(inh: L2EInhibitor) -> bool:
    return all(bool(v.isfinite().all()) for layer in inh.state_dict()["layers"].values()
               for v in layer.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_step_merges_nothing_is_counted_and_stops_the_run(dtype, bad):
    width = 16
    inh = make(width, layers=(0, 1), max_nonfinite_steps=3)
    gen = torch.Generator().manual_seed(0)

    def batch():
        return (torch.randn(64, width, generator=gen) * 2 + 1).to(dtype)

    for _ in range(4):  # past late start and calibration: the layers select
        for lid in (0, 1):
            inh.apply(lid, batch().requires_grad_())
        inh.finish_micro_batch()
        inh.end_step()
    before = inh.state_dict()["layers"]
    for consecutive in (1, 2):
        poisoned = batch()
        poisoned[3, 5] = bad
        clean = batch()
        z0 = poisoned.requires_grad_()
        out = inh.apply(0, z0)
        inh.apply(1, clean.requires_grad_())
        (inh.regularization_loss() + out.float().nan_to_num().sum() * 0).backward()
        assert z0.grad.float().isfinite().all()  # the L2E gradient never carries the NaN/inf
        inh.finish_micro_batch()
        inh.end_step()
        after = inh.state_dict()["layers"]
        for key, value in before[0].items():  # layer 0 merged nothing ...
            if key in ("nonfinite_steps", "consecutive_nonfinite"):
                continue
            assert torch.equal(value, after[0][key]) if isinstance(value, torch.Tensor) else value == after[0][key]
        assert after[0]["nonfinite_steps"] == consecutive
        assert after[1]["n_merged"] == before[1]["n_merged"] + consecutive  # ... layer 1 went on
        assert all_finite(inh)
        assert inh.metrics()["l2e/layer0/nonfinite_steps"] == consecutive
    poisoned = batch()
    poisoned[0, 0] = bad
    inh.apply(0, poisoned.requires_grad_())
    inh.apply(1, batch().requires_grad_())
    inh.finish_micro_batch()
    with pytest.raises(NonFiniteActivations, match=r"L2E layer 0: NaN/inf activations in 3 consecutive"):
        inh.end_step()
    assert all_finite(inh)


def test_a_finite_step_resets_the_consecutive_count_and_skipped_steps_merge_nothing():
    inh = make(8, max_nonfinite_steps=2)
    gen = torch.Generator().manual_seed(1)
    bad = torch.randn(32, 8, generator=gen)
    bad[0, 0] = math.nan
    for z in (bad, torch.randn(32, 8, generator=gen), bad):
        train_step(inh, z)  # never two in a row: no error
    assert inh.state_dict()["layers"][0]["nonfinite_steps"] == 2
    before = inh.state_dict()["layers"][0]
    inh.apply(0, torch.randn(32, 8, generator=gen).requires_grad_())
    inh.finish_micro_batch()
    inh.end_step(applied=False)  # an fp16 overflow-skipped step: the L2E state stays, like the optimizer's
    after = inh.state_dict()["layers"][0]
    assert after["n_merged"] == before["n_merged"] and torch.equal(after["mean"], before["mean"])


# ------------------------------------------------------------------------------------------------ threshold


def _scores(kind: str, n: int, gen: torch.Generator, shifted: bool) -> torch.Tensor:
    g = torch.randn(n, generator=gen, dtype=F64)
    if kind == "uniform":
        s = torch.rand(n, generator=gen, dtype=F64)
    elif kind == "gaussian":  # the score of a Gaussian activation: chi-square(1)
        s = g * g
    elif kind == "post_gelu":
        z = torch.nn.functional.gelu(g)
        s = (z - z.mean()) ** 2 / z.var()
    elif kind == "student_t":  # heavy tail: t(3) squared
        chi2 = sum(torch.randn(n, generator=gen, dtype=F64) ** 2 for _ in range(3)) / 3
        s = (g / chi2.sqrt()) ** 2
    else:  # "tanh": bounded scores with mass piled at the bound
        s = torch.tanh(1.5 * g) ** 2
    return s * 3.0 if shifted else s


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "post_gelu", "student_t", "tanh"])
def test_threshold_converges_on_any_tail_and_follows_a_shift(kind):
    """Drive the threshold update with the scores of 2 x 600 steps (shift x3 midway), 20k scores per step."""
    p, n, half, settle = 0.02, 20_000, 600, 40
    gen = torch.Generator().manual_seed(3)
    tau = histogram_quantile(histogram_counts(_scores(kind, n, gen, False)), 1 - p)
    width = INITIAL_HALF_WIDTH
    fractions = []
    for t in range(2 * half):
        s = _scores(kind, n, gen, t >= half)
        r = math.exp(width)
        counts = tuple(float((s >= bound).sum()) for bound in (tau / r, tau, tau * r))
        fractions.append(counts[1] / n)
        tau, width = update_threshold(tau, width, counts, float(n), p, 0.5)
        assert math.isfinite(tau) and math.isfinite(width)
    f = torch.tensor(fractions)
    settled = torch.cat([f[settle:half], f[half + settle:]])
    assert abs(settled.mean().item() - p) < 0.1 * p, kind
    assert settled.min().item() >= p / 2 and settled.max().item() <= 2 * p, kind
    dev = settled - settled.mean()
    lag1 = ((dev[1:] * dev[:-1]).mean() / dev.var()).item()
    assert lag1 > -0.5, (kind, lag1)
    assert f[half:half + 5].max() > 2 * p  # the shift really moved the scores past the old threshold


def test_threshold_initialised_from_the_exact_quantile_of_the_first_scored_step_over_its_micro_batches():
    p, width = 0.05, 32
    inh = make(width, inhibit_ratio=p)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        train_step(inh, torch.randn(200, width, generator=gen, dtype=F64))
    micro = [torch.randn(100, width, generator=gen, dtype=F64) * 1.5 for _ in range(3)]
    st = inh.state_dict()["layers"][0]
    denom = st["var"] + 0.01 * st["var"].mean()
    phi = torch.cat([(z - st["mean"]) ** 2 / denom for z in micro]).reshape(-1)
    train_step(inh, *micro)
    tau = inh.state_dict()["layers"][0]["tau"].item()
    exact = torch.quantile(phi, 1 - p).item()
    assert abs(math.log(tau / exact)) <= HIST_BIN_WIDTH  # within one histogram bin (0.9%) of the exact value


# ------------------------------------------------------------------------------------------------ backends


@pytest.mark.parametrize("retrieval", ["threshold", "topk"])
def test_dense_regularizer_path_equals_compact(retrieval):
    width = 24
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 40, width, generator=gen) * 1.3 + 0.2 for _ in range(8)]

    def run(compact: bool):
        inh = make(width, retrieval=retrieval, topk=2, inhibit_ratio=0.05, reg_lambda=0.1,
                   backend="cpu" if compact else "dense")
        grads, regs = [], []
        for z in batches:
            z = z.clone().requires_grad_()
            inh.apply(0, z)
            reg = inh.regularization_loss()
            reg.backward() if reg.requires_grad else None
            regs.append(reg.detach())
            grads.append(z.grad if z.grad is not None else torch.zeros_like(z))
            inh.finish_micro_batch()
            inh.end_step()
        return grads, regs, inh.state_dict()

    g_dense, r_dense, s_dense = run(False)
    g_compact, r_compact, s_compact = run(True)
    assert len(g_dense) == len(g_compact) == len(batches)
    assert sum(bool(g.any()) for g in g_dense) >= 4  # the regularizer really acted
    for a, b in zip(g_dense, g_compact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(r_dense, r_compact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key, value in s_dense["layers"][0].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, s_compact["layers"][0][key], rtol=1e-6, atol=1e-9, msg=key)


FUSED_CASES = {  # method -> (inhibitor settings, the kernel entry point it must use)
    "l2e": ({"inhibit_ratio": 0.05, "reg_lambda": 0.1}, "threshold_scan"),
    "memel": ({"method": "memel", "retrieval": "topk", "topk": 1}, "top1_scan"),
    "l2e_top1": ({"retrieval": "topk", "topk": 1, "reg_lambda": 0.1}, "top1_scan"),
}


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_cpu_scan_equals_the_eager_scan(monkeypatch, case):
    """The CPU kernel (cpu_scan.py) selects exactly the eager path's pairs, with its outputs and gradients, and
    sums the statistics to fp32 rounding; a width that is no multiple of 8 exercises its byte scan's tail, and
    an inf and a NaN activation the non-finite handling."""
    assert cpu_scan.available(), "the fused CPU scan did not build: g++ and ninja are needed (scripts/setup.sh)"
    settings, entry = FUSED_CASES[case]
    width = 21
    gen = torch.Generator().manual_seed(7)
    batches = [torch.nn.functional.gelu(torch.randn(2, 64, width, generator=gen)) for _ in range(8)]
    batches[-1][0, 7, 2] = math.inf
    batches[-1][1, 9, 4] = math.nan  # second micro-batch: the state before it is finite either way
    upstream = torch.randn(64, width, generator=gen)
    fused_calls = []
    kernel = getattr(cpu_scan, entry)

    def counted(*args):
        fused_calls.append(1)
        return kernel(*args)

    def run(fused: bool):
        monkeypatch.setattr(cpu_scan, "usable", lambda flat, mu: fused)
        monkeypatch.setattr(cpu_scan, entry, counted)
        inh = make(width, **settings)
        steps = []
        for z_step in batches:
            outs = []
            for z in z_step:
                z = z.clone().requires_grad_()
                out = inh.apply(0, z)
                (inh.regularization_loss() + (out * upstream).sum()).backward()
                inh.finish_micro_batch()
                outs.append((out.detach(), z.grad))
            inh.end_step()
            steps.append(outs)
        return steps, inh.metrics(), inh.state_dict()

    eager, m_eager, s_eager = run(False)
    assert not fused_calls
    fused, m_fused, s_fused = run(True)
    # 2 micro-batches per step once selecting: after late_start 2 (+ the threshold's calibration step)
    assert len(fused_calls) == 2 * (len(batches) - (3 if entry == "threshold_scan" else 2))
    assert len(eager) == len(fused) == len(batches)
    acted = 0
    for step_eager, step_fused, z_step in zip(eager, fused, batches, strict=True):
        for (out_e, grad_e), (out_f, grad_f), z in zip(step_eager, step_fused, z_step, strict=True):
            assert torch.equal(out_e.isnan(), out_f.isnan())
            torch.testing.assert_close(out_f, out_e, rtol=1e-6, atol=1e-9, equal_nan=True)  # mu: to fp32 rounding
            changed = (grad_e != upstream) if case != "memel" else (out_e != z)
            assert torch.equal(changed, (grad_f != upstream) if case != "memel" else (out_f != z))  # same pairs
            torch.testing.assert_close(grad_f, grad_e, rtol=1e-6, atol=1e-9, equal_nan=True)
            acted += int(changed.any())
    assert acted >= 8  # the inhibition really acted
    assert m_eager.keys() == m_fused.keys()
    for key, value in m_eager.items():
        assert m_fused[key] == pytest.approx(value, rel=1e-6), key
    for key, value in s_eager["layers"][0].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, s_fused["layers"][0][key], rtol=1e-6, atol=1e-9, msg=key)


def test_top1_kernel_takes_every_tie_and_nothing_from_a_row_with_a_nan():
    """The kernel's top-1 rule is eager's `phi >= amax(phi)` per row: all tied maxima, +inf a maximum, and no pair
    of a row holding a NaN (amax is NaN there); also the d it returns and its column sums."""
    assert cpu_scan.available(), "the fused CPU scan did not build: g++ and ninja are needed (scripts/setup.sh)"
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(40, 19, generator=gen)
    z[1, [2, 7, 18]] = 9.0  # three tied maxima (mu = 0, inv = 1: phi = z^2)
    z[2, 4], z[2, 11] = 9.0, -9.0  # tied by the square
    z[3] = 0.5  # a whole row tied
    z[4, 6] = math.inf
    z[5, 3] = math.nan
    z[6, 0] = -math.inf
    mu, inv = torch.zeros(19), torch.ones(19)
    index, d, sum1, sum2 = cpu_scan.top1_scan(z, mu, inv)
    phi = (z - mu).square() * inv
    want = (phi >= phi.amax(dim=1, keepdim=True)).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(index, want)
    assert {int(i) // 19 for i in index}.isdisjoint({5}) and int((index // 19 == 3).sum()) == 19
    assert int((index // 19 == 1).sum()) == 3 and int((index // 19 == 2).sum()) == 2
    torch.testing.assert_close(d, (z - mu).reshape(-1)[index])
    for got, want in ((sum1, z.double().sum(0)), (sum2, z.double().square().sum(0))):  # fp32 blocks of 32 rows
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", ["compact", "dense", "memel", "memel_compact"])
@pytest.mark.parametrize("shared", [False, True])
def test_inhibited_layer_gradient_is_the_lm_gradient_plus_the_regularizers(path, shared):
    """z's gradient = its incoming gradient + the regularizer's (L2E), or the incoming one times -D on the selected
    pairs (MEmeL), also when autograd shares the incoming gradient with another branch, whose gradient stays
    untouched."""
    width = 24
    gen = torch.Generator().manual_seed(9)
    method = "memel" if path.startswith("memel") else "l2e"
    inh = make(width, method=method, inhibit_ratio=0.05, reg_lambda=0.1,
               backend="cpu" if path in ("compact", "memel_compact") else "dense")
    checked = 0
    for _ in range(6):
        z = (torch.randn(40, width, generator=gen) * 1.3 + 0.2).requires_grad_()
        other_leaf = torch.zeros(40, width, requires_grad=True)
        other = other_leaf * 1.0  # made before apply(): autograd runs its backward after the inhibitor's
        upstream = torch.randn(40, width, generator=gen)
        selected = inh.selected_mask(0, z.detach())
        out = inh.apply(0, z)
        reg = inh.regularization_loss()
        reg_grad = (torch.autograd.grad(reg, z, retain_graph=True)[0] if reg.requires_grad
                    else torch.zeros_like(z))
        lm_in = out + other if shared else out
        ((lm_in * upstream).sum() + reg).backward()
        if method == "memel" and selected is not None:
            mu = inh.state_dict()["layers"][0]["mean"].to(z.dtype)
            assert torch.equal(out, torch.where(selected, mu, z))  # the selected pairs take the neuron's mean
            want = torch.where(selected, -inh.cfg.rd_strength * upstream, upstream)
        else:
            want = upstream + reg_grad
        torch.testing.assert_close(z.grad, want, rtol=1e-6, atol=1e-7)
        if shared:
            assert torch.equal(other_leaf.grad, upstream)
        checked += bool(reg_grad.any()) or (selected is not None and bool(selected.any()))
        inh.finish_micro_batch()
        inh.end_step()
    assert checked >= 3  # the regularizer / reverse deactivation really acted


def test_bf16_activations_give_statistics_within_bf16_tolerance_of_fp32():
    width = 32
    gen = torch.Generator().manual_seed(6)
    batches = [torch.nn.functional.gelu(torch.randn(256, width, generator=gen) * 2) for _ in range(8)]
    ref, low = make(width), make(width)
    for z in batches:
        train_step(ref, z.bfloat16().float())  # the same values, held in fp32
        train_step(low, z.bfloat16())
    a, b = ref.state_dict()["layers"][0], low.state_dict()["layers"][0]
    torch.testing.assert_close(b["mean"], a["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["var"], a["var"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b["tau"], a["tau"], rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------------------------ old states


def test_legacy_v1_state_loads_only_where_it_means_the_same():
    inh = make(8)
    train_step(inh, torch.randn(16, 8))
    legacy = inh.state_dict()
    legacy["format"] = "l2e-inhibitor-v1"
    for layer in legacy["layers"].values():
        for key in ("half_width", "nonfinite_steps", "consecutive_nonfinite"):
            del layer[key]
    with pytest.raises(L2EStateError, match="l2e-inhibitor-v1.*train.init_from"):
        make(8).load_state_dict(legacy)
    with pytest.raises(L2EStateError):
        make(8).load_state_dict(legacy, writer_micro_batches_per_step=4)
    again = make(8)
    again.load_state_dict(legacy, writer_micro_batches_per_step=1)
    assert again.state_dict()["layers"][0]["n_merged"] == 1
    for key, bad in (("var", math.nan), ("tau", math.inf), ("half_width", math.nan)):  # a tensor and two numbers
        corrupt = inh.state_dict()
        corrupt["layers"][0][key].view(-1)[0] = bad
        with pytest.raises(L2EStateError, match="NaN/inf"):
            make(8).load_state_dict(corrupt)


# ------------------------------------------------------------------------------------------------ configs


def test_late_start_at_or_beyond_train_iters_is_a_config_error_naming_the_key():
    tiny = [str(ROOT / "configs" / "tiny.yaml")]
    with pytest.raises(ConfigError, match=r"l2e\.late_start.*train\.train_iters=20"):
        load_config(tiny, ["train.train_iters=20", "l2e.late_start=20"])
    with pytest.raises(ConfigError, match=r"l2e\.forget_steps"):
        load_config(tiny, ["train.train_iters=5", "l2e.forget_steps=10"])
    with pytest.raises(ConfigError, match=r"l2e\.threshold_lr"):
        load_config(tiny, ["l2e.threshold_lr=5"])
    with pytest.raises(ConfigError, match=r"l2e\.max_nonfinite_steps"):
        load_config(tiny, ["l2e.max_nonfinite_steps=0"])


def _shipped_lambda_gradient(overlay: str | None) -> tuple[float, float, float, int]:
    """(lambda, L1 norm of the regularizer's weight gradient, the same norm computed here from the formula, the
    number of selected pairs) on the shipped tiny model, in a 1-rank world."""
    import torch.distributed as dist

    from l2e_dist.l2e import attach
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    dist.init_process_group("gloo")
    init_process_groups(1)
    try:
        paths = [str(ROOT / "configs" / "tiny.yaml")] + ([str(ROOT / overlay)] if overlay else [])
        # with the overlay (which sets no level of its own), the paper's smallest lambda (pythia-70m's)
        cfg = load_config(paths, ["model.vocab_size=256"] + (["l2e.reg_lambda=1e-9"] if overlay else []))
        assert cfg.l2e.method == "l2e" and cfg.l2e.uses_threshold
        torch.manual_seed(0)
        model = GPTNeoX(cfg.model)
        layers = cfg.l2e.resolve_layers(cfg.model.num_layers)
        inh = L2EInhibitor(cfg.l2e, layers, cfg.model.ffn_size)
        probes = model.mlp_probes(cfg.l2e.activation)
        attach(inh, {lid: probes[lid] for lid in layers})
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
        for _ in range(cfg.l2e.start_after + 1):  # statistics, then the calibration step
            model(tokens[:, :-1], tokens[:, 1:])
            inh.finish_micro_batch()
            inh.end_step()
        state = inh.state_dict()["layers"]
        activations = {}  # each probe's input z, in the graph
        for lid in layers:
            probes[lid].register_forward_pre_hook(lambda module, args, lid=lid: activations.__setitem__(lid, args[0]))
        model(tokens[:, :-1], tokens[:, 1:])
        reg = inh.regularization_loss()
        assert reg.requires_grad
        params = list(model.parameters())
        engine_grads = torch.autograd.grad(reg, params, retain_graph=True, allow_unused=True)
        # The formula: lambda x SUM over the pairs with phi >= tau of log((z - mu)^2 + delta), mu and the score's
        # denominator from the state before the step, scored in fp32 as the engine scores fp32 activations.
        formula, selected = 0.0, 0
        for lid in layers:
            z, layer_state = activations[lid].reshape(-1, cfg.model.ffn_size), state[lid]
            var = layer_state["var"]
            inv_denom = (1.0 / (var + cfg.l2e.eps * var.mean())).float()
            dev = z - layer_state["mean"].float()
            phi = dev.detach() * dev.detach() * inv_denom
            chosen = phi >= float(layer_state["tau"])
            formula = formula + torch.log(dev * dev + cfg.l2e.delta)[chosen].sum()
            selected += int(chosen.sum())
        scale = cfg.l2e.reg_lambda if cfg.l2e.reduction == "sum" else cfg.l2e.reg_lambda / tokens[:, :-1].numel()
        formula_grads = torch.autograd.grad(formula * scale, params, allow_unused=True)
        inh.finish_micro_batch()
        inh.end_step()

        def l1(grads) -> float:
            return sum(float(g.abs().sum()) for g in grads if g is not None)

        return cfg.l2e.reg_lambda, l1(engine_grads), l1(formula_grads), selected
    finally:
        destroy_process_groups()


@pytest.mark.slow
@pytest.mark.parametrize("overlay", [None, "configs/l2e/l2e.yaml"])
def test_shipped_lambda_gives_the_formulas_gradient(overlay):
    """The shipped tiny config (lambda 1e-6) and the L2E overlay with pythia-70m's paper lambda 1e-9 on the tiny
    model: once the layers select, the regularizer's gradient reaches the weights and equals the gradient of
    lambda x SUM_selected log((z - mu)^2 + delta) computed here from the state and the activations."""
    from tests.distributed import run_distributed

    lam, grad_l1, formula_l1, selected = run_distributed(_shipped_lambda_gradient, 1, overlay)[0]
    assert lam == (1e-9 if overlay else 1e-6)
    # about 2% of 2 layers x 64 tokens x 512 neurons
    assert 0.01 * 2 * 64 * 512 < selected < 0.04 * 2 * 64 * 512
    assert formula_l1 > 0.0 and grad_l1 == pytest.approx(formula_l1, rel=1e-5)
