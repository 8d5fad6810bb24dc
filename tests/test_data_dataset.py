"""Training-side data: packing, splitting, blending, labels, deterministic global batches, bad files."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
import sysconfig
import warnings

import numpy as np
import pytest
import torch

from l2e_dist.config_utils import ConfigError, build
from l2e_dist.data import DataConfig, DataFileError, build_datasets, global_batch_iterator
from l2e_dist.data.indexed import read_meta, write_labels
from l2e_dist.data.tokenizer import TextTokenizer

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
EOD = 0


def write_corpus(prefix: str, docs: list[list[int]], labels: list[str] | None, meta: bool = True) -> None:
    """Reference writer: megatron-core's own IndexedDatasetBuilder, plus our sidecars."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(prefix + ".idx")
    if labels is not None:
        names = sorted(set(labels))
        write_labels(prefix, np.array([names.index(x) for x in labels]), names, field="test")
    if meta:
        import json

        with open(prefix + ".meta.json", "w") as stream:
            json.dump({"tokenizer": {"path": "none", "vocab_size": 1000, "eod_id": EOD}}, stream)


def random_docs(rng: np.random.Generator, n: int, low: int, high: int) -> list[list[int]]:
    """Distinct documents of random length, each ending with EOD, token ids in [low, high)."""
    docs = []
    for i in range(n):
        body = rng.integers(low, high, size=int(rng.integers(1, 30))).tolist()
        docs.append([low + i % (high - low), *body, EOD])  # first token varies: documents are distinct
    return docs


def test_packing_split_and_labels_match_a_reference(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 200, 1, 500)
    labels = [["alpha", "beta", "gamma"][i % 3] for i in range(len(docs))]
    prefix = str(tmp_path / "corpus")
    write_corpus(prefix, docs, labels)
    seq = 16
    cfg = build(DataConfig, {"paths": [prefix], "split": "8,1,1", "cache_dir": str(tmp_path / "cache")}, "data")
    data = build_datasets(cfg, seq_length=seq, seed=7)
    assert data.feature_names == ["alpha", "beta", "gamma"] and data.vocab_size == 1000 and data.eod_id == EOD
    doc_label = {tuple(d): ["alpha", "beta", "gamma"].index(x) for d, x in zip(docs, labels)}
    clone = pickle.loads(pickle.dumps(data.train))  # DataLoader workers get the dataset pickled
    assert all(torch.equal(clone[i]["tokens"], data.train[i]["tokens"]) for i in range(len(data.train)))
    bounds = {"train": (0, 160), "valid": (160, 180), "test": (180, 200)}  # Megatron rounding of 8:1:1
    for name, (lo, hi) in bounds.items():
        split = getattr(data, name)
        samples = [split[i] for i in range(len(split))]
        for a, b in zip(samples, samples[1:]):  # consecutive samples overlap by one token
            assert a["tokens"][-1] == b["tokens"][0]
        stream = np.concatenate([s["tokens"][:-1].numpy() for s in samples] + [samples[-1]["tokens"][-1:].numpy()])
        feats = np.concatenate([s["feature_labels"][:-1].numpy() for s in samples] + [samples[-1]["feature_labels"][-1:].numpy()])
        total = sum(len(d) for d in docs[lo:hi])
        assert len(split) == (total - 1) // seq and total - len(stream) < seq + 1
        # cut the stream at EOD: the complete pieces are distinct documents of this split, shuffled
        cuts = np.flatnonzero(stream == EOD) + 1
        pieces = np.split(stream, cuts)
        piece_feats = np.split(feats, cuts)
        complete = [tuple(p.tolist()) for p in pieces if len(p) and p[-1] == EOD]
        assert len(set(complete)) == len(complete) and set(complete) <= {tuple(d) for d in docs[lo:hi]}
        assert complete != [tuple(d) for d in docs[lo:hi]][: len(complete)]  # shuffled
        missing = {tuple(d) for d in docs[lo:hi]} - set(complete)  # = the cut last piece + the dropped tail
        partial = len(pieces[-1]) if len(pieces[-1]) and pieces[-1][-1] != EOD else 0
        assert sum(len(m) for m in missing) == total - len(stream) + partial
        for piece, feat in zip(pieces, piece_feats):
            if len(piece) and piece[-1] == EOD:
                assert (feat == doc_label[tuple(piece.tolist())]).all()


