"""PolyPythia data orders (data.order=pythia_index_maps): an unshuffled corpus read through a seed's GPT-NeoX index
maps gives the rows of the pre-shuffled file written from those maps (what data.order=pythia reads), seeds give
different orders, bad maps are one-line errors, and runs record their data seed (branch / resume across seeds
refused).

References are independent of the code under test: the maps are rebuilt by a line-by-line transcription of
gpt-neox d36f623 gpt2_dataset.py (its pure-Python _build_sample_idx loop; the builder uses megatron-core's compiled
helper), and every sample is also cut directly from the token stream of the doc_idx order (sample j = stream
tokens [j*SEQ, j*SEQ + SEQ]) read from the .bin with numpy.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from l2e_dist.config import load_config
from l2e_dist.config_utils import ConfigError
from l2e_dist.data import build_datasets
from l2e_dist.data.data_seed import DataSeedMismatch, check_branch_data_seed, check_resume_data_seed
from l2e_dist.data.index_map_build import write_index_maps
from l2e_dist.data.index_maps import IndexMapError
from l2e_dist.errors import UserError
from l2e_dist.training.init_data_seed import init_from_data_seed
from l2e_dist.training.run_data import global_batch_tokens
from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed
from tests.test_pythia_order import global_batches, recorded_run, viewer, write_tokenizer

VOCAB = 500
SEQ = 16
GBS = 8
DOCS = 40
NUM_SAMPLES = 100  # > one epoch of the corpus: two epochs in doc_idx
SEED_A, SEED_B = 3, 1234
TINY = str(ROOT / "configs" / "tiny.yaml")


def doc_lengths(docs: int = DOCS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 60, size=docs)  # shorter and longer than a sample


def doc_tokens(d: int, length: int) -> np.ndarray:
    """Document d's tokens encode (d, position): ids in [2, VOCAB)."""
    return (2 + (d * 61 + np.arange(length)) % (VOCAB - 2)).astype(np.uint16)


def write_corpus(prefix: Path, lengths: np.ndarray) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for d, length in enumerate(lengths):
        builder.add_document(doc_tokens(d, int(length)), [int(length)])
    builder.finalize(str(prefix) + ".idx")


