"""l2e-eval: lm-evaluation-harness on a tiny HF export with the shipped local task, fully offline.

The harness's accuracy is checked against log-likelihoods computed here directly with transformers, using the
harness's own context/continuation split (continuation tokens = tokens(context + continuation) minus the
tokens of the context, no BOS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_tasks"

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e .[eval]")


def _export_tiny_model(directory: Path) -> None:
    """A seeded 2-layer GPTNeoX with a byte-level BPE tokenizer trained on the task's text, saved as HF files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    texts = [json.dumps(json.loads(line)) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts + ["Question: Answer:"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = GPTNeoXConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _reference_loglikelihoods(directory: Path, docs: list[dict]) -> list[list[float]]:
    import torch
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        row = []
        for choice in doc["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            continuation = whole[len(context_ids):]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)[len(context_ids) - 1:]
            row.append(float(logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum()))
        out.append(row)
    return out


@pytest.mark.slow
def test_lm_eval_offline_local_task_matches_direct_loglikelihoods(tmp_path):
    model_dir = tmp_path / "export"
    _export_tiny_model(model_dir)
    out = tmp_path / "eval.json"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "launcher.eval", str(model_dir), "--tasks", str(TASK_DIR / "l2e_tiny_mc.yaml"),
         "--device", "cpu", "--batch-size", "4", "--out", str(out), "--log-samples"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    summary = record["summary"]["l2e_tiny_mc"]
    assert 0.0 <= summary["acc"] <= 1.0 and 0.0 <= summary["acc_norm"] <= 1.0
    assert record["n-samples"]["l2e_tiny_mc"]["effective"] == 12
    assert "l2e_tiny_mc: acc" in result.stdout

    docs = [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    reference = _reference_loglikelihoods(model_dir, docs)
    samples = sorted(record["samples"]["l2e_tiny_mc"], key=lambda s: s["doc_id"])
    harness = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    assert [len(r) for r in harness] == [len(r) for r in reference]
    assert sum(harness, []) == pytest.approx(sum(reference, []), abs=1e-4)
    acc = sum(max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(reference, docs)) / len(docs)
    norm = [[ll / len(c) for ll, c in zip(r, d["choices"])] for r, d in zip(reference, docs)]
    acc_norm = sum(max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(norm, docs)) / len(docs)
    assert summary["acc"] == pytest.approx(acc)
    assert summary["acc_norm"] == pytest.approx(acc_norm)


def test_eval_errors_are_one_line(tmp_path, capsys):
    from launcher.eval import main

    assert main([str(tmp_path), "--tasks", "l2e_tiny_mc"]) == 2
    assert "not an HF model directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path), "--tasks", "l2e_tiny_mc"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text("{}")
    assert main([str(tmp_path), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "task file not found" in err and len(err.strip().splitlines()) == 1
