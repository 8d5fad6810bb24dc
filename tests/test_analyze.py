"""l2e-analyze: exact MS statistics, thresholds, FKR and K-S against numpy/scipy references, constructed FKR
cases, labelled samples from .bin/.idx, and the CLI end to end on a tiny trained model (HF directory and the
same weights as a TP=2 training checkpoint) with its JSON and figures."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from scipy import stats

from l2e_dist.analysis.monosemanticity import analyze_layer, monosemanticity_scores, neuron_moments

VOCAB, EOD = 64, 0
FEATURES = ["alpha", "beta", "gamma"]  # documents of feature k use token ids 1 + 20k .. 20 + 20k


def _reference_fkr(phi: np.ndarray, features: np.ndarray, tau: float) -> float:
    """FKR straight from the method doc, with loops over features (independent of the sorted implementation)."""
    known = sorted(set(features[features >= 0].tolist()))
    means = np.stack([phi[features == f].mean(axis=0) for f in known])
    best = np.array(known)[means.argmax(axis=0)]
    selected = (phi >= tau) & (features >= 0)[:, None]
    wrong = selected & (features[:, None] != best[None, :])
    return wrong.sum() / selected.sum()


def _check_layer_against_references(z: np.ndarray, features: np.ndarray, names: list[str], layer: dict,
                                    eps: float, rtol: float = 1e-9) -> None:
    mean, var = z.astype(np.float64).mean(axis=0), z.astype(np.float64).var(axis=0, ddof=1)
    phi = (z - mean) ** 2 / (var + eps * var.mean())
    flat = phi.ravel()
    # Counts at a threshold: with rtol > 1e-9 the reference activations are recomputed by another model
    # (transformers), so a score within rtol of the threshold may fall on either side. The count must then
    # lie between the counts at the threshold moved by 10 x rtol either way; at rtol 1e-9 that band is empty.
    band = 10 * rtol

    def check_count(got: float, values: np.ndarray, threshold: float) -> None:
        strict, loose = np.mean(values >= threshold * (1 + band)), np.mean(values >= threshold * (1 - band))
        assert strict - 1e-12 <= got <= loose + 1e-12, (got, strict, loose)

    for row in layer["thresholds"]:
        tau = np.quantile(flat, 1 - row["p"])
        assert row["tau"] == pytest.approx(tau, rel=rtol)
        check_count(row["selected_frac"], flat, row["tau"])
        check_count(row["neurons_selected_frac"], phi.max(axis=0), row["tau"])
        in_band = np.sum(np.abs(flat - row["tau"]) <= band * row["tau"])
        fkr_tolerance = in_band / max(1, np.sum(flat >= row["tau"] * (1 + band))) + 1e-9
        assert abs(row["fkr"] - _reference_fkr(phi, features, row["tau"])) <= fkr_tolerance
    for entry in layer["reference"]:
        check_count(entry["frac_above"], flat, entry["score"])
    for label, row in enumerate(layer["features"]):
        assert row["name"] == names[label]
        member = features == label
        assert row["tokens"] == member.sum()
        if member.any():
            expected = stats.ks_2samp(phi[member].ravel(), flat).statistic
            assert row["ks"] == pytest.approx(expected, rel=rtol, abs=1e-12)
            assert row["mean_score"] == pytest.approx(phi[member].mean(), rel=rtol)
        else:
            assert row["ks"] is None and row["mean_score"] is None


def test_statistics_scores_fkr_and_ks_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    tokens, width = 600, 24
    # post-GELU-like: many exact zeros (ties) and a few neurons that fire on one feature
    features = rng.integers(-1, 3, size=tokens)
    z = np.maximum(rng.normal(size=(tokens, width)), 0.0).astype(np.float32)
    z[features == 1, :4] += 3.0
    z[:, 5] = 0.25  # a dead neuron (variance 0): eps keeps its score finite
    names = ["a", "b", "c", "never-seen"]

    mean, var = neuron_moments(z)
    np.testing.assert_allclose(mean, z.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, z.astype(np.float64).var(axis=0, ddof=1), rtol=1e-10, atol=1e-15)
    phi = monosemanticity_scores(z, mean, var, eps=0.01)
    np.testing.assert_allclose(phi, (z - mean) ** 2 / (var + 0.01 * var.mean()), rtol=1e-12)

    layer = analyze_layer(z, features, names, eps=0.01, ratios=(0.005, 0.02, 0.1), reference_scores=(1.0, 10.0))
    _check_layer_against_references(z, features, names, layer, eps=0.01)
    assert layer["features"][1]["neurons_best"] >= 4  # the four planted neurons prefer feature b
    assert layer["top_neurons"][0]["feature"] == "b"
    assert layer["unknown_tokens"] == int((features < 0).sum())
    assert layer["activation"]["dead_neurons"] == 1
    edges = np.asarray(layer["score"]["log10_edges"])
    with np.errstate(divide="ignore"):
        logs = np.clip(np.log10(phi), edges[0], edges[-1])
    assert layer["score"]["histogram"] == np.histogram(logs, edges)[0].tolist()
    for label, row in enumerate(layer["features"]):
        assert row["histogram"] == np.histogram(logs[features == label], edges)[0].tolist()


def _outlier_layer(own_feature_outliers: bool) -> dict:
    """Per neuron: feature A tokens alternate +-1 (high mean score -> l* = A), feature B tokens are 0 except one
    outlier of 5 on a B token (or, for the FKR = 0 case, on an A token). At p = 0.5% exactly the outliers pass."""
    width, half = 8, 100
    features = np.repeat([0, 1], half)
    z = np.zeros((2 * half, width))
    z[:half] = np.where(np.arange(half) % 2 == 0, 1.0, -1.0)[:, None]
    for j in range(width):
        row = (3 * j) % half if own_feature_outliers else half + j
        z[row, j] = 5.0
    return analyze_layer(z, features, ["A", "B"], eps=0.0, ratios=(0.005,))


def test_fkr_is_zero_on_own_feature_and_one_off_feature():
    for own, expected in ((True, 0.0), (False, 1.0)):
        layer = _outlier_layer(own)
        row = layer["thresholds"][0]
        assert row["selected_known"] == 8  # one outlier per neuron
        assert row["fkr"] == expected
        assert layer["features"][0]["neurons_best"] == 8


def _write_indexed(prefix: str, docs: list[np.ndarray]) -> None:
    """uint16 .bin/.idx in the GPT-NeoX/Megatron layout (one sequence per document), written here with numpy
    and validated by the data package's deep check (megatron's builder writes the same bytes, but importing it
    costs more than this whole test)."""
    from l2e_dist.data.indexed import INDEX_MAGIC, check_index

    lengths = np.array([d.size for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * 2])
    header = INDEX_MAGIC + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1)
    with open(prefix + ".idx", "wb") as stream:
        stream.write(header + lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1).tobytes())
    with open(prefix + ".bin", "wb") as stream:
        stream.write(np.concatenate(docs).astype(np.uint16).tobytes())
    check_index(prefix, deep=True)


def _write_labelled_dataset(prefix: str, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Documents with a feature each (some unlabelled) and the label sidecar l2e-prepare-data writes."""
    from l2e_dist.data.indexed import write_labels

    rng = np.random.default_rng(seed)
    docs, labels = [], []
    for k in range(120):
        label = -1 if k % 8 == 0 else k % 3  # every 8th document is unlabelled
        low = 1 if label < 0 else 1 + 20 * label
        high = 61 if label < 0 else low + 20
        length = int(rng.integers(8, 40))
        docs.append(np.append(rng.integers(low, high, size=length), EOD).astype(np.uint16))
        labels.append(-1 if label < 0 else label)
    _write_indexed(prefix, docs)
    write_labels(prefix, np.array(labels), FEATURES, field="test")
    return docs, labels


