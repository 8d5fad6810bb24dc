"""l2e-prepare-data: Pile-format text -> .bin/.idx -> dataset round trip, format compatibility, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import zstandard

from l2e_dist.data import DataConfig, build_datasets
from l2e_dist.data.indexed import DataFileError, read_labels
from l2e_dist.data.prepare import KILL_HOOK_ENV, PrepareError, PrepareOptions, prepare
from l2e_dist.data.sources import InputError, SourceSpec
from l2e_dist.data.tokenizer import TextTokenizer, TokenizerError
from launcher.prepare_data import main

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSETS = ["Pile-CC", "Github", "ArXiv", "Wikipedia (en)", "FreeLaw"]
WORDS = "the of and to in data model neural token layer attention Ümlaut 数据 def return {x: 1}\t".split(" ")


def pile_records(n: int, seed: int = 0) -> list[dict]:
    """Pile-format records with varied text (unicode, newlines, tabs, an empty one) and five subsets."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=int(rng.integers(1, 60)))]
        text = " ".join(words) + ("\n\n  indented line\n" if i % 5 == 0 else "")
        records.append({"text": f"doc {i}: {text}", "meta": {"pile_set_name": SUBSETS[i % len(SUBSETS)]}})
    return records


def write_jsonl(path, records: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    with open(path, "wb") as stream:
        stream.write(zstandard.ZstdCompressor().compress(data) if str(path).endswith(".zst") else data)
    return str(path)


def train_bpe(path, texts: list[str], vocab_size: int = 400) -> str:
    """A tiny byte-level BPE tokenizer.json (the same kind as GPT-NeoX-20B's), trained in the test."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    """Three Pile-format shards (plain jsonl, jsonl.zst, parquet), the records in order, and a tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("pile")
    records = pile_records(360)
    records[7]["text"] = ""  # empty documents are skipped and counted
    records[8]["text"] = "   \n"
    del records[9]["meta"]  # no label -> -1
    files = [write_jsonl(root / "00.jsonl", records[:120]), write_jsonl(root / "01.jsonl.zst", records[120:240])]
    pq.write_table(pa.Table.from_pylist(records[240:]), root / "02.parquet", row_group_size=50)
    files.append(str(root / "02.parquet"))
    tokenizer = train_bpe(root / "tokenizer.json", [r["text"] for r in records])
    return {"root": root, "files": files, "records": records, "tokenizer": tokenizer}


def run_prepare(pile, prefix, **kwargs) -> dict:
    options = dict(output_prefix=str(prefix), tokenizer=pile["tokenizer"], source=SourceSpec(files=pile["files"]),
                   chunk_docs=32, workers=1, progress=False, verify=True)
    options.update(kwargs)
    return prepare(PrepareOptions(**options))


def read_documents(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    return [np.array(data[i]) for i in range(len(data))]


def test_pile_sample_round_trips_to_the_original_documents(pile, tmp_path):
    summary = run_prepare(pile, tmp_path / "pile", workers=2)
    kept = [r for r in pile["records"] if r["text"].strip()]
    assert summary["documents"] == len(kept) == 358 and summary["skipped"]["empty_documents"] == 2
    assert summary["missing_label"] == 1 and summary["verified"]["documents"] == 358 and summary["dtype"] == "uint16"
    tokenizer = TextTokenizer(pile["tokenizer"])
    docs = read_documents(str(tmp_path / "pile"))
    assert [tokenizer.decode(d[:-1]) for d in docs] == [r["text"] for r in kept]
    assert all(d[-1] == tokenizer.eod_id for d in docs)
    labels, names = read_labels(str(tmp_path / "pile"), len(docs))
    expected = [r.get("meta", {}).get("pile_set_name") for r in kept]
    assert [names[i] if i >= 0 else None for i in labels] == expected and names == sorted(SUBSETS)
    # training side: packed samples cut at end-of-document tokens give back whole documents with their labels
    data = build_datasets(DataConfig(paths=[str(tmp_path / "pile")], split="1,0,0", cache_dir=str(tmp_path / "c")),
                          seq_length=64, seed=1)
    assert data.vocab_size == tokenizer.vocab_size and data.eod_id == tokenizer.eod_id
    stream = np.concatenate([data.train[i]["tokens"][:-1].numpy() for i in range(len(data.train))])
    features = np.concatenate([data.train[i]["feature_labels"][:-1].numpy() for i in range(len(data.train))])
    cuts = np.flatnonzero(stream == tokenizer.eod_id) + 1
    text_label = {r["text"]: r.get("meta", {}).get("pile_set_name") for r in kept}
    recovered = 0
    for piece, feats in zip(np.split(stream, cuts)[1:-1], np.split(features, cuts)[1:-1]):
        text = tokenizer.decode(piece[:-1])
        label = text_label[text]  # KeyError = a sample that is not an original document
        assert (feats == (data.feature_names.index(label) if label else -1)).all()
        recovered += 1
    assert recovered > 300


def neox_layout_write(prefix: str, docs: list[np.ndarray]) -> None:
    """Independent writer of GPT-NeoX's MMapIndexedDataset layout (the format of Pythia's published files)."""
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 2)]).astype(np.int64)
    with open(prefix + ".idx", "wb") as stream:
        stream.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))  # version 1, uint16
        stream.write(struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1))
        stream.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as stream:
        for doc in docs:
            stream.write(doc.astype(np.uint16).tobytes())