def test_samples_without_sidecar_have_unknown_features_and_tokenizer_is_required(tmp_path):
    prefix = str(tmp_path / "nolabels")
    write_corpus(prefix, random_docs(np.random.default_rng(1), 40, 1, 100), labels=None, meta=False)
    cfg = DataConfig(paths=[prefix], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFileError, match="set data.tokenizer"):
        build_datasets(cfg, seq_length=8, seed=0)
    from tokenizers import Tokenizer, models

    tok_path = str(tmp_path / "tokenizer.json")
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]")).save(tok_path)
    cfg = DataConfig(paths=[prefix], tokenizer=tok_path, cache_dir=str(tmp_path / "cache"))
    data = build_datasets(cfg, seq_length=8, seed=0)
    assert data.feature_names == [] and data.vocab_size == 3 and data.eod_id == 0
    assert (data.train[0]["feature_labels"] == -1).all() and data.train[0]["tokens"].shape == (9,)


def test_blending_follows_weights_and_spreads_evenly(tmp_path):
    rng = np.random.default_rng(2)
    small, large = str(tmp_path / "small"), str(tmp_path / "large")
    write_corpus(small, random_docs(rng, 60, 1, 100), ["s"] * 60)  # tokens < 100
    write_corpus(large, random_docs(rng, 240, 100, 200), ["l"] * 240)  # tokens >= 100
    seq = 8
    data = build_datasets(DataConfig(paths=[small, large], weights=[1.0, 1.0], split="1,0,0",
                                     cache_dir=str(tmp_path / "cache")), seq_length=seq, seed=3)
    unweighted = build_datasets(DataConfig(paths=[small, large], split="1,0,0",
                                           cache_dir=str(tmp_path / "cache")), seq_length=seq, seed=3)
    n = len(data.train)
    assert n == len(unweighted.train) == len(data.train.parts[0]) + len(data.train.parts[1])
    # source of each blended sample, read from the data itself (token range and feature label)
    source = np.array([int(data.train[i]["tokens"][1:].max() >= 100) for i in range(n)])
    feature = np.array([int(data.train[i]["feature_labels"][0]) for i in range(n)])
    names = data.feature_names
    assert names == ["l", "s"] and ((source == 1) == (feature == names.index("l"))).all()
    assert abs(source.sum() - n / 2) <= 1  # equal weights: half each, although `small` is 4x smaller
    window = 20
    for start in range(0, n - window, window):  # spread evenly, not in blocks
        assert abs(source[start : start + window].sum() - window / 2) <= 1
    # up-weighted `small` repeats its samples in order; without weights each sample appears once
    clone = pickle.loads(pickle.dumps(data.train))
    assert all(torch.equal(clone[i]["tokens"], data.train[i]["tokens"]) for i in range(n))
    small_part = data.train.parts[0]
    from_small = [data.train[i]["tokens"] for i in range(n) if source[i] == 0]
    for j, tokens in enumerate(from_small):
        assert (tokens == small_part[j % len(small_part)]["tokens"]).all()
    seen = {tuple(unweighted.train[i]["tokens"].tolist()) for i in range(n)}
    every = {tuple(p[j]["tokens"].tolist()) for p in unweighted.train.parts for j in range(len(p))}
    assert seen == every