def test_sample_indexed_packs_stratified_documents_with_labels(tmp_path):
    from l2e_dist.analysis.samples import sample_indexed

    prefix = str(tmp_path / "docs")
    docs, labels = _write_labelled_dataset(prefix)
    sample = sample_indexed(prefix, seq_length=16, max_tokens=200, seed=3, doc_window=0)
    # Reference: each label's documents in the order of one seeded permutation, the labels taking turns
    # (0, 1, 2, then unknown), whole documents packed until 12 rows of 16 are full.
    order = np.random.default_rng(3).permutation(len(docs))
    by_label = {label: [d for d in order if labels[d] == label] for label in (0, 1, 2, -1)}
    turns = [by_label[label][i] for i in range(len(docs)) for label in (0, 1, 2, -1) if i < len(by_label[label])]
    stream = np.concatenate([docs[d] for d in turns])[:192]
    stream_labels = np.concatenate([np.full(docs[d].size, labels[d]) for d in turns])[:192]
    assert sample.tokens.shape == (12, 16) and sample.feature_names == FEATURES
    np.testing.assert_array_equal(sample.tokens.ravel(), stream)
    np.testing.assert_array_equal(sample.features.ravel(), stream_labels)
    assert sample.source["labels_covered"] == 3


def test_sample_jsonl_tokenizes_pile_records_in_order(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from l2e_dist.analysis.samples import sample_jsonl
    from l2e_dist.data.tokenizer import TextTokenizer

    records = [{"text": f"document {k} about {name} " * (k % 3 + 1), "meta": {"pile_set_name": name}}
               for k, name in enumerate(["Wikipedia (en)", "ArXiv", "Github", "ArXiv", "Wikipedia (en)"] * 4)]
    records[2]["meta"] = {}  # unlabelled document
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "{not json")  # skipped and counted
    (tmp_path / "pile.jsonl").write_text("\n".join(lines) + "\n")
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([r["text"] for r in records], trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[UNK]", "<|endoftext|>"], show_progress=False))
    bpe.save(str(tmp_path / "tokenizer.json"))

    sample = sample_jsonl([str(tmp_path / "pile.jsonl")], str(tmp_path / "tokenizer.json"), seq_length=8,
                          max_tokens=100, doc_window=0)
    tokenizer = TextTokenizer(str(tmp_path / "tokenizer.json"))
    names = ["ArXiv", "Github", "Wikipedia (en)"]
    ids = tokenizer.encode_batch([r["text"] for r in records])
    stream = np.concatenate([np.append(i, tokenizer.eod_id) for i in ids])[:96]
    labels = np.concatenate([np.full(len(i) + 1, names.index(r["meta"]["pile_set_name"]) if r["meta"] else -1)
                             for i, r in zip(ids, records)])[:96]
    assert sample.feature_names == names and sample.tokens.shape == (12, 8)
    np.testing.assert_array_equal(sample.tokens.ravel(), stream)
    np.testing.assert_array_equal(sample.features.ravel(), labels)
    assert sample.source["skipped_bad_records"] == 1


def test_layer_selection():
    from l2e_dist.analysis.analyze import AnalysisError, resolve_layers

    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("mid2", 6) == [2, 3]
    assert resolve_layers("mid_third", 6) == [2, 3]
    assert resolve_layers("3,1", 4) == [1, 3]
    for bad, message in (("7", "out of range"), ("x", "cannot parse"), ("1,1", "duplicate")):
        with pytest.raises(AnalysisError, match=message):
            resolve_layers(bad, 4)


def _train_tiny_model(directory, tokens: np.ndarray) -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.from_numpy(tokens)
    for step in range(20):
        rows = batch[(step * 8) % len(batch):][:8]
        loss = model(rows, labels=rows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)


def _reference_activations(directory, tokens: np.ndarray) -> list[np.ndarray]:
    """Post-GELU MLP activations of every layer recomputed from the hidden states (no hooks):
    act(dense_h_to_4h(post_attention_layernorm(layer input))) for GPT-NeoX's parallel residual."""
    import torch
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.gpt_neox(torch.from_numpy(tokens), output_hidden_states=True).hidden_states
        out = []
        for i, layer in enumerate(model.gpt_neox.layers):
            pre = layer.mlp.dense_h_to_4h(layer.post_attention_layernorm(hidden[i]))
            out.append(torch.nn.functional.gelu(pre).reshape(-1, pre.shape[-1]).double().numpy())
    return out


@pytest.mark.slow
def test_analyze_cli_on_hf_dir_and_training_checkpoint(tmp_path, capsys):
    from matplotlib.image import imread

    from l2e_dist.analysis.plots import plot_features, plot_fkr, plot_score_distributions
    from l2e_dist.analysis.samples import sample_indexed
    from l2e_dist.checkpoint.convert import import_hf
    from launcher.analyze import main

    prefix = str(tmp_path / "docs")
    _write_labelled_dataset(prefix)
    sample = sample_indexed(prefix, seq_length=32, max_tokens=1024, seed=0)
    hf_dir = tmp_path / "hf"
    _train_tiny_model(hf_dir, sample.tokens)
    checkpoint = import_hf(hf_dir, tmp_path / "ckpt-tp2", tp=2)
    out = tmp_path / "analysis"
    argv = [str(hf_dir), str(checkpoint), "--labels", "hf", "tp2", "--data", prefix, "--seq-length", "32",
            "--max-tokens", "1024", "--ratios", "0.005,0.02,0.1", "--reference-scores", "5,10", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    assert "hf layer 1: tau(p=2.0%)" in capsys.readouterr().out

    report = json.loads((out / "analysis.json").read_text())
    assert report["format"] == "l2e-analyze/1" and report["data"]["tokens"] == 1024
    assert report["data"]["feature_names"] == FEATURES and report["figures"] == ["scores.png", "fkr.png",
                                                                                   "features.png"]
    hf_model, ckpt_model = report["models"]
    assert [layer["layer"] for layer in hf_model["layers"]] == [0, 1, 2, 3]
    features = sample.features.reshape(-1)
    for z, layer in zip(_reference_activations(hf_dir, sample.tokens), hf_model["layers"]):
        _check_layer_against_references(z, features, FEATURES, layer, eps=0.01, rtol=1e-4)
    for a, b in zip(hf_model["layers"], ckpt_model["layers"]):  # same weights via the TP=2 checkpoint
        assert [t["tau"] for t in a["thresholds"]] == pytest.approx([t["tau"] for t in b["thresholds"]], rel=1e-5)
        assert [f["ks"] for f in a["features"]] == pytest.approx([f["ks"] for f in b["features"]], abs=1e-3)

    for name in report["figures"]:
        image = imread(out / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 400 and image.shape[2] in (3, 4)
        assert image[..., :3].std() > 0.05 and len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50
    for figure in (plot_score_distributions(report), plot_fkr(report), plot_features(report)):
        for ax in figure.axes:
            if ax.get_visible() and ax.get_label() != "<colorbar>":
                assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_analyze_errors_are_one_line(tmp_path, capsys):
    from launcher.analyze import main

    assert main([str(tmp_path), "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing.idx not found" in err and len(err.strip().splitlines()) == 1
    prefix = str(tmp_path / "docs")
    _write_labelled_dataset(prefix)
    assert main([str(tmp_path / "nope"), "--data", prefix, "--seq-length", "16", "--max-tokens", "64"]) == 2
    assert "model not found" in capsys.readouterr().err