def test_our_files_megatron_builder_files_and_neox_layout_are_read_identically(pile, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    ours = str(tmp_path / "ours")
    run_prepare(pile, ours, chunk_docs=50)
    tokenizer = TextTokenizer(pile["tokenizer"])
    kept = [r for r in pile["records"] if r["text"].strip()]
    reference = [np.array(ids + [tokenizer.eod_id], dtype=np.uint16)
                 for ids in tokenizer.encode_batch([r["text"] for r in kept])]
    theirs, neox = str(tmp_path / "megatron"), str(tmp_path / "neox")
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for doc in reference:
        builder.add_document(doc, [len(doc)])
    builder.finalize(theirs + ".idx")
    neox_layout_write(neox, reference)
    for suffix in (".bin", ".idx"):
        assert open(ours + suffix, "rb").read() == open(theirs + suffix, "rb").read() == open(neox + suffix,
                                                                                              "rb").read()
    assert all(np.array_equal(a, b) for a, b in zip(read_documents(ours), reference, strict=True))
    samples = []
    for prefix in (ours, theirs, neox):
        cfg = DataConfig(paths=[prefix], tokenizer=pile["tokenizer"], labels=False, split="1,0,0",
                         cache_dir=str(tmp_path / "cache"))
        train = build_datasets(cfg, seq_length=32, seed=3).train
        samples.append(np.stack([train[i]["tokens"].numpy() for i in range(len(train))]))
    assert np.array_equal(samples[0], samples[1]) and np.array_equal(samples[0], samples[2])


def _final_bytes(prefix) -> dict[str, bytes]:
    return {s: open(f"{prefix}{s}", "rb").read() for s in (".bin", ".idx", ".labels.npy", ".labels.json",
                                                             ".meta.json")}


@pytest.mark.slow
def test_killed_run_resumes_to_byte_identical_output(pile, tmp_path):
    reference = tmp_path / "reference"
    run_prepare(pile, reference, chunk_docs=16, verify=False)
    prefix = tmp_path / "resumed"
    command = [sys.executable, "-m", "launcher.prepare_data", "tokenize", "--input", *pile["files"],
               "--tokenizer", pile["tokenizer"], "--output-prefix", str(prefix), "--chunk-docs", "16",
               "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **{KILL_HOOK_ENV: "100"})
    killed = subprocess.run([*command, "--workers", "2"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=180, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    parts = os.listdir(f"{prefix}.parts")
    done = [p for p in parts if p.endswith(".json") and p.startswith("chunk-")]
    assert 100 // 16 <= len(done) < 23 and not os.path.exists(f"{prefix}.meta.json")  # 23 chunks in all
    with pytest.raises(DataFileError, match="unfinished l2e-prepare-data output"):
        build_datasets(DataConfig(paths=[str(prefix)], cache_dir=str(tmp_path / "c")), seq_length=8, seed=0)
    with pytest.raises(PrepareError, match="unfinished run with other inputs or settings"):
        run_prepare(pile, prefix, chunk_docs=16, text_field="meta")
    resumed = run_prepare(pile, prefix, chunk_docs=16, workers=1)  # in-process: no second interpreter start
    assert 0 < resumed["new_documents"] < 358 and resumed["verified"]["documents"] == 358
    assert _final_bytes(prefix) == _final_bytes(reference)
    assert not os.path.exists(f"{prefix}.parts")


def test_bad_records_fail_with_location_or_are_skipped_and_counted(pile, tmp_path):
    lines = [json.dumps(r) for r in pile_records(20)]
    lines[4] = '{"text": "broken'
    lines[11] = json.dumps({"content": "no text field"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = SourceSpec(files=[str(path)])
    with pytest.raises(PrepareError, match=r"bad\.jsonl:5: malformed JSON .*--on-bad-record skip"):
        run_prepare(pile, tmp_path / "fail", source=source)
    summary = run_prepare(pile, tmp_path / "skip", source=source, on_bad_record="skip")
    assert summary["documents"] == 18 and summary["skipped"]["bad_records"] == 2
    assert "bad.jsonl:12: no text field 'text'" in summary["bad_examples"][1]
    assert len(read_documents(str(tmp_path / "skip"))) == 18
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"txt": "x"}\n')
    with pytest.raises(PrepareError, match=r"gave no documents \(1 empty, 1 bad records"):
        run_prepare(pile, tmp_path / "none", source=SourceSpec(files=[str(empty)]), on_bad_record="skip")


def test_cli_errors_are_one_clear_line(pile, tmp_path, capsys):
    base = ["tokenize", "--input", pile["files"][0], "--output-prefix", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--tokenizer", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l2e-prepare-data: error: tokenizer file not found") and "\n" not in err
    assert main(["tokenize", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", pile["tokenizer"],
                 "--output-prefix", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 1000)[:-20])
    with pytest.raises(InputError, match="corrupt or truncated"):
        run_prepare(pile, tmp_path / "z", source=SourceSpec(files=[str(corrupt)]))
    assert main([*base, "--tokenizer", pile["tokenizer"]]) == 0
    assert "documents" in capsys.readouterr().out
    assert main([*base, "--tokenizer", pile["tokenizer"], "--chunk-docs", "7"]) == 2  # other settings
    assert "--overwrite" in capsys.readouterr().err


def test_vocab_too_large_for_uint16_and_int32_output(pile, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = str(tmp_path / "big.json")
    tok.save(path)
    records = [{"text": "w5 w69999 w12", "meta": {"pile_set_name": "x"}}, {"text": "w65600", "meta": {}}]
    source = SourceSpec(files=[write_jsonl(tmp_path / "big.jsonl", records)])
    with pytest.raises(DataFileError, match="does not fit uint16"):
        run_prepare(pile, tmp_path / "u16", tokenizer=path, source=source, dtype="uint16")
    summary = run_prepare(pile, tmp_path / "auto", tokenizer=path, source=source)
    assert summary["dtype"] == "int32"
    docs = read_documents(str(tmp_path / "auto"))
    assert [d.tolist() for d in docs] == [[7, 70001, 14, 0], [65602, 0]]


def test_sentencepiece_tokenizer_trained_by_the_cli(pile, tmp_path, capsys):
    model = str(tmp_path / "sp.model")
    assert main(["train-tokenizer", "--input", *pile["files"], "--output", model, "--vocab-size", "300",
                 "--sample-docs", "200"]) == 0
    assert "on 200 documents" in capsys.readouterr().out
    run_prepare(pile, tmp_path / "sp", tokenizer=model)
    tokenizer = TextTokenizer(model)
    kept = [r["text"] for r in pile["records"] if r["text"].strip()]
    assert [tokenizer.decode(d[:-1]) for d in read_documents(str(tmp_path / "sp"))] == kept
    with pytest.raises(TokenizerError, match="unknown tokenizer file type"):
        TextTokenizer(pile["files"][0])


def test_datasets_input_gives_the_same_tokens_as_local_files(pile, tmp_path):
    local = run_prepare(pile, tmp_path / "local", source=SourceSpec(files=pile["files"][:2]))
    hub = run_prepare(pile, tmp_path / "hub", source=SourceSpec(hf_dataset="json", hf_data_files=pile["files"][:2]))
    assert local["documents"] == hub["documents"] == 238
    for suffix in (".bin", ".idx", ".labels.npy", ".labels.json"):
        assert open(f"{tmp_path}/local{suffix}", "rb").read() == open(f"{tmp_path}/hub{suffix}", "rb").read()
