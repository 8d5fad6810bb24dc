"""NeuroMFA: Legendre transform vs closed forms, vectorised box counts vs a loop reference, the sampled network
vs a reshape-based reference of HF's QKV layout, shortest paths vs Floyd-Warshall, and an end-to-end run on
checkpoints of a tiny GPTNeoX trained for a few steps (JSON + figures)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from l2e_dist.analysis.multifractal import (
    default_q_grid,
    legendre_transform,
    multifractal_spectrum,
    spectrum_summary,
)
from l2e_dist.analysis.neuromfa import (
    NeuroMFASettings,
    analyse_state_dict,
    checkpoint_steps,
    neuromfa_summary,
    step_from_path,
)
from l2e_dist.analysis.neuromfa_network import (
    NeuroMFAError,
    build_network,
    direct_distances,
    is_block_weight,
    load_gptneox_state,
    sample_neuron_indices,
    shortest_path_distances,
)
from launcher.neuromfa import main as neuromfa_main

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256}


# ---------------------------------------------------------------- Legendre transform and spectrum numerics


def test_legendre_transform_of_binomial_cascade_matches_closed_form():
    """Binomial cascade (weights p, 1-p): tau(q) = -log2(p^q + (1-p)^q); f(alpha) is the binary entropy of
    the fraction x of small factors, alpha = x*alpha_max + (1-x)*alpha_min (counted directly, no Legendre)."""
    p = 0.3
    q = default_q_grid()
    tau = -np.log2(p**q + (1 - p) ** q)
    alpha, f_alpha = legendre_transform(q, tau)

    exact_alpha = -(p**q * np.log2(p) + (1 - p) ** q * np.log2(1 - p)) / (p**q + (1 - p) ** q)
    np.testing.assert_allclose(alpha, exact_alpha, atol=5e-4)
    alpha_min, alpha_max = -np.log2(1 - p), -np.log2(p)
    x = (alpha - alpha_min) / (alpha_max - alpha_min)
    entropy = -(x * np.log2(x) + (1 - x) * np.log2(1 - x))
    np.testing.assert_allclose(f_alpha, entropy, atol=1e-5)

    alpha_0, width = spectrum_summary(alpha, f_alpha)
    assert alpha_0 == pytest.approx((alpha_min + alpha_max) / 2, abs=1e-4)  # f peaks at 1 = box dimension
    assert f_alpha.max() == pytest.approx(1.0, abs=1e-9)
    assert width == pytest.approx(exact_alpha[0] - exact_alpha[-1], abs=1e-3)


def test_monofractal_inputs_give_zero_width():
    q = default_q_grid()
    alpha, f_alpha = legendre_transform(q, 1.7 * (q - 1.0))  # tau of a monofractal of dimension 1.7
    assert spectrum_summary(alpha, f_alpha)[1] < 1e-10
    np.testing.assert_allclose(f_alpha, 1.7, atol=1e-10)

    # A homogeneous network (every node sees the same distances) is monofractal; a mixed one is not.
    rng = np.random.default_rng(0)
    distances = rng.uniform(1.5, 150, size=40)
    nodes = np.repeat(np.arange(30), distances.size)
    homogeneous = multifractal_spectrum(nodes, np.tile(distances, 30))
    assert homogeneous.width < 1e-9
    np.testing.assert_allclose(homogeneous.f_alpha, 0.0, atol=1e-9)
    mixed = np.concatenate([np.tile(distances, 15), np.tile(rng.uniform(1.5, 20, size=40), 15)])
    assert multifractal_spectrum(nodes, mixed).width > 0.1


def test_box_counts_partition_function_and_tau_match_loop_reference():
    rng = np.random.default_rng(1)
    nodes = rng.integers(0, 25, size=900)
    distances = np.exp(rng.uniform(-0.5, 5.5, size=nodes.size))  # some outside (1, 150]
    q = default_q_grid()
    spectrum = multifractal_spectrum(nodes, distances, q)

    # Reference: the authors' per-node Counter formulation with Python loops and scipy linregress per q.
    per_node = {}
    for node in np.unique(nodes):
        kept = [d for d in distances[nodes == node] if 1 < d <= 150]
        if len(kept) > 10:
            per_node[node] = Counter(np.round(kept))
    radii = np.array(sorted(set().union(*per_node.values())))
    masses = np.array(
        [[1 + sum(c for d, c in counts.items() if d <= r) for r in radii] for counts in per_node.values()]
    )
    mu = masses / masses[:, -1:]
    log_z = np.array([np.log((mu**qq).sum(axis=0)) for qq in q])
    tau = np.array([stats.linregress(np.log(radii / radii[-1]), row).slope for row in log_z])

    assert spectrum.num_nodes == len(per_node)
    np.testing.assert_array_equal(spectrum.radii, radii)
    np.testing.assert_allclose(spectrum.log_partition, log_z, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(spectrum.tau, tau, rtol=1e-9, atol=1e-10)
    assert spectrum.tau[np.argmin(np.abs(q))] == pytest.approx(0.0, abs=1e-12)  # Z_0 = number of nodes
    np.testing.assert_allclose(
        spectrum.generalized_dimension[q != 1], tau[q != 1] / (q[q != 1] - 1), atol=1e-12
    )
    assert spectrum.generalized_dimension[q == 1] == spectrum.alpha[q == 1]  # limit tau'(1) at q = 1


# ---------------------------------------------------------------- sampling and the neuron network


def test_sampling_is_fixed_by_seed_and_differs_across_seeds():
    first = sample_neuron_indices(TINY, num_samples=3, seed=7)
    again = sample_neuron_indices(TINY, num_samples=5, seed=7)
    other = sample_neuron_indices(TINY, num_samples=3, seed=8)
    assert [s.to_json() for s in first] == [s.to_json() for s in again[:3]]
    assert all(a.to_json() != b.to_json() for a, b in zip(first, other))
    assert first[0].to_json() != first[1].to_json()
    sample = first[0]
    assert sample.block_inputs.shape == (3, 32) and sample.mlp.shape == (2, 64)
    for rows, size in (
        (sample.block_inputs, 64),
        (sample.attention, 64),
        (sample.dense_out, 64),
        (sample.mlp, 256),
    ):
        assert all(len(set(row)) == rows.shape[1] for row in rows) and rows.min() >= 0 and rows.max() < size
    with pytest.raises(NeuroMFAError, match="hidden_per_layer"):
        sample_neuron_indices(TINY, hidden_per_layer=65)


def _random_state(rng: np.random.Generator, config: dict) -> dict[str, np.ndarray]:
    h, inter = config["hidden_size"], config["intermediate_size"]
    state = {}
    for b in range(config["num_hidden_layers"]):
        prefix = f"gpt_neox.layers.{b}."
        state[prefix + "attention.query_key_value.weight"] = rng.normal(0, 0.02, (3 * h, h)).astype(
            np.float32
        )
        state[prefix + "attention.dense.weight"] = rng.normal(0, 0.02, (h, h)).astype(np.float32)
        state[prefix + "mlp.dense_h_to_4h.weight"] = rng.normal(0, 0.02, (inter, h)).astype(np.float32)
        state[prefix + "mlp.dense_4h_to_h.weight"] = rng.normal(0, 0.02, (h, inter)).astype(np.float32)
    return state


def test_network_edges_match_reference_with_interleaved_qkv():
    config = {"num_hidden_layers": 2, "hidden_size": 12, "num_attention_heads": 3, "intermediate_size": 48}
    h, heads, head = 12, 3, 4
    state = _random_state(np.random.default_rng(2), config)
    sample = sample_neuron_indices(
        config, num_samples=1, seed=3, hidden_per_layer=5, intermediate_per_layer=7
    )[0]
    network = build_network(state, config, sample)
    got = {(int(s), int(t)): float(w) for s, t, w in zip(network.source, network.target, network.weight)}

    expected = {}
    for b in range(2):

        def layer(name: str, b: int = b) -> np.ndarray:
            return network.layers[f"block{b}.{name}"]

        def w(name: str, b: int = b) -> np.ndarray:
            return state[f"gpt_neox.layers.{b}.{name}"].astype(np.float64)

        # HF splits query_key_value as view(heads, 3 * head_size) then chunk(3): per-head q, k, v blocks.
        per_head = w("attention.query_key_value.weight").reshape(heads, 3, head, h)
        split = {name: per_head[:, i].reshape(h, h) for i, name in enumerate("qkv")}
        for name in "qkv":
            for out_pos, out_index in enumerate(sample.attention[b]):
                for in_pos, in_index in enumerate(sample.block_inputs[b]):
                    expected[(layer("input")[in_pos], layer(name)[out_pos])] = split[name][
                        out_index, in_index
                    ]
        for out_pos in range(5):
            for src in np.concatenate([layer("q"), layer("k")]):
                expected[(src, layer("attention")[out_pos])] = 1.0
            expected[(layer("v")[out_pos], layer("attention")[out_pos])] = 1.0
        for (src_name, src_idx), (dst_name, dst_idx), weight_name in (
            (
                ("attention", sample.attention[b]),
                ("dense_out", sample.dense_out[b]),
                "attention.dense.weight",
            ),
            (("dense_out", sample.dense_out[b]), ("mlp", sample.mlp[b]), "mlp.dense_h_to_4h.weight"),
        ):
            for i, out_index in enumerate(dst_idx):
                for j, in_index in enumerate(src_idx):
                    expected[(layer(src_name)[j], layer(dst_name)[i])] = w(weight_name)[out_index, in_index]
        next_input = network.layers[f"block{b + 1}.input"]
        for i, out_index in enumerate(sample.block_inputs[b + 1]):
            for j, in_index in enumerate(sample.mlp[b]):
                expected[(layer("mlp")[j], next_input[i])] = w("mlp.dense_4h_to_h.weight")[
                    out_index, in_index
                ]

    expected = {(int(s), int(t)): float(v) for (s, t), v in expected.items()}
    assert got == expected

    torch_state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
    torch_network = build_network(torch_state, config, sample)
    bf16_weights = np.array(
        [
            float(torch.tensor(expected[(int(s), int(t))]).to(torch.bfloat16))
            for s, t in zip(torch_network.source, torch_network.target)
        ]
    )
    np.testing.assert_array_equal(torch_network.weight, bf16_weights)


def test_shortest_path_distances_match_floyd_warshall():
    config = {"num_hidden_layers": 2, "hidden_size": 12, "num_attention_heads": 3, "intermediate_size": 48}
    state = _random_state(np.random.default_rng(4), config)
    sample = sample_neuron_indices(
        config, num_samples=1, seed=5, hidden_per_layer=4, intermediate_per_layer=6
    )[0]
    network = build_network(state, config, sample)
    n = network.num_nodes
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    dist[network.source, network.target] = 1.0 / np.abs(network.weight)
    for k in range(n):
        dist = np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :])

    nodes, distances = shortest_path_distances(network, max_distance=150.0)
    got = sorted(zip(nodes.tolist(), np.round(distances, 9).tolist()))
    ref_rows, ref_cols = np.nonzero((dist <= 150.0) & ~np.eye(n, dtype=bool))
    expected = sorted(zip(ref_rows.tolist(), np.round(dist[ref_rows, ref_cols], 9).tolist()))
    assert got == expected
    assert len(got) > len(direct_distances(network)[0])  # paths reach beyond the direct neighbours


# ---------------------------------------------------------------- steps, loading, summary


def test_steps_from_paths_and_errors(tmp_path, capsys):
    assert step_from_path("runs/a/global_step1200") == 1200
    assert step_from_path("/x/step64/hf") == 64
    assert step_from_path("ckpt/iter_0001000") == 1000
    assert step_from_path("out/checkpoint-300") == 300
    assert step_from_path("/models/pythia") is None
    assert [s for s, _ in checkpoint_steps(["r/step20", "r/step3", "r/step100"])] == [3, 20, 100]
    assert [s for s, _ in checkpoint_steps(["b", "a"], steps=[5, 1])] == [1, 5]
    with pytest.raises(NeuroMFAError, match="pass --steps"):
        checkpoint_steps(["r/final"])

    assert neuromfa_main(["r/final", "--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "r/final" in message

    empty = tmp_path / "step5"
    empty.mkdir()
    with pytest.raises(NeuroMFAError, match=str(empty)):
        load_gptneox_state(empty)


def _tiny_model(seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=128, max_position_embeddings=32, **TINY)
    return GPTNeoXForCausalLM(config)


def test_loader_reads_hf_dirs_single_and_sharded(tmp_path):
    model = _tiny_model(0)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()  # older Pythia revisions ship pytorch_model.bin
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reference = {k: v for k, v in model.state_dict().items() if is_block_weight(k)}
    assert len(reference) == 4 * TINY["num_hidden_layers"]
    for directory in ("single", "sharded", "bin"):
        state, config = load_gptneox_state(tmp_path / directory, key_filter=is_block_weight)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        assert config["hidden_size"] == TINY["hidden_size"]


def test_summary_matches_analysis_and_emergence_is_zero_at_reference():
    model = _tiny_model(1)
    state, config = model.state_dict(), model.config
    settings = NeuroMFASettings(num_samples=3)
    samples = settings.samples(config)
    analysis = analyse_state_dict(state, config, samples, settings)
    first = neuromfa_summary(state, config, samples, settings)
    again = neuromfa_summary(state, config, samples, settings, reference=first)
    assert first["neuromfa/alpha_0"] == analysis.alpha_0
    assert np.mean([s.width for s in analysis.spectra]) == pytest.approx(first["neuromfa/width"])
    assert again["neuromfa/emergence"] == 0.0
    assert all(np.isfinite(v) for v in again.values())


def test_samples_without_spectrum_warn_and_give_nan():
    """Weights of 1e-3 put every edge at distance 1000 > 150: no node has a usable neighbourhood."""
    state = {k: np.full_like(v, 1e-3) for k, v in _random_state(np.random.default_rng(6), TINY).items()}
    samples = sample_neuron_indices(TINY, num_samples=2)
    with pytest.warns(RuntimeWarning, match="no spectrum"):
        summary = neuromfa_summary(state, TINY, samples)
    assert all(np.isnan(v) for v in summary.values())


# ---------------------------------------------------------------- end to end on a short tiny-model run


def _train_and_save(directory: Path, seed: int, lr: float, save_at: tuple[int, ...], name: str) -> list[Path]:
    model = _tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for step in range(max(save_at) + 1):
        if step in save_at:
            paths.append(directory / f"{name}{step}")
            model.save_pretrained(paths[-1])
        if step == max(save_at):
            break
        tokens = torch.randint(0, 128, (4, 16), generator=generator)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return paths


def _assert_real_png(path: Path) -> None:
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 300 <= image.shape[0] <= 2000 and 300 <= image.shape[1] <= 3000
    rgb = image[..., :3]
    assert rgb.std() > 0.05 and (rgb.mean(axis=2) < 0.9).mean() > 0.01  # drawn, not blank


def test_short_tiny_run_gives_finite_metrics_and_figures(tmp_path):
    run_a = _train_and_save(tmp_path / "a", seed=0, lr=3e-3, save_at=(0, 3, 6), name="step")
    run_b = _train_and_save(tmp_path / "b", seed=0, lr=1e-3, save_at=(0, 3, 6), name="global_step")
    out = tmp_path / "out"
    argv = [
        "--run",
        "fast",
        *map(str, run_a),
        "--run",
        "slow",
        *map(str, run_b),
        "--samples",
        "4",
        "--out",
        str(out),
    ]
    assert neuromfa_main(argv) == 0

    report = json.loads((out / "neuromfa.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["fast", "slow"]
    for run in report["runs"]:
        checkpoints = run["checkpoints"]
        assert [c["step"] for c in checkpoints] == [0, 3, 6]
        assert checkpoints[0]["emergence"] == 0.0
        for c in checkpoints:
            assert all(np.isfinite(c[key]) for key in ("alpha_0", "width", "emergence"))
            assert len(c["samples"]) == 4 and all(s is not None for s in c["samples"])
            assert len(c["mean_spectrum"]["f_alpha"]) == len(report["q"]) == 61
        assert checkpoints[2]["alpha_0"] != checkpoints[0]["alpha_0"]  # the trained weights were read
    # Same seed and shape: both runs (and all their checkpoints) use the same neurons.
    assert report["runs"][0]["sample_indices"] == report["runs"][1]["sample_indices"]
    # Both runs start from the same init, so their first checkpoints agree exactly.
    assert report["runs"][0]["checkpoints"][0]["alpha_0"] == report["runs"][1]["checkpoints"][0]["alpha_0"]
    _assert_real_png(out / "spectra.png")
    _assert_real_png(out / "metrics.png")

    overlay = tmp_path / "overlay"
    assert (
        neuromfa_main(["--from-json", str(out / "neuromfa.json"), "--samples", "4", "--out", str(overlay)])
        == 0
    )
    assert json.loads((overlay / "neuromfa.json").read_text())["runs"] == report["runs"]
    _assert_real_png(overlay / "metrics.png")
