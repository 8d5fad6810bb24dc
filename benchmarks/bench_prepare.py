"""Throughput of l2e-prepare-data (1 and 2 workers) next to a plain `datasets.map` tokenization.

Corpus: the Python standard library's source files cut into ~200-line documents, written as two Pile-format
jsonl shards (label = top-level package), tokenized with a byte-level BPE tokenizer.json trained here (the
kind of tokenizer Pythia's GPT-NeoX-20B is). Both sides read the same files and use the same `tokenizers`
library; ours also writes .bin/.idx + sidecars, datasets.map writes its Arrow cache. No network.

    python benchmarks/bench_prepare.py [--mb 30] [--vocab 8192] [--workdir /tmp/bench-prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_corpus(workdir: str, megabytes: float) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    records, size = [], 0
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8", errors="replace") as stream:
                lines = stream.read().split("\n")
            group = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".py")
            for start in range(0, len(lines), 200):
                text = "\n".join(lines[start : start + 200])
                records.append({"text": text, "meta": {"pile_set_name": group}})
                size += len(text.encode())
    cut = len(records)
    while size > megabytes * 1e6 and cut > 1:  # drop whole documents from the end down to the target size
        cut -= 1
        size -= len(records[cut]["text"].encode())
    records = records[:cut]
    files = []
    for shard in range(2):
        path = os.path.join(workdir, f"shard-{shard:02d}.jsonl")
        with open(path, "w") as stream:
            for record in records[shard::2]:
                stream.write(json.dumps(record) + "\n")
        files.append(path)
    print(f"corpus: {len(records)} documents, {size / 1e6:.1f} MB of text in {len(files)} jsonl shards")
    return files


def train_tokenizer(workdir: str, files: list[str], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        with open(files[0]) as stream:
            for i, line in enumerate(stream):
                if i >= 2000:
                    return
                yield json.loads(line)["text"]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = os.path.join(workdir, "tokenizer.json")
    tokenizer.save(path)
    return path


def bench_ours(workdir: str, files: list[str], tokenizer: str, workers: int) -> dict:
    from l2e_dist.data.prepare import PrepareOptions, prepare
    from l2e_dist.data.sources import SourceSpec

    prefix = os.path.join(workdir, f"ours-{workers}w", "pile")
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
    start = time.perf_counter()
    summary = prepare(PrepareOptions(output_prefix=prefix, tokenizer=tokenizer, source=SourceSpec(files=files),
                                     workers=workers, progress=False))
    total = time.perf_counter() - start
    return {"tokens": summary["tokens"], "seconds": total, "tokenize_seconds": summary["seconds"]}


def bench_datasets_map(workdir: str, files: list[str], tokenizer_path: str, num_proc: int | None) -> dict:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    cache = os.path.join(workdir, f"hf-cache-{num_proc}")
    shutil.rmtree(cache, ignore_errors=True)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    eod = tokenizer.token_to_id("<|endoftext|>")

    def tokenize(batch: dict) -> dict:
        return {"input_ids": [enc.ids + [eod] for enc in tokenizer.encode_batch(batch["text"])]}

    start = time.perf_counter()
    data = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
    loaded = time.perf_counter()
    data = data.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    tokenized = data.map(tokenize, batched=True, batch_size=1000, remove_columns=data.column_names,
                         num_proc=num_proc)
    done = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return {"tokens": tokens, "seconds": done - start, "tokenize_seconds": done - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=30.0, help="MB of text")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workdir", default="/tmp/bench-prepare")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.makedirs(args.workdir, exist_ok=True)
    files = write_corpus(args.workdir, args.mb)
    tokenizer = train_tokenizer(args.workdir, files, args.vocab)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (one-time import, kept out of the timings)

    print(f"cpu cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f}")
    print(f"{'method':<34} {'tokens':>11} {'total s':>8} {'tokens/s':>11} {'tok-only s':>10} {'tokens/s':>11}")
    runs = [("l2e-prepare-data, 1 worker", lambda: bench_ours(args.workdir, files, tokenizer, 1)),
            ("l2e-prepare-data, 2 workers", lambda: bench_ours(args.workdir, files, tokenizer, 2)),
            ("datasets.map (batched)", lambda: bench_datasets_map(args.workdir, files, tokenizer, None)),
            ("datasets.map (batched, num_proc=2)", lambda: bench_datasets_map(args.workdir, files, tokenizer, 2))]
    for name, run in runs:
        r = run()
        print(f"{name:<34} {r['tokens']:>11,} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>11,.0f} "
              f"{r['tokenize_seconds']:>10.2f} {r['tokens'] / r['tokenize_seconds']:>11,.0f}")
    print("total = everything from the jsonl files to finished output (ours: .bin/.idx/sidecars after the merge;")
    print("datasets: load_dataset json->Arrow + filter + map); tok-only = ours without the final merge,")
    print("datasets without load_dataset.")


if __name__ == "__main__":
    main()