def _global_batches(dataset, *, steps: int, start: int, mb: int, dp: int, gbs: int, order_dir: str) -> list[list]:
    """Per step: the global batch as a list of sample token tuples, gathered over all dp ranks."""
    iters = [global_batch_iterator(dataset, global_batch_size=gbs, micro_batch_size=mb, dp_rank=r, dp_size=dp,
                                   seed=11, start_step=start, order_dir=order_dir) for r in range(dp)]
    out = []
    for _ in range(steps):
        batch = []
        for it in iters:
            micro = next(it)
            assert len(micro) == gbs // (mb * dp) and micro[0]["tokens"].shape[0] == mb
            batch += [tuple(row.tolist()) for m in micro for row in m["tokens"]]
        out.append(batch)
    return out


def test_global_batches_identical_across_resume_and_dp_size(tmp_path):
    prefix = str(tmp_path / "c")
    write_corpus(prefix, random_docs(np.random.default_rng(4), 120, 1, 1000), ["x"] * 120)
    data = build_datasets(DataConfig(paths=[prefix], split="1,0,0", cache_dir=str(tmp_path / "cache")),
                          seq_length=8, seed=5)
    n = len(data.train)
    gbs, steps = 12, (3 * n) // 12 + 2  # > 3 epochs: batches straddle epoch boundaries
    fresh = _global_batches(data.train, steps=steps, start=0, mb=3, dp=1, gbs=gbs, order_dir=None)
    for mb, dp in [(2, 2), (1, 4), (2, 3), (6, 2)]:
        other = _global_batches(data.train, steps=steps, start=0, mb=mb, dp=dp, gbs=gbs, order_dir=None)
        assert [sorted(b) for b in other] == [sorted(b) for b in fresh]
    resumed = _global_batches(data.train, steps=steps - 5, start=5, mb=2, dp=2, gbs=gbs, order_dir=None)
    assert [sorted(b) for b in resumed] == [sorted(b) for b in fresh[5:]]
    # every epoch is a permutation of all samples
    stream = [s for b in fresh for s in b]
    all_samples = sorted(tuple(data.train[i]["tokens"].tolist()) for i in range(n))
    for e in range(3):
        assert sorted(stream[e * n : (e + 1) * n]) == all_samples
    # the order lives on disk next to the data and is reused as written
    order_files = sorted(f for f in os.listdir(data.train.index_dir) if f.startswith("order-"))
    assert len(order_files) == 4
    path = os.path.join(data.train.index_dir, order_files[0])
    reversed_order = np.load(path)[::-1].copy()
    np.save(path, reversed_order)
    first = _global_batches(data.train, steps=1, start=0, mb=3, dp=1, gbs=gbs, order_dir=None)[0]
    assert first == [tuple(data.train[int(i)]["tokens"].tolist()) for i in reversed_order[:gbs]]


def test_global_batch_errors(tmp_path):
    prefix = str(tmp_path / "c")
    write_corpus(prefix, random_docs(np.random.default_rng(4), 30, 1, 100), None)
    data = build_datasets(DataConfig(paths=[prefix], cache_dir=str(tmp_path / "cache")), seq_length=8, seed=5)
    with pytest.raises(ValueError, match="not divisible by micro_batch_size"):
        next(global_batch_iterator(data.train, global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=3,
                                   seed=0))
    with pytest.raises(ValueError, match="dp_rank=3 out of range"):
        next(global_batch_iterator(data.train, global_batch_size=6, micro_batch_size=2, dp_rank=3, dp_size=3,
                                   seed=0))


