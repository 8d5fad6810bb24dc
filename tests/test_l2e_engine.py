"""Single-process tests of the L2E engine against independent numpy / analytic references."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from l2e_dist.config_utils import ConfigError, build, load_yaml
from l2e_dist.l2e import L2EConfig, L2EInhibitor, attach

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def make(method: str = "l2e", layers=(0,), width: int = 16, **overrides) -> L2EInhibitor:
    kwargs = {k: overrides.pop(k) for k in ("dp_size", "micro_batches_per_step") if k in overrides}
    cfg = build(L2EConfig, {"method": method, **overrides}, "l2e")
    return L2EInhibitor(cfg, list(layers), width, **kwargs)


def state(inh: L2EInhibitor, layer: int = 0) -> dict:
    return inh.state_dict()["layers"][layer]


def reference_scores(z: np.ndarray, st: dict, eps: float) -> np.ndarray:
    mean, var = st["mean"].numpy(), st["var"].numpy()
    return (z - mean) ** 2 / (var + eps * var.mean())


def step(inh: L2EInhibitor, z: torch.Tensor, layer: int = 0) -> torch.Tensor:
    out = inh.apply(layer, z)
    inh.finish_micro_batch()
    inh.end_step()
    return out


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [
    ("inhibit_ratio", 0.0), ("inhibit_ratio", 0.6), ("inhibit_ratio", -0.1), ("reg_lambda", -1e-9),
    ("layers", "middle"), ("layers", []), ("layers", [3, 3]), ("layers", [-1]), ("topk", 0),
    ("forget_steps", 0), ("late_start", 0), ("threshold_lr", 0.0), ("rd_strength", 0.0), ("delta", 0.0),
])
def test_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError) as exc:
        build(L2EConfig, {"method": "l2e", key: value}, "l2e")
    assert exc.value.key == f"l2e.{key}"


def test_config_num_features_zero_means_from_data_and_negative_is_rejected():
    # 0: the trainer fills in the number of feature labels of the data; the engine itself refuses FKR without them.
    assert build(L2EConfig, {"method": "l2e", "fkr": True}, "l2e").num_features == 0
    assert build(L2EConfig, {"fkr": True, "num_features": 22}, "l2e").num_features == 22
    with pytest.raises(ConfigError) as exc:
        build(L2EConfig, {"method": "l2e", "fkr": True, "num_features": -1}, "l2e")
    assert exc.value.key == "l2e.num_features"
    with pytest.raises(ValueError, match="num_features"):
        L2EInhibitor(L2EConfig(method="l2e", fkr=True, num_features=0), [0], 8)


def test_resolve_layers():
    assert L2EConfig(layers="mid2").resolve_layers(6) == [2, 3]
    assert L2EConfig(layers="mid2").resolve_layers(24) == [11, 12]
    assert L2EConfig(layers="mid_third").resolve_layers(6) == [2, 3]
    assert L2EConfig(layers="mid_third").resolve_layers(12) == [4, 5, 6, 7]
    assert L2EConfig(layers="mid_third").resolve_layers(32) == list(range(10, 21))
    assert L2EConfig(layers=[5, 1]).resolve_layers(6) == [1, 5]
    for cfg, n in ((L2EConfig(layers=[6]), 6), (L2EConfig(layers="mid2"), 1)):
        with pytest.raises(ConfigError) as exc:
            cfg.resolve_layers(n)
        assert exc.value.key == "layers"


@pytest.mark.parametrize("name,method,uses_threshold", [("l2e", "l2e", True), ("memel", "memel", False),
                                                         ("none", "none", True)])
def test_shipped_overlays_build(name, method, uses_threshold):
    data = load_yaml(REPO / "configs" / "l2e" / f"{name}.yaml")
    assert set(data) == {"l2e"}
    cfg = build(L2EConfig, data["l2e"], "l2e")
    assert cfg.method == method
    if cfg.enabled:
        assert cfg.uses_threshold == uses_threshold


# ---------------------------------------------------------------------------------------------- statistics


def pooled_reference(mean: np.ndarray, var: np.ndarray, m: int, batch: np.ndarray, rng) -> tuple:
    """Mean / unbiased var of m synthetic points (exact mean `mean`, unbiased var `var`) pooled with `batch`."""
    if m == 0:
        pooled = batch
    else:
        noise = rng.standard_normal((m, batch.shape[1]))
        noise = (noise - noise.mean(0)) / noise.std(0, ddof=1)
        pooled = np.concatenate([mean + noise * np.sqrt(var), batch])
    return pooled.mean(0), pooled.var(0, ddof=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-6)])
def test_statistics_match_two_pass_reference_with_forgetting(dtype, tol):
    forget, width = 3, 8
    inh = make(width=width, forget_steps=forget, late_start=100)
    rng = np.random.default_rng(0)
    seen, ref_mean, ref_var = [], None, None
    for t in range(8):
        b = 40 + 8 * t  # varying batch sizes
        batch = rng.normal(loc=3.0 + 0.5 * t, scale=1.0 + 0.3 * t, size=(b, width)) * rng.uniform(0.5, 2, width)
        batch = torch.tensor(batch, dtype=dtype).numpy().astype(np.float64)  # the values the engine sees
        step(inh, torch.tensor(batch, dtype=dtype))
        if t < forget:  # exact over every observation so far
            seen.append(batch)
            ref_mean, ref_var = np.concatenate(seen).mean(0), np.concatenate(seen).var(0, ddof=1)
        else:  # forgetting: the history counts as forget_steps batches of this size
            ref_mean, ref_var = pooled_reference(ref_mean, ref_var, forget * b, batch, rng)
        st = state(inh)
        scale = np.abs(batch).max()
        np.testing.assert_allclose(st["mean"].numpy(), ref_mean, rtol=0, atol=tol * scale)
        np.testing.assert_allclose(st["var"].numpy(), ref_var, rtol=tol * 10, atol=0)
        assert st["n_merged"] == t + 1


# ---------------------------------------------------------------------------------------------- threshold


def test_threshold_initialised_from_global_quantile_of_first_scored_batch():
    p, width = 0.05, 32
    inh = make(width=width, inhibit_ratio=p, forget_steps=2, late_start=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        step(inh, torch.randn(500, width, generator=gen, dtype=F64) * 2 + 1)
    z = torch.randn(500, width, generator=gen, dtype=F64) * 2 + 1
    phi = reference_scores(z.numpy(), state(inh), 0.01)
    out = step(inh, z)
    assert out is z and inh.regularization_loss().item() == 0.0  # calibration micro-batch selects nothing
    tau = state(inh)["tau"].item()
    exact = np.quantile(phi, 1 - p)
    assert abs(math.log(tau / exact)) < 0.01  # histogram bins are 0.9% wide
    # The histogram quantile counts ~p of the scores above tau.
    assert abs((phi >= tau).mean() - p) < 0.002


def run_gaussian_like(inh, sampler, steps, gen, width):
    for _ in range(steps):
        step(inh, sampler((256, width), gen))


def gaussian(shape, gen):
    return torch.randn(shape, generator=gen, dtype=F64)


def laplace(shape, gen):  # unit variance
    u = torch.rand(shape, generator=gen, dtype=F64) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)


def uniform(shape, gen):  # unit variance
    return (torch.rand(shape, generator=gen, dtype=F64) * 2 - 1) * math.sqrt(3)


def test_threshold_tracks_quantile_and_follows_distribution_shift():
    p, width, eps = 0.02, 64, 0.01
    inh = make(width=width, inhibit_ratio=p, forget_steps=10, eps=eps)
    gen = torch.Generator().manual_seed(2)
    run_gaussian_like(inh, gaussian, 60, gen, width)
    inh.metrics()
    run_gaussian_like(inh, gaussian, 300, gen, width)
    frac = inh.metrics()["l2e/layer0/selected_frac"]
    assert abs(frac - p) < 0.1 * p
    # Population (1-p)-quantiles of phi = x^2 / ((1 + eps) var) for unit-variance laws.
    q_gauss = 5.4119 / (1 + eps)
    q_laplace = math.log(1 / p) ** 2 / 2 / (1 + eps)
    q_uniform = 3 * (1 - p) ** 2 / (1 + eps)
    tau_gauss = state(inh)["tau"].item()
    assert abs(tau_gauss / q_gauss - 1) < 0.1
    run_gaussian_like(inh, laplace, 150, gen, width)  # heavier tails: tau must rise
    tau_laplace = state(inh)["tau"].item()
    assert tau_laplace > 1.2 * tau_gauss and abs(tau_laplace / q_laplace - 1) < 0.1
    run_gaussian_like(inh, uniform, 150, gen, width)  # no tails: tau must fall
    tau_uniform = state(inh)["tau"].item()
    assert tau_uniform < 0.7 * tau_gauss and abs(tau_uniform / q_uniform - 1) < 0.1
    inh.metrics()
    run_gaussian_like(inh, uniform, 200, gen, width)
    assert abs(inh.metrics()["l2e/layer0/selected_frac"] - p) < 0.1 * p


# ---------------------------------------------------------------------------------------------- inhibition


def warm_up(inh, width, gen, batches=2, tokens=64):
    for _ in range(batches):
        step(inh, torch.randn(tokens, width, generator=gen, dtype=F64) * 1.5 + 0.5)


def test_reverse_deactivation_value_gradient_and_eval_identity():
    width, k, strength = 12, 2, 2.5
    inh = make("memel", width=width, topk=k, rd_strength=strength, forget_steps=2, late_start=2)
    gen = torch.Generator().manual_seed(3)
    warm_up(inh, width, gen)
    st = state(inh)
    z = (torch.randn(3, 5, width, generator=gen, dtype=F64) * 1.5).requires_grad_()
    phi = reference_scores(z.detach().numpy(), st, 0.01)
    kth = np.sort(phi, axis=-1)[..., -k][..., None]
    mask = torch.tensor(phi >= kth)
    assert mask.sum(-1).eq(k).all()
    out = inh.apply(0, z)
    mu = st["mean"].expand_as(z)
    torch.testing.assert_close(out[mask], mu[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[~mask], z.detach()[~mask], rtol=0, atol=0)
    upstream = torch.randn(z.shape, generator=gen, dtype=F64)
    out.backward(upstream)
    torch.testing.assert_close(z.grad, torch.where(mask, -strength * upstream, upstream), rtol=0, atol=1e-12)
    inh.finish_micro_batch()
    inh.end_step()

    inh.eval()
    before = state(inh)
    z2 = torch.randn(4, width, generator=gen, dtype=F64)
    assert inh.apply(0, z2) is z2
    inh.finish_micro_batch()
    inh.end_step()
    after = state(inh)
    assert after["n_merged"] == before["n_merged"] and torch.equal(after["mean"], before["mean"])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_regularizer_gradient_pulls_selected_activations_to_their_mean(reduction):
    width, lam, dp, micro = 16, 1e-3, 3, 2
    inh = make(width=width, inhibit_ratio=0.1, forget_steps=2, late_start=2, reg_lambda=lam,
               reduction=reduction, dp_size=dp, micro_batches_per_step=micro)
    gen = torch.Generator().manual_seed(4)
    warm_up(inh, width, gen, batches=3)  # 2 statistics-only micro-batches + the calibration one
    st = state(inh)
    z = (torch.randn(40, width, generator=gen, dtype=F64) * 1.5 + 0.5).requires_grad_()
    zn = z.detach().numpy()
    mask = reference_scores(zn, st, 0.01) >= st["tau"].item()
    assert 0 < mask.sum() < mask.size
    d = zn - st["mean"].numpy()
    scale = lam * dp * micro if reduction == "sum" else lam / z.shape[0]
    out = inh.apply(0, z)
    assert torch.equal(out.detach(), z.detach())  # L2E passes z through (its regularizer is a loss term)
    loss = inh.regularization_loss()
    np.testing.assert_allclose(loss.item(), scale * np.log(d[mask] ** 2 + 1e-6).sum(), rtol=1e-12)
    loss.backward()
    grad = z.grad.numpy()
    np.testing.assert_allclose(grad, np.where(mask, scale * 2 * d / (d**2 + 1e-6), 0.0), rtol=1e-12, atol=0)
    assert (np.sign(grad[mask]) == np.sign(d[mask])).all()  # descent moves z toward mu
    stepped = zn - 1e-3 / scale * grad
    assert (np.abs(stepped - st["mean"].numpy())[mask] < np.abs(d[mask])).all()
    inh.finish_micro_batch()
    inh.end_step()
    reported = inh.metrics()["l2e/layer0/reg"]  # global value of this micro-batch (one process here)
    global_sum = np.log(d[mask] ** 2 + 1e-6).sum()
    np.testing.assert_allclose(reported, lam * global_sum / (1 if reduction == "sum" else z.shape[0]),
                               rtol=1e-12)


def test_no_grad_training_forward_raises_for_l2e():
    inh = make(width=4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="use_reentrant=False"):
        inh.apply(0, torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------- recompute


def two_layer_block(inh, x, w1, w2):
    h = inh.apply(0, F.gelu(x @ w1))
    return inh.apply(1, torch.tanh(h @ w2))


@pytest.mark.parametrize("method", ["l2e", "memel"])
def test_activation_recompute_gives_identical_statistics_and_gradients(method):
    width, hidden = 8, 6
    gen = torch.Generator().manual_seed(5)
    w1_0 = torch.randn(hidden, width, generator=gen, dtype=F64)
    w2_0 = torch.randn(width, width, generator=gen, dtype=F64) * 0.5
    runs = {}
    for use_ckpt in (False, True):
        inh = make(method, layers=(0, 1), width=width, inhibit_ratio=0.1, forget_steps=2, late_start=2,
                   reg_lambda=1e-2, topk=2)
        calls: list[int] = []
        original_apply = inh.apply
        inh.apply = lambda lid, z, _orig=original_apply, _calls=calls: _calls.append(lid) or _orig(lid, z)
        w1, w2 = w1_0.clone().requires_grad_(), w2_0.clone().requires_grad_()
        data_gen = torch.Generator().manual_seed(6)
        grads, states = [], []
        for _ in range(6):
            x = torch.randn(30, hidden, generator=data_gen, dtype=F64)
            target = torch.randn(30, width, generator=data_gen, dtype=F64)
            y = checkpoint(two_layer_block, inh, x, w1, w2, use_reentrant=False) if use_ckpt \
                else two_layer_block(inh, x, w1, w2)
            loss = (y * target).sum() + inh.regularization_loss()
            loss.backward()
            inh.finish_micro_batch()
            inh.end_step()
            grads.append((w1.grad.clone(), w2.grad.clone()))
            w1.grad = w2.grad = None
            states.append(inh.state_dict())
        runs[use_ckpt] = (grads, states, len(calls))
    (g0, s0, n0), (g1, s1, n1) = runs[False], runs[True]
    # every micro-batch recomputed at least one apply (early stop may skip a trailing one that saved nothing)
    assert n0 == 12 and n1 >= 18
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(s0, s1, strict=True):
        for lid in (0, 1):
            for key in ("mean", "var", "tau", "num_obs"):
                torch.testing.assert_close(a["layers"][lid][key], b["layers"][lid][key], rtol=0, atol=0)
    assert s1[-1]["layers"][0]["n_merged"] == 6


def test_reentrant_checkpoint_is_refused_for_l2e():
    inh = make(width=4)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        checkpoint(lambda t: inh.apply(0, t * 2), x, use_reentrant=True)


# ---------------------------------------------------------------------------------------------- state dict


def test_state_dict_round_trip_continues_identically():
    width, nf = 10, 3
    opts = dict(layers=(2, 5), width=width, inhibit_ratio=0.1, forget_steps=2, late_start=2, reg_lambda=1e-2,
                fkr=True, num_features=nf)
    a = make("l2e", **opts)
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(24, width, generator=gen, dtype=F64), torch.randint(-1, nf, (24,), generator=gen))
               for _ in range(9)]

    def run(inh, z, feats):
        z = z.clone().requires_grad_()
        inh.set_features(feats)
        out = inh.apply(2, z) + inh.apply(5, z * 0.5)
        (out.sum() + inh.regularization_loss()).backward()
        inh.finish_micro_batch()
        inh.end_step()
        return z.grad, inh.metrics()

    for z, feats in batches[:5]:
        run(a, z, feats)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    b = make("l2e", **opts)
    b.load_state_dict(torch.load(io.BytesIO(blob.getvalue())))
    for z, feats in batches[5:]:
        grad_a, metrics_a = run(a, z, feats)
        grad_b, metrics_b = run(b, z, feats)
        torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
        assert metrics_a == metrics_b and "l2e/layer5/fkr" in metrics_a
    for lid in (2, 5):
        for key, val in a.state_dict()["layers"][lid].items():
            other = b.state_dict()["layers"][lid][key]
            assert torch.equal(val, other) if isinstance(val, torch.Tensor) else val == other
    with pytest.raises(ValueError, match="layers"):
        make("l2e", **{**opts, "layers": (2,)}).load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------- FKR


def test_online_fkr_matches_reference():
    width, nf, p = 6, 3, 0.1
    inh = make("l2e", width=width, inhibit_ratio=p, forget_steps=2, late_start=2, fkr=True, num_features=nf)
    gen = np.random.default_rng(8)
    feat_sum, feat_cnt = np.zeros((nf, width)), np.zeros(nf)
    for _ in range(8):
        feats = gen.integers(-1, nf, size=64)
        # neuron j is noisy mostly on tokens of feature j % nf (a monosemantic-ish neuron)
        loud = feats[:, None] == (np.arange(width) % nf)[None, :]
        z = gen.standard_normal((64, width)) * np.where(loud, 3.0, 1.0)
        st = state(inh)
        scoring = st["n_merged"] >= 2
        selecting = scoring and st["tau_ready"]
        fkr_ready = feat_cnt.sum() > 0
        inh.set_features(torch.tensor(feats))
        inh.apply(0, torch.tensor(z, requires_grad=True))
        inh.finish_micro_batch()
        inh.end_step()
        metrics = inh.metrics()
        if selecting and fkr_ready:
            phi = reference_scores(z, st, 0.01)
            mean_score = np.where(feat_cnt[:, None] > 0, feat_sum / np.maximum(feat_cnt, 1)[:, None], -np.inf)
            best = mean_score.argmax(0)
            known_sel = (phi >= st["tau"].item()) & (feats >= 0)[:, None]
            expected = (known_sel & (feats[:, None] != best[None, :])).sum() / known_sel.sum()
            np.testing.assert_allclose(metrics["l2e/layer0/fkr"], expected, rtol=1e-12)
        else:
            assert "l2e/layer0/fkr" not in metrics
        if scoring:
            phi = reference_scores(z, st, 0.01)
            for f in range(nf):
                feat_sum[f] += phi[feats == f].sum(0)
                feat_cnt[f] += (feats == f).sum()
    saved = state(inh)
    np.testing.assert_allclose(saved["feat_score"].numpy(), feat_sum, rtol=1e-12)
    assert (saved["feat_score"] / saved["feat_count"][:, None]).argmax(0).tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------------------------------------- hooks


class ProbedMLP(torch.nn.Module):
    def __init__(self, layers=3, width=8):
        super().__init__()
        self.probes = torch.nn.ModuleList(torch.nn.Identity() for _ in range(layers))
        self.fc = torch.nn.ModuleList(torch.nn.Linear(width, width, dtype=F64) for _ in range(layers))

    def forward(self, x):
        for fc, probe in zip(self.fc, self.probes):
            x = probe(F.gelu(fc(x)))
        return x


def test_hooks_follow_model_training_flag_and_none_attaches_nothing():
    torch.manual_seed(0)
    model = ProbedMLP()
    probes = dict(enumerate(model.probes))
    x = torch.randn(16, 8, dtype=F64)
    plain = model(x).detach()

    assert attach(make("none", layers=(1,), width=8), probes) == []
    assert torch.equal(model(x), plain)

    inh = make("memel", layers=(1,), width=8, forget_steps=1, late_start=1)
    handles = attach(inh, probes)
    assert len(handles) == 1
    model.eval()
    assert torch.equal(model(x), plain)
    inh.finish_micro_batch()
    inh.end_step()
    assert state(inh, 1)["n_merged"] == 0  # eval forward recorded nothing
    model.train()
    model(x)
    inh.finish_micro_batch()
    inh.end_step()
    assert not torch.equal(model(x), plain)  # reverse deactivation now changes the output
    inh.finish_micro_batch()
    inh.end_step()
    for handle in handles:
        handle.remove()
    assert torch.equal(model(x), plain)
    with pytest.raises(ValueError, match="no activation probe"):
        attach(make("l2e", layers=(7,), width=8), probes)