def neox_index_maps(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int):
    """gpt-neox d36f623 gpt2_dataset.py, transcribed: _num_epochs, _build_doc_idx, _build_sample_idx (Python loop),
    _build_shuffle_idx, drawn from one RandomState in that order."""
    tokens_per_epoch = int(np.sum(sizes[documents]))
    num_epochs, total_tokens = 0, 0
    while True:
        num_epochs += 1
        total_tokens += tokens_per_epoch
        if ((total_tokens - 1) // seq_length) >= num_samples:
            break
    np_rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:num_epochs, 0 : len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    np_rng.shuffle(doc_idx)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros([total_samples + 1, 2], dtype=np.int32)
    sample_index, doc_idx_index, doc_offset = 1, 0, 0
    while sample_index <= total_samples:
        remaining_seq_length = seq_length + 1
        while remaining_seq_length != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining_seq_length -= doc_length
            if remaining_seq_length <= 0:
                doc_offset += remaining_seq_length + doc_length - 1
                remaining_seq_length = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    shuffle_idx = np.arange(0, sample_idx.shape[0] - 1, 1, dtype=np.uint32)
    np_rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx, num_epochs


def reference_samples(prefix: Path, lengths: np.ndarray, doc_idx, sample_idx, shuffle_idx) -> np.ndarray:
    """Training samples k = 0 .. len - 1 (GPT2Dataset.__len__ = min(len(shuffle) - 1, len(sample) - 1)), cut from
    the doc_idx token stream read from the .bin with numpy."""
    raw = np.fromfile(str(prefix) + ".bin", dtype=np.uint16).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    stream = np.concatenate([raw[starts[d] : starts[d + 1]] for d in doc_idx])
    count = min(len(shuffle_idx) - 1, len(sample_idx) - 1)
    return np.stack([stream[int(shuffle_idx[k]) * SEQ : int(shuffle_idx[k]) * SEQ + SEQ + 1] for k in range(count)])


def write_preshuffled(prefix: Path, rows: np.ndarray) -> None:
    """Pythia's pre-shuffled layout: row k is document k, every one SEQ + 1 tokens (what data.order=pythia reads)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for row in rows:
        builder.add_document(row.astype(np.uint16), [len(row)])
    builder.finalize(str(prefix) + ".idx")


def load_maps(files) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.load(files.path(kind)) for kind in ("doc", "sample", "shuffle"))


@pytest.fixture(scope="module")
def polypythia(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("polypythia")
    lengths = doc_lengths()
    write_corpus(root / "pile", lengths)
    write_tokenizer(root / "tokenizer.json", VOCAB)
    out = {"root": root, "corpus": root / "pile", "lengths": lengths, "tokenizer": root / "tokenizer.json"}
    for seed in (SEED_A, SEED_B):
        files = write_index_maps(str(root / "pile"), str(root / f"seed{seed}"), num_samples=NUM_SAMPLES,
                                 seq_length=SEQ, seed=seed)
        rows = reference_samples(root / "pile", lengths, *load_maps(files))
        write_preshuffled(root / f"preshuffled{seed}", rows)
        out[seed] = {"maps": files, "dir": root / f"seed{seed}", "rows": rows,
                     "preshuffled": root / f"preshuffled{seed}"}
    return out


def overrides(poly: dict, out: Path, seed: int = SEED_A, order: str = "pythia_index_maps", **extra) -> list[str]:
    base = {
        "train.seq_length": SEQ,
        "train.global_batch_size": GBS,
        "train.micro_batch_size": 2,
        "train.train_iters": 5,
        "data.tokenizer": str(poly["tokenizer"]),
        "data.order": order,
        "data.order_batch_size": GBS,
        "data.split": "1,0,0",
        "data.labels": "false",
        "optimizer.warmup_fraction": 0.4,
    }
    if order == "pythia_index_maps":
        base.update({"data.paths": f"[{poly['corpus']}]", "data.index_maps": str(poly[seed]["dir"])})
    else:
        base.update({"data.paths": f"[{poly[seed]['preshuffled']}]", "data.data_seed": seed})
    base.update(extra)
    return small_run_overrides(out, str(poly["root"] / "cache"), **base)


def config(poly: dict, out: Path, **kwargs):
    return load_config([TINY], overrides(poly, out, **kwargs))


def assert_one_line_user_error(exc: BaseException, *needles: str) -> None:
    message = str(exc)
    assert isinstance(exc, UserError) and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_built_maps_are_gpt_neox_maps_over_two_epochs_and_seeds_differ(polypythia, tmp_path):
    sizes = np.asarray(polypythia["lengths"], dtype=np.int32)
    for seed in (SEED_A, SEED_B):
        files = polypythia[seed]["maps"]
        assert os.path.basename(files.prefix) == f"pile_train_0_indexmap_{NUM_SAMPLES}ns_{SEQ}sl_{seed}s"
        doc, sample, shuffle = load_maps(files)
        ref_doc, ref_sample, ref_shuffle, epochs = neox_index_maps(sizes, np.arange(DOCS, dtype=np.int32),
                                                                   NUM_SAMPLES, SEQ, seed)
        assert epochs == 2 and doc.shape == (2 * DOCS,)
        assert (doc.dtype, sample.dtype, shuffle.dtype) == (np.int32, np.int32, np.uint32)
        np.testing.assert_array_equal(doc, ref_doc)
        np.testing.assert_array_equal(sample, ref_sample)
        np.testing.assert_array_equal(shuffle, ref_shuffle)
        assert len(polypythia[seed]["rows"]) >= NUM_SAMPLES
    doc_a, _, shuffle_a = load_maps(polypythia[SEED_A]["maps"])
    doc_b, _, shuffle_b = load_maps(polypythia[SEED_B]["maps"])
    assert not np.array_equal(doc_a, doc_b) and not np.array_equal(shuffle_a[:GBS], shuffle_b[:GBS])
    # GPT-NeoX's data-path + split: the train split's documents only (Megatron's rounding: 30 of 40)
    split = write_index_maps(str(polypythia["corpus"]), str(tmp_path), num_samples=20, seq_length=SEQ, seed=SEED_A,
                             split="3,1,0")
    assert os.path.basename(split.prefix) == f"pile_train_indexmap_20ns_{SEQ}sl_{SEED_A}s"
    reference = neox_index_maps(sizes, np.arange(30, dtype=np.int32), 20, SEQ, SEED_A)
    for built, expected in zip(load_maps(split), reference[:3], strict=True):
        np.testing.assert_array_equal(built, expected)


def test_rows_through_the_maps_are_the_preshuffled_files_rows_batch_by_batch(polypythia, tmp_path):
    for seed in (SEED_A, SEED_B):
        rows = polypythia[seed]["rows"]
        through_maps = build_datasets(config(polypythia, tmp_path, seed=seed).data, SEQ, 1)
        assert through_maps.data_seed == seed  # from the maps' names
        assert len(through_maps.train) == len(rows)
        for k in range(len(rows)):
            np.testing.assert_array_equal(through_maps.train[k]["tokens"].numpy(), rows[k])
        maps_cfg = config(polypythia, tmp_path, seed=seed)
        file_cfg = config(polypythia, tmp_path, seed=seed, order="pythia")
        for step in range(len(rows) // GBS):
            batch = global_batch_tokens(maps_cfg, step, datasets=through_maps)
            np.testing.assert_array_equal(batch, rows[step * GBS : (step + 1) * GBS])
            np.testing.assert_array_equal(batch, global_batch_tokens(file_cfg, step))
    # a held-out range cut from the order's end, as data.order=pythia does; the datasets pickle as paths
    rows = polypythia[SEED_A]["rows"]
    held_out = build_datasets(config(polypythia, tmp_path, **{"data.split": "9,1,0"}).data, SEQ, 1)
    boundary = len(held_out.train)
    assert boundary == round(0.9 * len(rows)) and len(held_out.valid) == len(rows) - boundary
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(held_out.valid))[0]["tokens"].numpy(), rows[boundary])
    first_a = global_batch_tokens(config(polypythia, tmp_path, seed=SEED_A), 0)
    first_b = global_batch_tokens(config(polypythia, tmp_path, seed=SEED_B), 0)
    assert not np.array_equal(first_a, first_b)


@pytest.mark.slow
def test_dp2_run_on_index_maps_consumes_what_a_one_process_run_on_the_preshuffled_file_does(polypythia, tmp_path):
    [single] = run_distributed(recorded_run, 1, overrides(polypythia, tmp_path / "file-w1", order="pythia"))
    double = run_distributed(recorded_run, 2, overrides(polypythia, tmp_path / "maps-dp2"))
    rows = polypythia[SEED_A]["rows"]
    for batches in (global_batches([single], GBS // 2), global_batches(double, GBS // 4)):
        assert len(batches) == 5
        for step, batch in enumerate(batches):
            np.testing.assert_array_equal(batch, rows[step * GBS : (step + 1) * GBS])
    assert single["losses"] == pytest.approx(double[0]["losses"], rel=1e-5)


def test_bad_index_maps_are_one_line_errors_naming_the_file(polypythia, tmp_path):
    maps = polypythia[SEED_A]["maps"]
    doc, sample, shuffle = load_maps(maps)

    def copy_maps(name: str, **replace) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        arrays = {"doc": doc, "sample": sample, "shuffle": shuffle, **replace}
        for kind, array in arrays.items():
            if array is not None:
                np.save(folder / os.path.basename(maps.path(kind)), array)
        return folder

    def refused(folder: Path | str, *needles: str, corpus: Path | None = None, **extra) -> None:
        cfg_extra = {"data.index_maps": str(folder), **extra}
        if corpus is not None:
            cfg_extra["data.paths"] = f"[{corpus}]"
        cfg = config(polypythia, tmp_path / "run", **cfg_extra)
        with pytest.raises(IndexMapError) as info:
            build_datasets(cfg.data, cfg.train.seq_length, 1)
        assert_one_line_user_error(info.value, *needles)

    # maps of a longer corpus: doc_idx names documents past the .idx's count
    fewer = tmp_path / "fewer"
    write_corpus(fewer, doc_lengths()[: DOCS - 5])
    refused(polypythia[SEED_A]["dir"], "_doc_idx.npy references document", f"{fewer}.idx holds {DOCS - 5}",
            "another corpus", corpus=fewer)
    # the same number of documents, shorter: sample_idx points past a document's end
    shorter = tmp_path / "shorter"
    write_corpus(shorter, np.maximum(1, doc_lengths() // 3))
    refused(polypythia[SEED_A]["dir"], "_sample_idx.npy row", "which has", "another corpus", corpus=shorter)
    refused(copy_maps("missing", shuffle=None), "_shuffle_idx.npy not found", "download all three")
    refused(copy_maps("float", doc=doc.astype(np.float32)), "_doc_idx.npy holds a float32 array", "not a 1-D int32")
    refused(copy_maps("flat", sample=sample.reshape(-1)), "_sample_idx.npy holds", "not an int32 [S+1, 2] array")
    refused(copy_maps("mixed", shuffle=np.full_like(shuffle, len(sample))), "_shuffle_idx.npy holds sample")
    refused(polypythia[SEED_A]["dir"], f"its name's '{SEQ}sl'", f"set train.seq_length={SEQ}",
            **{"train.seq_length": 8})
    refused(polypythia[SEED_A]["dir"], f"seed(s) [{SEED_A}], not of data.data_seed 5", **{"data.data_seed": 5})
    refused(maps.prefix, f"built with seed {SEED_A}", "data.data_seed is 5", **{"data.data_seed": 5})
    refused(tmp_path, "holds no index maps", "point data.index_maps")
    # maps without GPT-NeoX's name: the sample lengths themselves say the sequence length
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    for kind, array in zip(("doc", "sample", "shuffle"), (doc, sample, shuffle), strict=True):
        np.save(unnamed / f"maps_{kind}_idx.npy", array)
    refused(unnamed / "maps", "has 17 tokens, not train.seq_length + 1 = 9", **{"train.seq_length": 8})

    for key, value, needle in (("data.index_maps", "x", "is read only with data.order=pythia_index_maps"),
                               ("data.order", "pythia_index_maps", "needs the seed's index maps"),
                               ("data.data_seed", 3, "the packed order is drawn from train.seed")):
        sets = [f"data.paths=[{polypythia['corpus']}]", f"data.tokenizer={polypythia['tokenizer']}",
                f"{key}={value}"]
        with pytest.raises(ConfigError) as info:
            load_config([TINY], sets)
        assert_one_line_user_error(info.value, needle)


@pytest.mark.slow
def test_the_cli_builds_the_maps_and_the_viewer_shows_their_batches_or_one_line(polypythia, tmp_path):
    built = subprocess.run([sys.executable, "-m", "launcher.prepare_data", "index-maps", "--input",
                            str(polypythia["corpus"]), "--output-dir", str(tmp_path / "cli"), "--seed", str(SEED_A),
                            "--num-samples", str(NUM_SAMPLES), "--seq-length", str(SEQ)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    for kind in ("doc", "sample", "shuffle"):
        name = os.path.basename(polypythia[SEED_A]["maps"].path(kind))
        np.testing.assert_array_equal(np.load(tmp_path / "cli" / name), np.load(polypythia[SEED_A]["maps"].path(kind)))

    sets = overrides(polypythia, tmp_path / "v", **{"data.index_maps": str(tmp_path / "cli")})
    shown = viewer("--config", TINY, *[a for s in sets for a in ("--set", s)], "--step", "2")
    assert shown.returncode == 0, shown.stderr
    printed = np.array([[int(t) for t in line.split()] for line in shown.stdout.splitlines()])
    np.testing.assert_array_equal(printed, polypythia[SEED_A]["rows"][2 * GBS : 3 * GBS])
    sets = overrides(polypythia, tmp_path / "v", **{"data.index_maps": str(tmp_path / "nowhere_doc_idx.npy")})
    shown = viewer("--config", TINY, *[a for s in sets for a in ("--set", s)], "--step", "0")
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "nowhere_doc_idx.npy not found" in shown.stderr


def test_data_seed_of_init_from_sources_and_the_one_line_refusals(tmp_path):
    hub = tmp_path / "models--EleutherAI--pythia-70m-seed3" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    assert init_from_data_seed(hub) == 3
    assert init_from_data_seed(tmp_path / "neox-ckpt-pythia-160m-deduped-seed12") == 12
    assert init_from_data_seed(tmp_path / "pythia-70m") is None  # a published revision records no seed
    native = tmp_path / "global_step1000"
    (native / "configs").mkdir(parents=True)
    (native / "configs" / "pythia-70m-seed7.yml").write_text(yaml.safe_dump({"seed": 7, "num-layers": 6}))
    assert init_from_data_seed(native) == 7
    (native / "configs" / "pythia-70m-seed7.yml").write_text(yaml.safe_dump({"num-layers": 6}))
    assert init_from_data_seed(native) == 1234  # GPT-NeoX's default seed: Pythia's standard order

    check_branch_data_seed("x", 3, 3)
    check_branch_data_seed("x", None, 3)
    check_branch_data_seed("x", 3, None)
    with pytest.raises(DataSeedMismatch) as info:
        check_branch_data_seed(str(hub), 3, 1234)
    assert_one_line_user_error(info.value, "data seed 3's order", "data seed 1234's", "pythia_seed_index_maps.yaml",
                               "data.data_seed=3")
    with pytest.raises(DataSeedMismatch) as info:
        check_branch_data_seed("y", 1234, 5)
    assert_one_line_user_error(info.value, "Pythia's standard order", "data.order=pythia")
    saved = {"resolved": {"data_seed": 3}}
    check_resume_data_seed("ckpt", saved, 3)
    check_resume_data_seed("ckpt", {"resolved": {}}, 5)  # older checkpoints record no seed: not checked
    for run_seed in (4, None):
        with pytest.raises(DataSeedMismatch) as info:
            check_resume_data_seed("ckpt", saved, run_seed)
        assert_one_line_user_error(info.value, "ckpt was trained on data seed 3's order", "new train.output_dir")


@pytest.mark.slow
def test_a_run_records_its_data_seed_and_refuses_a_resume_or_branch_on_another(polypythia, tmp_path):
    from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
    from l2e_dist.data.data_seed import saved_data_seed
    from l2e_dist.training.resolved import resolve_run
    from l2e_dist.training.run_data import check_run_data

    out = tmp_path / "seedA"
    run_distributed(recorded_run, 1, overrides(polypythia, out, **{"train.train_iters": 2,
                                                                    "train.save_interval": 2}))
    ckpt = out / "checkpoints" / "global_step2"
    client = DeepSpeedCheckpoint(ckpt).client_state
    assert client["resolved"]["data_seed"] == SEED_A and client["config"]["data"]["data_seed"] == SEED_A
    assert saved_data_seed(client) == SEED_A

    # A resume on another seed's order is another experiment: the run directory's identity check refuses it,
    # naming the data seed (check_resume_data_seed, unit-tested above, covers checkpoints of older runs).
    with pytest.raises(RuntimeError, match=r"holds another experiment \(.*data\.data_seed: 3 -> 1234"):
        run_distributed(recorded_run, 1, overrides(polypythia, out, seed=SEED_B, **{"train.train_iters": 4}))

    for order, seed in (("pythia_index_maps", SEED_B), ("pythia", SEED_B)):
        cfg = config(polypythia, tmp_path / "branch", seed=seed, order=order, **{"train.init_from": str(ckpt)})
        datasets = build_datasets(cfg.data, SEQ, cfg.train.seed)
        with pytest.raises(DataSeedMismatch) as info:
            check_run_data(resolve_run(cfg, 1, datasets).config, datasets)
        assert_one_line_user_error(info.value, f"train.init_from={ckpt}", "data seed 3's order", "data seed 1234's")
    same = config(polypythia, tmp_path / "branch", seed=SEED_A, **{"train.init_from": str(ckpt)})
    datasets = build_datasets(same.data, SEQ, same.train.seed)
    check_run_data(resolve_run(same, 1, datasets).config, datasets)