def test_damaged_files_give_one_clear_error(tmp_path):
    prefix = str(tmp_path / "c")
    write_corpus(prefix, random_docs(np.random.default_rng(6), 30, 1, 100), ["a"] * 30)
    cfg = DataConfig(paths=[prefix], cache_dir=str(tmp_path / "cache"))
    build_datasets(cfg, seq_length=8, seed=0)
    with open(prefix + ".bin", "ab") as stream:
        stream.write(b"\0\0")
    with pytest.raises(DataFileError, match=r"c\.bin has .* bytes but .*describes"):
        build_datasets(cfg, seq_length=8, seed=0)
    idx = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(idx[:-3])
    with pytest.raises(DataFileError, match="truncated or corrupt"):
        build_datasets(cfg, seq_length=8, seed=0)
    open(prefix + ".idx", "wb").write(b"garbage" * 10)
    with pytest.raises(DataFileError, match="bad header"):
        build_datasets(cfg, seq_length=8, seed=0)
    os.remove(prefix + ".idx")
    with pytest.raises(DataFileError, match=r"c\.idx not found"):
        build_datasets(cfg, seq_length=8, seed=0)
    write_corpus(prefix, random_docs(np.random.default_rng(6), 30, 1, 100), None)
    write_labels(prefix, np.zeros(29, dtype=np.int32), ["a"], field="test")
    with pytest.raises(DataFileError, match="29 labels for 30 documents"):
        build_datasets(cfg, seq_length=8, seed=0)
    assert len(build_datasets(DataConfig(paths=[prefix], labels=False, cache_dir=cfg.cache_dir), 8, 0).train) > 0


@pytest.mark.parametrize(
    ("section", "key"),
    [({"split": "1,2"}, "data.split"), ({"split": "a,b,c"}, "data.split"), ({"weights": [1.0]}, "data.weights"),
     ({"paths": ["a", "b"], "weights": [1.0]}, "data.weights"), ({"paths": ["a"], "weights": [-1.0]}, "data.weights"),
     ({"paths": ["a.bin"]}, "data.paths[0]"), ({"path": ["a"]}, "data.path")],
)
def test_config_errors_name_the_key(section, key):
    with pytest.raises(ConfigError) as err:
        build(DataConfig, section, "data")
    assert err.value.key == key


def _stdlib_module_docstring(rel: str) -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], rel), "rb") as stream:
        return ast.get_docstring(ast.parse(stream.read()), clean=True)


@pytest.mark.slow
def test_default_corpus_is_labelled_deterministic_and_safe_to_build_concurrently(tmp_path, data_cache):
    data = build_datasets(DataConfig(cache_dir=data_cache), seq_length=64, seed=0)  # the session's own build
    prefix = data.tokenizer_path.rsplit("/", 1)[0] + "/stdlib-docstrings"
    meta = read_meta(prefix)
    assert 2000 <= data.vocab_size <= 4000 and meta["dtype"] == "uint16"
    assert {"json", "email", "asyncio", "toplevel-modules"} <= set(data.feature_names)
    # documents decode back to stdlib docstrings, labelled with their package (reference: ast on the file)
    from l2e_dist.data.indexed import open_indexed, read_labels

    indexed = open_indexed(prefix)
    labels, names = read_labels(prefix, len(indexed.document_indices) - 1)
    tokenizer = TextTokenizer(data.tokenizer_path)
    texts = {}
    for d in range(len(labels)):
        tokens = indexed[d]
        assert tokens[-1] == data.eod_id
        texts.setdefault(tokenizer.decode(tokens[:-1]), set()).add(names[labels[d]])
    assert texts[_stdlib_module_docstring("json/__init__.py")] == {"json"}
    assert texts[_stdlib_module_docstring("email/message.py")] == {"email"}
    assert texts[_stdlib_module_docstring("textwrap.py")] == {"toplevel-modules"}
    # two processes building a fresh cache at once: one builds, both return it, identical to the session's build
    script = "from l2e_dist.data import prepare_default_corpus as p; import sys; print(p(sys.argv[1]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "b")], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__))) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    for suffix in (".bin", ".idx", ".labels.npy", ".labels.json", ".meta.json"):
        assert open(outs[0] + suffix, "rb").read() == open(prefix + suffix, "rb").read()
    assert open(outs[0].rsplit("/", 1)[0] + "/tokenizer.model", "rb").read() == open(data.tokenizer_path, "rb").read()
    assert not [f for f in os.listdir(tmp_path / "b" / "default-corpus") if ".tmp-" in f]
