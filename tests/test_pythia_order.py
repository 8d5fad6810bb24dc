"""Pythia's data order (data.order=pythia), the batch viewer, and branching a run at step k.

The data is a file in Pythia's pre-shuffled layout written by megatron-core's IndexedDatasetBuilder: one
document per training sample, every sample SEQ + 1 tokens, sample k starting with tokens that encode k.
References are read from the .bin with numpy alone (in that layout the file is a [samples, SEQ + 1] array).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2e_dist.config import load_config
from l2e_dist.config_utils import ConfigError
from l2e_dist.parallel.launch_env import free_port
from tests.conftest import ROOT, logged_metrics, pretrain_result, small_run_overrides
from tests.distributed import rank_env, run_distributed

VOCAB = 500
SEQ = 16
GBS = 8
TRAIN_BATCHES = 10
SAMPLES = GBS * (TRAIN_BATCHES + 2)  # split "10,2,0": 10 training batches, then a 2-batch held-out range
TINY = str(ROOT / "configs" / "tiny.yaml")


def sample_tokens(k: int, length: int) -> np.ndarray:
    """Sample k: its index in the first two tokens, then a k-dependent ramp (ids in [2, VOCAB))."""
    body = (k * 7 + np.arange(length - 2)) % (VOCAB - 2) + 2
    return np.concatenate([[2 + k // (VOCAB - 2), 2 + k % (VOCAB - 2)], body]).astype(np.uint16)


def write_preshuffled(prefix: Path, samples: int, length: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for k in range(samples):
        builder.add_document(sample_tokens(k, length), [length])
    builder.finalize(str(prefix) + ".idx")


def write_tokenizer(path: Path, vocab: int) -> None:
    """A word-level HF tokenizer.json of `vocab` tokens with <|endoftext|> = 0 (no Pythia tokenizer offline)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = {"<|endoftext|>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    Tokenizer(WordLevel(words, unk_token="<unk>")).save(str(path))


def read_samples(prefix: Path) -> np.ndarray:
    """The independent reference: the .bin as a [samples, SEQ + 1] array."""
    return np.fromfile(str(prefix) + ".bin", dtype=np.uint16).reshape(-1, SEQ + 1).astype(np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pythia-order")
    write_preshuffled(root / "document", SAMPLES, SEQ + 1)
    write_tokenizer(root / "tokenizer.json", VOCAB)
    return {"root": root, "prefix": root / "document", "tokenizer": root / "tokenizer.json"}


def pythia_overrides(corpus: dict[str, Path], out: Path, **extra) -> list[str]:
    base = {
        "train.seq_length": SEQ,
        "train.global_batch_size": GBS,
        "train.micro_batch_size": 2,
        "train.train_iters": 5,
        "data.paths": f"[{corpus['prefix']}]",
        "data.tokenizer": str(corpus["tokenizer"]),
        "data.order": "pythia",
        "data.order_batch_size": GBS,
        "data.split": "10,2,0",
        "data.labels": "false",
        "optimizer.warmup_fraction": 0.4,  # warm-up and decay both inside the 5 steps
    }
    base.update(extra)
    return small_run_overrides(out, str(corpus["root"] / "cache"), **base)


def recorded_run(overrides: list[str]) -> dict:
    """Train through the real trainer, recording every micro-batch it feeds the engine on this rank."""
    import l2e_dist.training.trainer as trainer

    seen = []
    original = trainer.train_micro_batch

    def recording(engine, inhibitor, tokens, *rest):
        seen.append(tokens.clone().numpy())
        return original(engine, inhibitor, tokens, *rest)

    trainer.train_micro_batch = recording
    result = pretrain_result(overrides)
    return {"micro_batches": seen, "losses": result.losses, "final_step": result.final_step}


def global_batches(ranks: list[dict], gas: int) -> list[np.ndarray]:
    """Reassemble each step's global batch: micro-step m of every rank r, in (m, r) order (Megatron's order)."""
    steps = len(ranks[0]["micro_batches"]) // gas
    return [np.concatenate([rank["micro_batches"][s * gas + m] for m in range(gas) for rank in ranks])
            for s in range(steps)]


def viewer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.prepare_data", "batch", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_consumed_batches_are_the_file_order_at_world_1_and_dp2_and_the_viewer_shows_them(corpus, tmp_path):
    reference = read_samples(corpus["prefix"])
    assert reference.shape == (SAMPLES, SEQ + 1)
    assert [int(r[0] - 2) * (VOCAB - 2) + int(r[1] - 2) for r in reference] == list(range(SAMPLES))
    single = run_distributed(recorded_run, 1, pythia_overrides(corpus, tmp_path / "w1"))
    double = run_distributed(recorded_run, 2, pythia_overrides(corpus, tmp_path / "dp2"))
    for ranks, gas in ((single, GBS // 2), (double, GBS // 4)):
        batches = global_batches(ranks, gas)
        assert len(batches) == 5
        for step, batch in enumerate(batches):  # optimizer step step+1 trains on global batch `step`
            np.testing.assert_array_equal(batch, reference[step * GBS : (step + 1) * GBS])
    assert single[0]["losses"] == pytest.approx(double[0]["losses"], rel=1e-5)

    # the viewer: the same code path, printed and saved
    config = ["--config", TINY, *[a for o in pythia_overrides(corpus, tmp_path / "v") for a in ("--set", o)]]
    shown = viewer(*config, "--step", "3")
    assert shown.returncode == 0, shown.stderr
    printed = np.array([[int(t) for t in line.split()] for line in shown.stdout.splitlines()])
    np.testing.assert_array_equal(printed, reference[3 * GBS : 4 * GBS])
    saved = viewer(*config, "--step", "9", "--out", str(tmp_path / "b9.npy"))
    assert saved.returncode == 0, saved.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "b9.npy"), reference[9 * GBS : 10 * GBS])
    held_out = viewer(*config, "--step", "1", "--split", "valid", "--out", str(tmp_path / "v1.npy"))
    assert held_out.returncode == 0, held_out.stderr  # the held-out range right after the training samples
    np.testing.assert_array_equal(np.load(tmp_path / "v1.npy"), reference[11 * GBS : 12 * GBS])
    past = viewer(*config, "--step", str(TRAIN_BATCHES))
    assert past.returncode == 2 and past.stderr.count("\n") == 1, past.stderr
    assert "config error at 'step'" in past.stderr and "past the end" in past.stderr


@pytest.mark.slow
def test_branched_run_consumes_the_uninterrupted_runs_next_batches_with_the_same_lr(corpus, tmp_path):
    from l2e_dist.checkpoint.convert import export_hf

    k = 2
    full = tmp_path / "full"
    [uninterrupted] = run_distributed(recorded_run, 1, pythia_overrides(
        corpus, full, **{"train.save_interval": k, "train.keep_last_n": 0}))
    hf_dir = export_hf(full / "checkpoints" / f"global_step{k}", tmp_path / f"hf-step{k}")
    branched_dir = tmp_path / "branched"
    [branched] = run_distributed(recorded_run, 1, pythia_overrides(
        corpus, branched_dir, **{"train.init_from": str(hf_dir), "train.branch_step": k}))
    gas = GBS // 2
    full_batches, branch_batches = global_batches([uninterrupted], gas), global_batches([branched], gas)
    assert len(branch_batches) == 5 - k
    for a, b in zip(full_batches[k:], branch_batches, strict=True):
        np.testing.assert_array_equal(a, b)
    full_log, branch_log = logged_metrics(full), logged_metrics(branched_dir)
    assert sorted(branch_log) == list(range(k + 1, 6))
    for step in range(k + 1, 6):
        assert branch_log[step]["train/lr"] == pytest.approx(full_log[step]["train/lr"], rel=1e-12), step
    # step k+1 runs the same weights on the same batch before any update: the same loss (AdamW then differs,
    # the branch's moments start fresh)
    assert branch_log[k + 1]["train/loss"] == pytest.approx(full_log[k + 1]["train/loss"], rel=1e-6)
    assert branched["final_step"] == 5


@pytest.mark.slow
def test_viewer_shows_what_the_trainer_consumes_in_packed_mode(tmp_path):
    """The default data mode (shuffled, packed, seeded epochs): the viewer's batch is the trainer's too."""
    from l2e_dist.training.run_data import global_batch_tokens
    from tests.test_data_dataset import random_docs, write_corpus

    prefix = tmp_path / "packed"
    write_corpus(str(prefix), random_docs(np.random.default_rng(3), 150, 2, VOCAB), None)
    overrides = small_run_overrides(tmp_path / "run", str(tmp_path / "cache"), **{
        "data.paths": f"[{prefix}]", "train.seq_length": SEQ, "train.train_iters": 4, "data.labels": "false"})
    [run] = run_distributed(recorded_run, 1, overrides)
    cfg = load_config([TINY], overrides)
    for step, batch in enumerate(global_batches([run], cfg.train.global_batch_size // cfg.train.micro_batch_size)):
        np.testing.assert_array_equal(global_batch_tokens(cfg, step), batch)


def test_validation_from_a_separate_prefix(corpus, tmp_path):
    from l2e_dist.data import build_datasets
    from tests.test_data_dataset import random_docs, write_corpus

    val = tmp_path / "pile_val"
    docs = random_docs(np.random.default_rng(5), 60, 2, VOCAB)
    write_corpus(str(val), docs, None, meta=False)
    cfg = load_config([TINY], pythia_overrides(corpus, tmp_path / "run", **{
        "data.valid_paths": f"[{val}]", "data.split": "1,0,0"}))
    data = build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed)
    assert len(data.train) == SAMPLES and data.train.in_file_order  # the whole file trains, in order
    stream = np.concatenate(docs)
    assert len(data.valid) == (len(stream) - 1) // SEQ  # every validation document, packed
    first = data.valid[0]["tokens"].numpy()  # packing starts with the first (shuffled) validation document
    assert any(np.array_equal(first[: len(doc)], doc[: SEQ + 1]) for doc in map(np.asarray, docs))
    with pytest.raises(ConfigError, match=r"'data.split'.*comes from data.valid_paths"):
        load_config([TINY], pythia_overrides(corpus, tmp_path / "run", **{"data.valid_paths": f"[{val}]"}))


def test_file_order_samples_carry_their_documents_labels(tmp_path):
    from l2e_dist.data import DataConfig, build_datasets
    from l2e_dist.data.indexed import write_labels

    prefix = tmp_path / "labelled"
    write_preshuffled(prefix, 12, SEQ + 1)
    write_labels(str(prefix), np.array([k % 3 - 1 for k in range(12)]), ["a", "b"], field="test")
    write_tokenizer(tmp_path / "tok.json", VOCAB)
    data = build_datasets(DataConfig(paths=[str(prefix)], tokenizer=str(tmp_path / "tok.json"), order="pythia",
                                     split="2,1,1", cache_dir=str(tmp_path / "cache")), SEQ, seed=0)
    assert data.feature_names == ["a", "b"] and (len(data.train), len(data.valid), len(data.test)) == (6, 3, 3)
    for split, first in ((data.train, 0), (data.valid, 6), (data.test, 9)):
        for i in range(len(split)):
            sample = split[i]
            np.testing.assert_array_equal(sample["tokens"].numpy(), sample_tokens(first + i, SEQ + 1))
            assert set(sample["feature_labels"].tolist()) == {(first + i) % 3 - 1}


def test_lr_schedule_length_and_branch_rewarmup():
    from l2e_dist.training.optim import lr_multiplier

    cfg = load_config([TINY], ["train.train_iters=20", "optimizer.lr_decay_iters=100",
                               "optimizer.warmup_fraction=0.1", "optimizer.min_lr_ratio=0.1"])
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)  # warm-up = 10% of lr_decay_iters, not of train_iters
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)
    branched = load_config([TINY], ["train.train_iters=100", "optimizer.warmup_fraction=0.1",
                                    "optimizer.min_lr_ratio=0.1", "train.branch_step=55", "train.init_from=x",
                                    "optimizer.branch_warmup_iters=4", "optimizer.decay_style=constant"])
    assert [lr_multiplier(s, branched) for s in (54, 55, 56, 58, 59)] == pytest.approx([1, 0.25, 0.5, 1, 1])


def test_bad_pythia_inputs_are_one_line_config_errors_naming_the_key(corpus, tmp_path):
    from l2e_dist.data import build_datasets
    from l2e_dist.training.run_data import check_run_data

    def checked(**extra):
        cfg = load_config([TINY], pythia_overrides(corpus, tmp_path / "run", **extra))
        check_run_data(cfg, build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed))

    checked()  # the valid setup passes
    with pytest.raises(ConfigError, match=r"'train.seq_length'.*documents have 17 tokens; set train.seq_length=16"):
        checked(**{"train.seq_length": 8})
    with pytest.raises(ConfigError, match=r"'train.global_batch_size'.*does not match the file's order"):
        checked(**{"train.global_batch_size": 4})
    with pytest.raises(ConfigError, match=r"'train.branch_step'.*past the end of the data.*10 global batches"):
        checked(**{"train.branch_step": TRAIN_BATCHES, "train.train_iters": 20, "train.init_from": "x"})
    with pytest.raises(ConfigError, match=r"'train.train_iters'.*need 88 samples"):
        checked(**{"train.train_iters": 11})
    with pytest.raises(ConfigError, match=r"'data.paths'.*exactly one prefix"):
        checked(**{"data.paths": f"[{corpus['prefix']}, {corpus['prefix']}x]"})
    with pytest.raises(ConfigError, match=r"'train.branch_step'.*needs train.init_from"):
        checked(**{"train.branch_step": 2})
    # a tokenizer that is not the init_from checkpoint's: vocabulary sizes disagree
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 50304}))
    with pytest.raises(ConfigError, match=r"'data.tokenizer'.*500 tokens.*50304 embedding rows"):
        checked(**{"train.init_from": str(hf_dir), "train.branch_step": 1})
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 499}))
    with pytest.raises(ConfigError, match=r"'data.tokenizer'.*500 tokens.*499 embedding rows"):
        checked(**{"train.init_from": str(hf_dir), "train.branch_step": 1})
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 768}))
    checked(**{"train.init_from": str(hf_dir), "train.branch_step": 1})  # padded beyond our 512: rows are cut
    write_tokenizer(hf_dir / "tokenizer.json", 600)
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 512}))
    with pytest.raises(ConfigError, match=r"'data.tokenizer'.*500 tokens.*600-token tokenizer"):
        checked(**{"train.init_from": str(hf_dir), "train.branch_step": 1})
    # documents of varying length are not Pythia's layout
    from tests.test_data_dataset import write_corpus

    write_corpus(str(tmp_path / "ragged"), [[5] * 17, [6] * 12], None, meta=False)
    with pytest.raises(ConfigError, match=r"'data.order'.*12..17 tokens"):
        checked(**{"data.paths": f"[{tmp_path / 'ragged'}]"})


@pytest.mark.slow
def test_pretrain_cli_reports_a_bad_branch_in_one_line(corpus, tmp_path):
    sets = pythia_overrides(corpus, tmp_path / "cli", **{"train.branch_step": 12, "train.train_iters": 20,
                                                         "train.init_from": str(tmp_path)})
    proc = subprocess.run([sys.executable, "-m", "launcher.pretrain", "--config", TINY,
                           *[a for o in sets for a in ("--set", o)]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **rank_env(0, 1, free_port())})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("l2e-pretrain:")]
    assert len(errors) == 1 and "config error at 'train.branch_step'" in errors[0], proc.stderr


def test_the_issue_command_line_configs_load():
    """`--config configs/pythia-<size>.yaml --config configs/data/<Pythia overlay> --config configs/l2e/l2e.yaml
    --set train.branch_step=13000 --set train.init_from=...` and the -deduped variants are valid as shipped."""
    overlays = sorted((ROOT / "configs" / "data").glob("pythia_*_preshuffled.yaml"))
    assert [p.name for p in overlays] == ["pythia_deduped_preshuffled.yaml", "pythia_standard_preshuffled.yaml"]
    sizes = sorted(p for p in (ROOT / "configs").glob("pythia-*.yaml") if not p.stem.endswith("-deduped"))
    assert len(sizes) == 10  # 70m .. 12b, and PolyPythia's 14m and 31m (no -deduped)
    for size in sizes:
        for overlay in overlays:
            cfg = load_config([str(size), str(overlay), str(ROOT / "configs" / "l2e" / "l2e.yaml")],
                              ["train.branch_step=13000", "train.init_from=ckpt/pythia-step13000"])
            assert (cfg.data.order, cfg.train.global_batch_size, cfg.train.seq_length) == ("pythia", 1024, 2048)
            assert cfg.optimizer.lr_decay_iters == 143000 and cfg.optimizer.warmup_fraction == 0.01
            assert cfg.optimizer.min_lr_ratio == 0.1
        if size.stem in ("pythia-14m", "pythia-31m"):
            continue
        deduped = load_config([str(size.with_name(size.stem + "-deduped.yaml"))])
        assert deduped.data.paths == ["data/pythia/pile-deduped-preshuffled/document"]
        assert deduped.model == load_config([str(size)]).model
